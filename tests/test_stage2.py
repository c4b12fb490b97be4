"""The stage-2 script end to end on synthetic ImageNet-EEG files with tiny models in the real formats:
train, validate (loss, images, top-1), checkpoint, resume, export - and the early failures."""

import csv
import json

import pytest
import torch

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion
from dreamdiffusion.models.mae import save_eeg_encoder
from dreamdiffusion.models.original_formats import save_compvis_checkpoint
from dreamdiffusion.train import stage2
from dreamdiffusion.train.stage2 import main as stage2_main
from stage2_tiny import (
    CLIP_IMAGE_SIZE,
    ENCODER,
    IMAGE_SIZE,
    tiny_clip_model,
    tiny_encoder,
    tiny_sd,
    tiny_sd_configs,
    write_config_dir,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import timm

    from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg
    from dreamdiffusion.models.classifier import save_local_classifier

    root = tmp_path_factory.mktemp("stage2")
    data = write_synthetic_imagenet_eeg(root / "data", n_classes=4, images_per_class=5, n_subjects=1,
                                        image_size=IMAGE_SIZE, seed=0)
    sd = tiny_sd(seed=0)
    sd_file = save_compvis_checkpoint(sd.unet, sd.vae, root / "sd" / "tiny-v1-5.safetensors")
    config_dir = write_config_dir(root / "sd_config", *tiny_sd_configs())
    clip_dir = root / "clip"
    tiny_clip_model().save_pretrained(clip_dir)
    encoder_dir = save_eeg_encoder(tiny_encoder(), root / "eeg_encoder")
    torch.manual_seed(0)
    classifier = save_local_classifier(timm.create_model("test_resnet", num_classes=6), root / "classifier",
                                       "test_resnet", {"num_classes": 6}, image_size=32,
                                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    overrides = [
        f"data.eeg_path={data['eeg_path']}", f"data.splits_path={data['splits_path']}",
        f"data.image_dir={data['image_dir']}", "data.subject=1", f"data.image_size={IMAGE_SIZE}",
        f"data.clip_image_size={CLIP_IMAGE_SIZE}", f"data.n_times={ENCODER['n_times']}",
        f"sd_path={sd_file}", f"sd_config_dir={config_dir}", f"clip_path={clip_dir}",
        f"eeg_encoder_path={encoder_dir}", "batch_size=4", "val_every_n_epochs=1", "sample_every_n_epochs=2",
        "n_val_samples=2", "val_inference_steps=2", f"classifier={classifier}", "n_way=3",
        "trainer.accelerator=cpu", "trainer.num_workers=0", "trainer.progress_bar=false",
        "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
    ]
    return {"root": root, "overrides": overrides}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_trains_validates_checkpoints_resumes_and_exports(world):
    script = stage2
    out = world["root"] / "run"
    args = world["overrides"] + [f"output_dir={out}"]
    assert script.main(args + ["epochs=2"]) == out

    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(float(r["train_loss"]) > 0 and float(r["val_diffusion"]) > 0 for r in rows)
    # with a classifier the val top-1 is computed at every validation (it picks best.ckpt); the image
    # grid only every sample_every_n_epochs
    assert all(0 <= float(r["val_top1"]) <= 1 for r in rows)
    assert (out / "samples" / "epoch_0002.png").is_file() and not (out / "samples" / "epoch_0001.png").exists()
    for name in ("last.ckpt", "best.ckpt"):
        assert (out / "checkpoints" / name).is_file()
    assert "unet.cross_attention" in (out / "trainable_parameters.txt").read_text()
    assert (out / "config.yaml").is_file()

    # a checkpoint holds only what trains: no frozen UNet/VAE/CLIP weights
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and not any(k.startswith(("model.vae.", "model.clip_encoder.")) for k in keys)
    assert all(".attn2." in k or ".norm2." in k for k in keys if k.startswith("model.unet."))
    # the export is the checkpoint chosen on val (best.ckpt), and says so for stage 3
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    exported = DreamDiffusion.from_pretrained(out / "model")
    trained_unet = exported.unet.state_dict()
    for k, v in best["state_dict"].items():
        if k.startswith("model.unet."):
            assert torch.equal(trained_unet[k[len("model.unet."):]], v)
    selection = json.loads((out / "model" / "selection.json").read_text())
    assert selection["export"] == "best" and selection["chosen_on"] == "val"
    assert selection["epoch"] in (0, 1) and selection["monitor"] == "val/top1"

    # resume: one more epoch continues from last.ckpt and keeps the earlier rows
    assert script.main(args + ["epochs=3", "resume=true"]) == out
    assert [r["epoch"] for r in _rows(out / "metrics.csv")] == ["0", "1", "2"]
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 6  # epoch index 2 = the third epoch


@pytest.mark.parametrize("missing, expected", [
    ("clip_path", r"CLIP image encoder not found at .*nowhere.*openai/clip-vit-large-patch14"),
    ("sd_path", r"Stable Diffusion 1.5 weights not found at .*nowhere.*v1-5-pruned.*pretrains/README.md"),
])
def test_missing_pretrained_files_fail_before_training(world, capsys, missing, expected):
    import re

    script = stage2
    out = world["root"] / f"missing_{missing}"
    args = world["overrides"] + [f"output_dir={out}", "epochs=1", f"{missing}={world['root'] / 'nowhere'}"]
    assert run_cli(script.main, args) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not out.exists()  # nothing was written: it failed before training


@pytest.mark.parametrize("fidelity", ["paper", "authors_code"])
def test_each_mode_writes_its_deviations_and_trains_its_set(world, fidelity):
    out = world["root"] / f"mode_{fidelity}"
    # the tiny world runs on the CPU in fp32 and needs its own sizes, whatever the mode says
    args = world["overrides"] + [f"output_dir={out}", "epochs=1", f"fidelity={fidelity}", "trainer.precision=32",
                                 "batch_size=4", "data.subject=1", f"data.image_size={IMAGE_SIZE}"]
    stage2_main(args)
    header = (out / "config.yaml").read_text().split("\n# ")[0]
    report = json.loads((out / "metrics.json").read_text())
    lines = [d["line"] for d in report["deviations"]]
    md = (out / "results.md").read_text()
    trainable_line = next(line for line in lines if line.startswith("trainable "))
    assert trainable_line.startswith(f"trainable {fidelity}:")
    assert "epochs 1: paper 300, authors' code 500" in " ".join(lines)  # a shortened run says so
    assert all(line in md for line in lines) and all(line in (out / "config.yaml").read_text() for line in lines)
    assert header.startswith("# Deviations of this run")
    table = (out / "trainable_parameters.txt").read_text()
    clip_row = next(r for r in table.splitlines() if r.startswith("clip"))
    assert (int(clip_row.split()[1].replace(",", "")) > 0) == (fidelity == "authors_code")
    training = json.loads((out / "model" / "training.json").read_text())
    assert training["deviations"] == report["deviations"] and training["config"]["fidelity"] == fidelity
