"""`make demo`: the quick variant end to end (world -> stage 1 -> stage 2 x4 -> stage 3 x5), and the
demo world's stand-ins in the formats the stage scripts load."""

import json

import pytest
import torch

from conftest import load_script


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo = load_script("demo")
    dirs = {name: root / name for name in ("datasets", "pretrains", "outputs", "results", "assets")}
    summary = demo.main(["--quick", "--no-progress", *(f"--{k}-dir={v}" for k, v in dirs.items())])
    return summary, dirs


def test_quick_demo_writes_the_promised_files(quick_demo):
    summary, dirs = quick_demo
    results = dirs["results"]
    assert (results / "results.md").is_file()
    assert (results / "demo_grid.png").is_file()
    assert (dirs["assets"] / "demo_grid.png").read_bytes() == (results / "demo_grid.png").read_bytes()
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["n_way"] == 10 and metrics["chance"] == pytest.approx(0.1)
    assert set(metrics["runs"]) == {"full", "no_pretrain", "no_clip", "shuffled_labels", "class_oracle"}
    for name, run in metrics["runs"].items():
        assert 0.0 <= run["top1"] <= 1.0, name
        low, high = run["top1_ci"]
        assert low <= run["top1"] <= high, name
        assert "retrieval_top1" in run
    # the oracle uses no EEG, so it has no retrieval; every EEG model has one
    assert metrics["runs"]["class_oracle"]["retrieval_top1"] is None
    assert all(0.0 <= metrics["runs"][r]["retrieval_top1"] <= 1.0 for r in ("full", "no_clip", "shuffled_labels"))
    text = (results / "results.md").read_text()
    for name in metrics["runs"]:
        assert f"**{name}**" in text
    # each stage wrote its outputs where the demo said
    outputs = dirs["outputs"]
    assert (outputs / "stage1" / "eeg_encoder" / "model.safetensors").is_file()
    for run in ("full", "no_pretrain", "no_clip", "shuffled_labels"):
        assert (outputs / "stage2" / run / "model").is_dir()
    assert summary["runs"].keys() == metrics["runs"].keys()


def test_stage2_runs_differ_as_configured(quick_demo):
    _, dirs = quick_demo
    import yaml

    stage2 = dirs["outputs"] / "stage2"
    cfg = {run: yaml.safe_load((stage2 / run / "config.yaml").read_text())
           for run in ("full", "no_pretrain", "no_clip", "shuffled_labels")}
    assert cfg["no_pretrain"]["eeg_encoder_path"] is None and cfg["full"]["eeg_encoder_path"]
    assert cfg["no_clip"]["clip_weight"] == 0 and cfg["full"]["clip_weight"] == 1.0
    assert cfg["shuffled_labels"]["data"]["eeg_path"].endswith("shuffled_labels/eeg_5_95_std.pth")


def test_world_stand_ins_load_through_the_real_loaders(quick_demo):
    _, dirs = quick_demo
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from dreamdiffusion.classifier import load_classifier
    from dreamdiffusion.demo_world import PROMPT, class_names
    from dreamdiffusion.sd15 import load_sd15

    clip_dir = dirs["pretrains"] / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    text = CLIPTextModel.from_pretrained(clip_dir, local_files_only=True)
    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir, local_files_only=True)
    names = class_names(10)
    ids = tokenizer([PROMPT.format(n) for n in names], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (10, 77)
    # every word of a class name is one token (the tokenizer was trained on them)
    assert len(tokenizer.tokenize(names[0])) == len(names[0].split())
    sd = load_sd15(dirs["pretrains"] / "sd")
    assert sd.unet.config.cross_attention_dim == text.config.hidden_size
    assert vision.config.projection_dim > 0
    with torch.no_grad():
        states = text(ids).last_hidden_state
        latents = torch.randn(10, sd.unet.config.in_channels, 8, 8)
        eps = sd.unet(latents, torch.full((10,), 500), encoder_hidden_states=states).sample
    assert eps.shape == latents.shape
    classifier = load_classifier(str(dirs["pretrains"] / "classifier"))
    assert classifier.class_names == names
    assert classifier(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_shuffled_labels_copy_breaks_only_the_training_pairing(quick_demo):
    _, dirs = quick_demo
    original = torch.load(dirs["datasets"] / "eeg_5_95_std.pth", weights_only=True)
    shuffled = torch.load(dirs["datasets"] / "shuffled_labels" / "eeg_5_95_std.pth", weights_only=True)
    split = torch.load(dirs["datasets"] / "block_splits_by_image_single.pth", weights_only=True)["splits"][0]
    subject4 = [t for t in original["dataset"] if t["subject"] == 4]
    assert len(shuffled["dataset"]) == len(subject4)
    for p in split["test"]:
        assert shuffled["dataset"][p]["image"] == subject4[p]["image"]
    train = [p for p in split["train"] if p < len(subject4)]
    assert sorted(shuffled["dataset"][p]["image"] for p in train) == sorted(subject4[p]["image"] for p in train)
    assert any(shuffled["dataset"][p]["image"] != subject4[p]["image"] for p in train)
    for p in train:  # the EEG itself is untouched
        assert torch.equal(shuffled["dataset"][p]["eeg"], subject4[p]["eeg"])
