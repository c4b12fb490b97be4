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


def test_quick_demo_trained_stage1_in_the_background(quick_demo):
    summary, dirs = quick_demo
    # stage 1 ran as its own process (its log beside its output folder), started during the world build
    log = (dirs["outputs"] / "stage1.log").read_text()
    assert "stage 1" in summary["timings_s"] and "world" in summary["timings_s"]
    assert (dirs["outputs"] / "stage1" / "metrics.csv").read_text().count("\n") == 1 + 2  # header + 2 epochs
    assert "Traceback" not in log


def test_a_failing_stage_job_names_its_log_and_ends_the_phase(tmp_path):
    demo = load_script("demo")
    from dreamdiffusion.errors import DreamDiffusionError

    later = demo.ScriptJob("later", "stage1", [], tmp_path / "later", tmp_path / "later.log", epochs=1)
    bad = demo.ScriptJob("bad", "stage1", ["no_such_field=1"], tmp_path / "bad", tmp_path / "bad.log",
                         epochs=1)
    with pytest.raises(DreamDiffusionError, match=r"bad failed with exit code 2; see .*bad\.log"):
        demo.run_jobs([bad, later], parallel=1, desc="test", progress=False, timings={})
    assert "no_such_field" in (tmp_path / "bad.log").read_text()
    assert later.proc is None  # never started: the first failure ends the phase


def test_demo_tokenizer_is_the_same_in_every_process():
    # tokenizers' BpeTrainer broke ties in hash order: each world build got other token ids, hence
    # another tiny CLIP and SD (the SD's accuracy on its own class names moved from 40% to 16%)
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = ("from dreamdiffusion.demo_world import PROMPT, build_tokenizer_files, class_names; "
            "words = PROMPT.format('').split() + [w for n in class_names(20) for w in n.split()]; "
            "print(build_tokenizer_files(words))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO_ROOT / "code", env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1
