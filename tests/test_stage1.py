"""Stage 1 training: the CLI's outputs, resume, 2-process DDP, optimiser groups and schedule."""

import csv
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from dreamdiffusion.config import STAGES, Stage1Config, load_saved_config
from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.dataset import EEGPretrainDataset
from dreamdiffusion.models.mae import MaskedEEGAutoencoder
from dreamdiffusion.train import stage1
from dreamdiffusion.train.lightning import seed_all
from dreamdiffusion.train.stage1 import parameter_groups

STAGE1 = STAGES["stage1"]
SCRIPT = STAGE1.script_path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """24 recordings of 4-10 channels and various lengths (the dataset tiles/crops them to 8 x 64)."""
    folder = tmp_path_factory.mktemp("pretrain_eeg")
    rng = np.random.default_rng(0)
    for i in range(24):
        n_channels, n_times = int(rng.integers(4, 11)), int(rng.integers(48, 160))
        t = np.arange(n_times) / 64
        eeg = 10 * np.sin(2 * np.pi * rng.integers(1, 4) * t + rng.uniform(0, 6, (n_channels, 1)))
        np.save(folder / f"sub{i:02d}.npy", (eeg + rng.standard_normal(eeg.shape)).astype(np.float32))
    return folder


def tiny_overrides(corpus, out_dir, **extra):
    values = {
        "output_dir": out_dir, "data.root": corpus, "data.n_channels": 8, "data.n_times": 64,
        "encoder.n_channels": 8, "encoder.n_times": 64, "encoder.embed_dim": 32, "encoder.depth": 2,
        "encoder.num_heads": 4, "decoder.decoder_embed_dim": 16, "decoder.decoder_depth": 1,
        "decoder.decoder_num_heads": 2, "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "lr": 1e-3,
        "trainer.accelerator": "cpu", "trainer.num_workers": 0, "trainer.progress_bar": False,
        "figure_every_n_epochs": 1, "checkpoint_every_n_epochs": 1, "n_figure_samples": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def read_metrics(out_dir):
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def model_weights(ckpt_path):
    return {k: v for k, v in torch.load(ckpt_path, weights_only=False)["state_dict"].items()}


def test_cli_writes_everything_it_promises(corpus, tmp_path):
    from dreamdiffusion import load_eeg_encoder

    out = tmp_path / "run"
    script = stage1
    script.main(tiny_overrides(corpus, out, **{"data.val_fraction": 0.25}))

    cfg = load_saved_config(Stage1Config, out / "config.yaml")
    assert cfg.encoder.embed_dim == 32 and cfg.mask_ratio == 0.75
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch_0001.ckpt", "epoch_0002.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "recon_epoch_0001.png", "recon_epoch_0002.png"]
    assert (out / "figures" / "recon_epoch_0002.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for row in rows:
        assert float(row["loss"]) > 0 and float(row["val_loss"]) > 0 and -1 <= float(row["recon_corr"]) <= 1
        # the hidden samples' reconstruction beside linear interpolation across them (does the MAE learn?)
        assert -1 <= float(row["masked_corr"]) <= 1 and 0 < float(row["interp_corr"]) <= 1
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # half-cosine decay after the warm-up epoch

    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["config"]["encoder"]["embed_dim"] == 32  # the config travels as plain data
    encoder = load_eeg_encoder(out / "eeg_encoder")
    from_ckpt = load_eeg_encoder(out / "checkpoints" / "last.ckpt")
    eeg = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.equal(encoder(eeg), from_ckpt(eeg))
    trained = {k[len("model.encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.encoder.")}
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in trained.items())


def test_resume_after_two_epochs_equals_four_uninterrupted(corpus, tmp_path):
    script = stage1
    # One loader worker: it prefetches as soon as Lightning builds the first iterator, which on resume
    # happens before the epoch counter is restored - the case that needs care.
    common = {"epochs": 4, "figure_every_n_epochs": 0, "checkpoint_every_n_epochs": 0, "trainer.num_workers": 1}
    script.main(tiny_overrides(corpus, tmp_path / "straight", **common))
    script.main(tiny_overrides(corpus, tmp_path / "split", stop_after_epochs=2, **common))
    assert [r["epoch"] for r in read_metrics(tmp_path / "split")] == ["0", "1"]
    script.main(tiny_overrides(corpus, tmp_path / "split", resume="true", **common))

    straight = model_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    split = model_weights(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    rows_straight, rows_split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["epoch"] for r in rows_split] == ["0", "1", "2", "3"]
    assert [r["loss"] for r in rows_split] == [r["loss"] for r in rows_straight]


def test_resume_refuses_an_optimiser_state_grouped_another_way_in_one_sentence(corpus, tmp_path, capsys):
    # A run written before the cls/mask tokens took weight decay: same weights, the two tokens in the
    # no-decay group. torch would fail inside fit; the check names the file and the groups first.
    common = {"epochs": 2, "figure_every_n_epochs": 0, "checkpoint_every_n_epochs": 0}
    out = tmp_path / "old"
    stage1.main(tiny_overrides(corpus, out, stop_after_epochs=1, **common))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    no_decay, decay = ckpt["optimizer_states"][0]["param_groups"]
    no_decay["params"] += decay["params"][:2]
    decay["params"] = decay["params"][2:]
    torch.save(ckpt, last)
    before = sorted(p.name for p in out.rglob("*"))

    assert run_cli(stage1.main, tiny_overrides(corpus, out, resume="true", **common)) == 2
    err = capsys.readouterr().err.strip()
    sizes = [len(no_decay["params"]), len(decay["params"])]
    assert err.startswith(f"error: resume=true: {last} holds an optimiser state with parameter groups of {sizes}")
    assert "start a new output_dir" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == before  # refused before anything was written


def test_a_packed_corpus_trains_exactly_as_the_folder_it_was_packed_from(corpus, tmp_path):
    from dreamdiffusion.data.packed_corpus import pack_folder

    pack_folder(corpus, tmp_path / "packed")
    common = {"epochs": 2, "figure_every_n_epochs": 0, "checkpoint_every_n_epochs": 0, "data.val_fraction": 0.25}
    stage1.main(tiny_overrides(corpus, tmp_path / "folder", **common))
    stage1.main(tiny_overrides(tmp_path / "packed", tmp_path / "packed_run", **common))
    folder = model_weights(tmp_path / "folder" / "checkpoints" / "last.ckpt")
    packed = model_weights(tmp_path / "packed_run" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(folder[name], packed[name]) for name in folder)
    assert read_metrics(tmp_path / "folder")[-1]["val_loss"] == read_metrics(tmp_path / "packed_run")[-1]["val_loss"]


def test_two_process_ddp_on_cpu(corpus, tmp_path):
    # Lightning's DDP launcher re-runs the command line, so the script runs in a subprocess.
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    cmd = [sys.executable, str(SCRIPT), *tiny_overrides(corpus, out, epochs=1, warmup_epochs=0),
           "trainer.devices=2", "trainer.strategy=ddp"]
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "effective batch 16 (8 per device x 2 devices" in result.stdout + result.stderr
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "eeg_encoder" / "model.safetensors").is_file()
    assert len(read_metrics(out)) == 1
    # 24 files / (8 per device x 2 processes) = 2 optimiser steps in the one epoch
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("mask_ratio=1.5", "mask_ratio must be in (0, 1)"),
        ("mask_ratio=0", "0 hides no patch"),
        # what a review of the CLIs found ending in Lightning's tracebacks
        ("trainer.precision=fp17", "invalid trainer settings"),
        ("trainer.accelerator=tpux", "invalid trainer settings"),
        ("trainer.devices=0", "trainer.devices must be >= 1"),
        ("trainer.strategy=nonsense", "invalid trainer settings"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be >= 1"),
        ("trainer.num_workers=-1", "trainer.num_workers must be >= 0"),
        ("encoder.n_channels=16", "encoder.n_channels (16) and data.n_channels (8) differ"),
        ("no_such_key=1", "no_such_key"),
        ("resume=true", "no checkpoint to resume from"),
        ("warmup_epochs=5", "warmup_epochs must be in [0, epochs=2]"),
        ("trainer.precision=16-mixed", "needs a GPU"),
    ],
)
def test_bad_config_exits_with_code_2(corpus, tmp_path, capsys, override, message):
    script = stage1
    assert run_cli(script.main, tiny_overrides(corpus, tmp_path / "bad") + [override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_config_file_that_is_not_a_mapping_and_a_wrong_wandb_mode(corpus, tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs: 2\n")
    assert run_cli(stage1.main, ["--config", str(listed), *tiny_overrides(corpus, tmp_path / "a")]) == 2
    assert "holds a list, expected a mapping" in capsys.readouterr().err
    assert run_cli(stage1.main, tiny_overrides(corpus, tmp_path / "b") + ["wandb.enabled=true", "wandb.mode=onlin"]) == 2
    assert "wandb.mode must be one of online, offline, disabled" in capsys.readouterr().err


def test_resuming_with_other_model_sizes_is_a_sentence(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    stage1.main(tiny_overrides(corpus, out, epochs=1, warmup_epochs=0))
    args = tiny_overrides(corpus, out, epochs=2, warmup_epochs=0, resume="true", **{"encoder.embed_dim": 64})
    assert run_cli(stage1.main, args) == 2  # the folder's settings differ (core/run_folder.py) ...
    err = capsys.readouterr().err
    assert "made with encoder.embed_dim=32, not 64" in err and "Traceback" not in err
    assert run_cli(stage1.main, [*args, "overwrite=true"]) == 2  # ... and, claimed anyway, so does last.ckpt
    err = capsys.readouterr().err
    assert "was not written by this stage with these model sizes" in err and "Traceback" not in err


def test_missing_corpus_exits_with_code_2(tmp_path, capsys):
    script = stage1
    assert run_cli(script.main, [f"data.root={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_weight_decay_as_the_authors_groups_it():
    """timm's groups are the authors' rule written out: no decay on 1-D parameters and biases, decay on
    every other trainable parameter, the cls and mask tokens included; the fixed pos_embed in none."""
    model = MaskedEEGAutoencoder(n_channels=8, n_times=64, embed_dim=32, depth=1, num_heads=4,
                                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    no_decay, decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_hand = {n: (0.0 if p.ndim <= 1 or n.endswith(".bias") else 0.05)
               for n, p in model.named_parameters() if p.requires_grad}
    grouped = {names[id(p)]: group["weight_decay"] for group in (no_decay, decay) for p in group["params"]}
    assert grouped == by_hand and sum(map(len, (no_decay["params"], decay["params"]))) == len(grouped)
    assert [names[id(p)] for p in decay["params"]] == [n for n, wd in by_hand.items() if wd]  # model order
    assert {"encoder.cls_token", "mask_token", "encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
            "decoder_pred.weight"} <= {n for n, wd in grouped.items() if wd}
    assert not any(n.endswith("bias") or "norm" in n for n, wd in grouped.items() if wd)
    assert len(grouped) == len(list(model.parameters())) - 1  # the fixed sin-cos pos_embed has no gradient


def test_figure_windows_are_fixed_and_leave_the_random_streams_alone(corpus, tmp_path):
    """The reconstruction figures draw their windows (random crops) seeded inside Lightning's isolate_rng:
    the same windows on every run, what seeding gives, and training's python/numpy/torch streams untouched."""
    dataset = EEGPretrainDataset(corpus, n_channels=8, n_times=64, write_record=False)
    trainer = SimpleNamespace(is_global_zero=True, train_dataloader=SimpleNamespace(dataset=dataset))  # what it reads
    windows = []
    for _ in range(2):
        seed_all(1)
        figures = stage1.ReconstructionFigures(tmp_path, every_n_epochs=1, n_samples=3, n_channels=2, seed=7)
        figures.on_train_start(trainer, None)
        windows.append(figures.eeg)
        after = (torch.rand(1), np.random.rand(), random.random())
        seed_all(1)
        assert after == (torch.rand(1), np.random.rand(), random.random())
    seed_all(7)
    assert torch.equal(windows[0], windows[1]) and torch.equal(windows[0], torch.stack([dataset[i]["eeg"] for i in range(3)]))


def test_warmup_then_half_cosine_per_optimiser_step():
    """The schedule the stage-1 module builds: linear warm-up over warmup_epochs, half-cosine to min_lr."""
    from types import SimpleNamespace

    from dreamdiffusion.train.stage1 import MAEPretrainModule

    cfg = STAGE1.build_config(overrides=["encoder.n_channels=8", "encoder.n_times=64", "encoder.embed_dim=32",
                                         "encoder.depth=1", "encoder.num_heads=4", "decoder.decoder_embed_dim=16",
                                         "decoder.decoder_depth=1", "decoder.decoder_num_heads=2", "lr=1e-3",
                                         "min_lr=1e-4", "epochs=11", "warmup_epochs=1"])
    from dreamdiffusion.config import to_container

    module = MAEPretrainModule(to_container(cfg))
    module._trainer = SimpleNamespace(estimated_stepping_batches=110, max_epochs=11, world_size=1,
                                      accumulate_grad_batches=1)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [f(step) for step in range(111) for f in scheduler.lr_lambdas]  # one parameter group each
    factor = dict(zip(range(111), factors[::len(scheduler.lr_lambdas)]))
    assert factor[0] == 0 and factor[5] == 0.5 and factor[10] == 1.0  # 10 steps per epoch, 1 warm-up epoch
    assert math.isclose(factor[60], 0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert math.isclose(factor[110], 0.1)  # min_lr / lr


@pytest.mark.parametrize("preset", ["large", "small"])
def test_encoder_preset_files_match_the_code(preset):
    from dreamdiffusion.config import build_config
    from dreamdiffusion.models.mae import ENCODER_PRESETS

    cfg = build_config(Stage1Config, [f"configs/presets/encoder_{preset}.yaml"])
    assert {k: cfg.encoder[k] for k in ENCODER_PRESETS[preset]} == ENCODER_PRESETS[preset]


def test_authors_code_fidelity_sets_their_values_under_the_users():
    cfg = STAGE1.build_config(overrides=["fidelity=authors_code"])
    assert (cfg.mask_ratio, cfg.batch_size, cfg.epochs, cfg.lr, cfg.grad_clip) == (0.1, 100, 500, 2.5e-4, 0.8)
    assert cfg.trainer.precision == "16-mixed" and cfg.encoder.patch_embed_init == "normal"
    # the user's own values still win over the switch, wherever they come from
    cfg = STAGE1.build_config(overrides=["mask_ratio=0.5", "fidelity=authors_code"])
    assert cfg.mask_ratio == 0.5 and cfg.encoder.patch_embed_init == "normal"
