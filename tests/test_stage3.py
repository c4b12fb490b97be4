"""Stage 3 end to end on tiny real models and the synthetic ImageNet-EEG files: the files it writes,
seeded reproducibility, hand-computed scores, the authors' checkpoint format, controls, bad input."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from conftest import load_script
from dreamdiffusion.classifier import save_local_classifier
from dreamdiffusion.errors import run_cli
from dreamdiffusion.evaluate import Evaluator
from dreamdiffusion.io import atomic_torch_save
from dreamdiffusion.sd15 import save_compvis_checkpoint
from dreamdiffusion.synthetic import write_synthetic_imagenet_eeg
from stage2_tiny import ENCODER, tiny_model, tiny_sd

stage3 = load_script("stage3_generate_eval")
N_SLOTS = 2


class Config_Generative_Model:  # noqa: N801 - the authors' class name, pickled into their checkpoints
    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def _tiny_clip_folder(path):
    """A CLIPModel folder (text width 32 = the tiny UNet's cross-attention; projection 16 = the
    tiny CLIP head) with a byte-level tokenizer that needs no vocabulary download."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(path)
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, projection_dim=16)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    return path


def _write_authors_checkpoint(model, path):
    """`model` in the layout of the authors' released `checkpoint.pth` (eeg_ldm.py)."""
    sd_file = save_compvis_checkpoint(model.unet, model.vae, path.parent / "_compvis.ckpt")
    state = dict(torch.load(sd_file, weights_only=True)["state_dict"])
    rename = {"encoder.": "cond_stage_model.mae.", "channel_mapper.": "cond_stage_model.channel_mapper.",
              "dim_mapper.": "cond_stage_model.dim_mapper.", "clip_head.0.": "cond_stage_model.mapping.maxpool.",
              "clip_head.1.": "cond_stage_model.mapping.fc.", "time_cond.": "model.diffusion_model.time_embed_condtion."}
    for key, tensor in model.conditioner.state_dict().items():
        prefix = next(p for p in rename if key.startswith(p))
        state[rename[prefix] + key[len(prefix):]] = tensor.clone()
    enc = model.conditioner.encoder.config
    config = Config_Generative_Model(embed_dim=enc["embed_dim"], depth=enc["depth"], num_heads=enc["num_heads"],
                                     patch_size=enc["patch_size"], mlp_ratio=enc["mlp_ratio"], img_size=16)
    atomic_torch_save({"model_state_dict": state, "config": config, "state": torch.get_rng_state()}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    data = write_synthetic_imagenet_eeg(root / "data", n_classes=4, images_per_class=4, n_subjects=1,
                                        image_size=32, split_fractions=(0.5, 0.2, 0.3))
    model = tiny_model(seed=0, clip=None)
    model.save_pretrained(root / "model")
    (root / "model" / "selection.json").write_text(json.dumps({"split": "val", "metric": "val n-way", "epoch": 3}))
    _write_authors_checkpoint(model, root / "authors" / "checkpoint.pth")
    from stage2_tiny import tiny_sd_configs, write_config_dir

    write_config_dir(root / "sd_config", *tiny_sd_configs())
    base = tiny_sd(seed=5, time_cond=False)
    for name in ("unet", "vae"):
        getattr(base, name).save_pretrained(root / "base_sd" / name)
    base.noise_scheduler.save_pretrained(root / "base_sd" / "scheduler")
    _tiny_clip_folder(root / "clip")
    torch.manual_seed(0)
    save_local_classifier(timm.create_model("test_vit", num_classes=10, img_size=32), root / "classifier",
                          "test_vit", {"num_classes": 10, "img_size": 32}, 32, [0.5] * 3, [0.5] * 3,
                          [f"class {i}" for i in range(10)])
    args = [
        f"model={root / 'model'}", f"data.eeg_path={data['eeg_path']}", f"data.splits_path={data['splits_path']}",
        f"data.image_dir={data['image_dir']}", "data.subject=1", f"data.n_times={ENCODER['n_times']}",
        f"classifier={root / 'classifier'}", "classifier_weights=null", f"clip_path={root / 'clip'}",
        f"num_images_per_eeg={N_SLOTS}", "num_inference_steps=2", "batch_size=3", "bootstrap_samples=50",
        "n_way=5", "n_grid_trials=2", f"sd_config_dir={root / 'sd_config'}",
    ]
    return {"root": root, "data": data, "args": args}


def _run(world, out, *extra):
    return stage3.main([*world["args"], f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def run_a(world):
    out = world["root"] / "run_a"
    return out, _run(world, out)


def test_end_to_end_writes_the_promised_files_and_is_seeded(world, run_a):
    out, report = run_a
    n = report["protocol"]["n_trials"]
    assert n >= 3 and report["protocol"]["n_generated_images"] == n * N_SLOTS
    for i in range(n):
        for k in range(N_SLOTS + 1):
            assert (out / "images" / f"test{i}-{k}.png").is_file()
    assert len(list((out / "grids").glob("grid-*.png"))) == -(-n // 2)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["metrics"]) >= {"n_way", "top1_agreement", "mse", "pcc", "ssim", "clip_similarity", "retrieval"}
    assert set(saved["skipped"]) == set()
    assert len(saved["metrics"]["n_way"]["per_slot"]) == N_SLOTS and len(saved["trials"]) == n
    per_trial = np.array([t["n_way"] for t in saved["trials"]])  # [n_trials, n_slots]
    assert saved["metrics"]["n_way"]["per_slot"] == pytest.approx(per_trial.mean(axis=0).tolist())
    assert saved["metrics"]["retrieval"]["n_way"] == min(5, len({t["image_name"] for t in saved["trials"]}))
    assert saved["metrics"]["retrieval"]["mean"] == pytest.approx(np.mean([t["retrieval"] for t in saved["trials"]]))
    assert "val" in saved["protocol"]["checkpoint_selection"]
    md = (out / "results.md").read_text()
    assert "5-way top-1 (mean over 2 slots)" in md and "## Protocol" in md and "plms" in md
    assert "**subject**: 1" in md and "**split**: test" in md and "exact expectation" in md
    assert (out / "config.yaml").is_file()
    # the ground truth is saved as slot 0, at the model's output size
    gt = np.asarray(Image.open(out / "images" / "test0-0.png"))
    assert gt.shape == (16, 16, 3)
    # same seed, different batching and a shorter run: identical images
    out_b = world["root"] / "run_b"
    _run(world, out_b, "batch_size=2", "max_trials=2", "metrics=[mse]")
    for i in range(2):
        for k in range(N_SLOTS + 1):
            a = np.asarray(Image.open(out / "images" / f"test{i}-{k}.png")).astype(int)
            b = np.asarray(Image.open(out_b / "images" / f"test{i}-{k}.png")).astype(int)
            assert np.abs(a - b).max() <= 1  # batched convolutions may differ in the last float bit
    out_c = world["root"] / "run_c"
    _run(world, out_c, "seed=7", "max_trials=1", "metrics=[mse]")
    assert not np.array_equal(np.asarray(Image.open(out / "images" / "test0-1.png")),
                              np.asarray(Image.open(out_c / "images" / "test0-1.png")))


class _ColourClassifier(nn.Module):
    """4 classes scored by an image's mean red, green, blue and a constant 0: a hand-checkable classifier."""

    def forward(self, images):
        means = images.mean(dim=(2, 3))  # [B, 3] in [-1, 1]
        return torch.cat([means, torch.zeros(len(images), 1)], dim=1).mul(10).softmax(dim=1)


def _solid(r, g, b, size=8):
    return torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1).expand(3, size, size)


def test_evaluation_reproduces_hand_computed_numbers():
    red, green = _solid(1, -1, -1), _solid(-1, 1, -1)
    mixed = _solid(0.5, 0.6, -1)  # green slightly above red; blue and the constant below
    reference = torch.stack([red, red])
    generated = torch.stack([torch.stack([red, green, mixed]), torch.stack([mixed, red, green])])
    ev = Evaluator(["n_way", "mse"], classifier=_ColourClassifier(), n_way=3)
    ev.update(reference, generated)
    res = ev.compute(n_bootstrap=10)
    # 3-way = 2 distractors of the 3 other classes. red: all 3 below -> 1. green: green and the
    # constant above, blue tied (counts above) -> 0. mixed: 1 above, 2 below -> C(2,2)/C(3,2) = 1/3.
    assert ev.per_image()["n_way"] == pytest.approx(np.array([[1, 0, 1 / 3], [1 / 3, 1, 0]]))
    assert res["n_way"]["per_slot"] == pytest.approx([2 / 3, 1 / 2, 1 / 6])
    assert res["n_way"]["mean"] == pytest.approx(4 / 9)
    assert res["n_way"]["best_slot"] == pytest.approx(2 / 3) and res["n_way"]["best_slot_index"] == 0
    assert res["top1_agreement"]["per_slot"] == pytest.approx([0.5, 0.5, 0.0])
    # MSE on uint8 pixels scaled to [0, 1]: red vs green = (1 + 1 + 0) / 3; mixed is (191, 204, 0)
    # after rounding (0.5 -> 191.25, 0.6 -> 204), so red vs mixed = ((255-191)^2 + 204^2) / 3 / 255^2
    mixed_mse = (64**2 + 204**2) / 3 / 255**2
    assert ev.per_image()["mse"] == pytest.approx(np.array([[0, 2 / 3, mixed_mse], [mixed_mse, 0, 2 / 3]]))


def test_authors_checkpoint_runs_through_stage3_like_our_folder(world, run_a):
    out = world["root"] / "run_authors"
    report = _run(world, out, f"model={world['root'] / 'authors' / 'checkpoint.pth'}", "max_trials=2",
                  "metrics=[n_way,mse]")
    assert "authors" in report["protocol"]["model"] and "TEST split" in report["protocol"]["checkpoint_selection"]
    ours = run_a[1]
    # the same weights in the authors' layout generate the same images
    for i in range(2):
        a = np.asarray(Image.open(out / "images" / f"test{i}-1.png")).astype(int)
        b = np.asarray(Image.open(run_a[0] / "images" / f"test{i}-1.png")).astype(int)
        assert np.abs(a - b).max() <= 1
    assert report["trials"][0]["n_way"] == pytest.approx(ours["trials"][0]["n_way"], abs=1e-6)


class _MeanColour(nn.Module):
    """A tiny FID/IS feature network on uint8 images: per-channel mean and std."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_given_metric_networks_and_skipped_metrics(world):
    from dreamdiffusion.config import Stage3Config, build_config
    from dreamdiffusion.evaluate import run_stage3

    out = world["root"] / "run_fid"
    cfg = build_config(Stage3Config, overrides=[*world["args"], f"output_dir={out}", "save_images=false",
                                                "metrics=[fid,lpips]", "classifier=unused"])
    report = run_stage3(cfg, extra_networks={"fid_features": _MeanColour()})
    assert report["metrics"]["fid"]["fid"] >= 0 and {"is_mean", "kid_mean"} <= set(report["metrics"]["fid"])
    assert "lpips_weights" in report["skipped"]["lpips"]  # no weights: skipped with the reason, not a number
    assert "lpips" in (out / "results.md").read_text() and not (out / "images").exists()


def test_controls_shuffled_labels_and_class_oracle(world):
    out = world["root"] / "run_shuffled"
    report = _run(world, out, "shuffled_labels=true", "metrics=[n_way]", "save_images=false")
    assert all(t["reference_wnid"] != t["wnid"] for t in report["trials"])
    assert "shuffled" in (out / "results.md").read_text()
    out = world["root"] / "run_oracle"
    report = _run(world, out, "class_oracle=true", f"oracle_sd_path={world['root'] / 'base_sd'}",
                  f"class_names_path={world['data']['class_names_path']}", "max_trials=2",
                  "metrics=[n_way,retrieval]", "guidance_scale=3", "null_condition=learned")
    assert "oracle" in report["protocol"]["method"] and "retrieval" in report["skipped"]
    assert (out / "images" / "test1-2.png").is_file()


@pytest.mark.parametrize("extra", [
    ["model=/nonexistent/model"],
    ["sampler=euler"],
    ["metrics=[n_way,accuracy]"],
    ["no_such_key=1"],
    ["split=holdout"],
    ["n_way=50"],  # the tiny classifier knows 10 classes
    ["null_condition=random"],
    ["class_oracle=true", "shuffled_labels=true"],
    ["classifier=timm_missing_folder"],
    ["data.eeg_path=/nonexistent/eeg.pth"],
])
def test_bad_input_exits_with_code_2(world, extra, capsys):
    out = world["root"] / "run_bad"
    assert run_cli(stage3.main, [*world["args"], f"output_dir={out}", *extra]) == 2
    assert "error:" in capsys.readouterr().err


def test_download_weights_offline_says_what_to_place_where(tmp_path, monkeypatch, capsys):
    download = load_script("download_weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli(download.main, ["--root", str(tmp_path), "--only", "classifier", "--only", "clip"]) == 2
    out = capsys.readouterr().out
    assert "vit_h_14_swag-80465313.pth" in out and "pretrains/classifiers/vit_h_14_swag_e2e_v1.pth" in out
    assert "openai/clip-vit-large-patch14" in out
    # the paths are the config defaults
    from dreamdiffusion.config import Stage2Config, Stage3Config

    assert download.WEIGHTS["classifier"].path == Stage3Config.classifier_weights
    assert download.WEIGHTS["sd15"].path == Stage2Config.sd_path == Stage3Config.oracle_sd_path
    assert download.WEIGHTS["clip"].path == Stage2Config.clip_path == Stage3Config.clip_path
    target = tmp_path / download.WEIGHTS["classifier"].path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    assert run_cli(download.main, ["--root", str(tmp_path), "--check", "--only", "classifier"]) == 0


def test_retrieval_against_a_clip_of_another_width_is_refused(world, tmp_path, capsys):
    """The CLIP head is only comparable with the CLIP it was trained against; a wrong one used to
    crash inside a matrix product."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=24)).save_pretrained(tmp_path / "clip24")
    out = world["root"] / "run_wrong_clip"
    args = [*world["args"], f"output_dir={out}", f"clip_path={tmp_path / 'clip24'}", "metrics=[retrieval]"]
    assert run_cli(stage3.main, args) == 2
    err = capsys.readouterr().err
    assert "retrieval" in err and "16" in err and "24" in err
