"""The stage-2 script end to end on synthetic ImageNet-EEG files with tiny models in the real formats:
train, validate (loss, images, top-1), checkpoint, resume, export - and the early failures."""

import csv
import json
import os

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
    # the folder is a diffusers pipeline with its model card (the val figures of the exported epoch)
    assert json.loads((out / "model" / "model_index.json").read_text())["_class_name"] == "DreamDiffusionPipeline"
    card = (out / "model" / "README.md").read_text()
    assert "## Validation figures" in card and f"| exported epoch | {selection['epoch']} |" in card

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


def test_the_clip_cache_gives_the_numbers_the_step_computes_and_is_reused(world, caplog):
    """Work done once: the CLIP embeddings of the un-augmented images are computed when the fit starts,
    kept in <output_dir>/cache, and the run's losses are those of the per-step computation."""
    import logging

    from PIL import Image
    from safetensors import safe_open

    from dreamdiffusion.dataset import paired_dataset
    from dreamdiffusion.models.clip_embedder import load_clip_image_encoder

    common = world["overrides"] + ["epochs=1", "classifier=null", "trainer.precision=32"]
    per_step, cached = world["root"] / "per_step", world["root"] / "cached"
    stage2_main(common + [f"output_dir={per_step}", "cache_clip_embeddings=false"])
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.stage2_cache"):
        stage2_main(common + [f"output_dir={cached}"])
    assert not (per_step / "cache").exists()
    [cache_file] = (cached / "cache").glob("clip_embeds-*.safetensors")
    assert "clip_embeds of 16 images computed" in caplog.text  # the images of the train and val splits
    a, b = _rows(per_step / "metrics.csv")[0], _rows(cached / "metrics.csv")[0]
    for term in ("train_loss", "train_clip", "val_loss", "val_clip"):
        assert float(a[term]) == pytest.approx(float(b[term]), rel=1e-5, abs=1e-7), term

    # the cached rows are the CLIP tower's outputs on each image's own preprocessing
    clip_path = next(o.split("=", 1)[1] for o in world["overrides"] if o.startswith("clip_path="))
    encoder = load_clip_image_encoder(clip_path)
    data_cfg = stage2.resolved(stage2.STAGES["stage2"].build_config(overrides=common)).data
    dataset = paired_dataset(data_cfg, "train")
    with safe_open(str(cache_file), framework="pt") as f:
        rows, names = f.get_tensor("rows"), json.loads(f.metadata()["names"])
    for i in range(0, len(dataset), 5):
        path = str(dataset.image_path(i))
        pixels = encoder.preprocess(Image.open(path).convert("RGB"))
        with torch.no_grad():
            expected = encoder(pixels[None])[0]
        torch.testing.assert_close(rows[names.index(path)], expected, rtol=1e-5, atol=1e-6)

    # a second run with the same cache folder reads it; a changed image gives another file
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.stage2_cache"):
        stage2_main(common + [f"output_dir={world['root'] / 'again'}", f"cache_dir={cached / 'cache'}"])
    assert f"clip_embeds of 16 images read from {cache_file}" in caplog.text
    image = names[0]
    os.utime(image)
    stage2_main(common + [f"output_dir={world['root'] / 'touched'}", f"cache_dir={cached / 'cache'}"])
    assert len(list((cached / "cache").glob("clip_embeds-*.safetensors"))) == 2


def test_cache_latents_turns_the_crop_off_and_says_so(world):
    out = world["root"] / "latents"
    stage2_main(world["overrides"] + [f"output_dir={out}", "epochs=1", "classifier=null", "cache_latents=true"])
    assert len(list((out / "cache").glob("latent_moments-*.safetensors"))) == 1
    assert len(list((out / "cache").glob("clip_embeds-*.safetensors"))) == 1
    config = (out / "config.yaml").read_text()
    assert "cache_latents true: paper not stated, authors' code false" in config
    assert float(_rows(out / "metrics.csv")[0]["train_loss"]) > 0


def test_selection_audit_keeps_test_scores_aside_and_reports_the_authors_pick(world):
    out = world["root"] / "audited"
    args = world["overrides"] + [f"output_dir={out}", "epochs=2", "selection_audit=true", "audit_trials=2",
                                 "audit_slots=2"]
    assert stage2.main(args) == out
    audit = json.loads((out / "selection_audit.json").read_text())
    assert [r["epoch"] for r in audit["epochs"]] == [0, 1] and all(len(r["per_slot"]) == 2 for r in audit["epochs"])
    assert "first 2 test trials" in audit["rule"]
    # never used to choose: the export is the best val top-1 of metrics.csv, whatever the test figures say
    rows = _rows(out / "metrics.csv")
    selection = json.loads((out / "model" / "selection.json").read_text())
    assert selection["monitor"] == "val/top1" and not any("audit" in k or "test" in k for k in rows[0])
    best_val = max(float(r["val_top1"]) for r in rows)
    assert float(rows[selection["epoch"]]["val_top1"]) == best_val
    summary = audit["summary"]
    by_epoch = {r["epoch"]: r["best_slot"] for r in audit["epochs"]}
    assert summary["test_picked_figure"] == max(by_epoch.values()) == by_epoch[summary["test_picked_epoch"]]
    assert summary["val_picked_epoch"] == selection["epoch"]
    assert summary["inflation"] == pytest.approx(summary["test_picked_figure"] - by_epoch[selection["epoch"]])
    assert json.loads((out / "metrics.json").read_text())["summary"]["selection_audit"] == summary
    assert "selection audit: inflation from choosing on test" in (out / "results.md").read_text()


def test_selection_audit_needs_a_classifier(world, capsys):
    from dreamdiffusion.core.errors import run_cli

    out = world["root"] / "audit_without_classifier"
    assert run_cli(stage2.main, world["overrides"] + [f"output_dir={out}", "selection_audit=true",
                                                     "classifier=null"]) == 2
    assert "selection_audit=true scores test images with the n-way classifier" in capsys.readouterr().err
