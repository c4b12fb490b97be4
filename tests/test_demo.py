"""`make demo`: the quick variant end to end (world -> stage 1 -> stage 2 x4 -> stage 3 x5), and the
demo world's stand-ins in the formats the stage scripts load."""

import json

import numpy as np
import pytest
import torch

from dreamdiffusion.tools.demo import main as demo_main  # what code/demo.py (`make demo`) calls


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    dirs = {name: root / name for name in ("datasets", "pretrains", "outputs", "results", "assets")}
    summary = demo_main(["--quick", "--no-progress", *(f"--{k}-dir={v}" for k, v in dirs.items())])
    return summary, dirs


def test_quick_demo_writes_the_promised_files_and_its_table_is_its_runs(quick_demo):
    summary, dirs = quick_demo
    results = dirs["results"]
    assert (results / "results.md").is_file() and (results / "demo_grid.png").is_file()
    assert (dirs["assets"] / "demo_grid.png").read_bytes() == (results / "demo_grid.png").read_bytes()
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["n_way"] == 10 and metrics["chance"] == pytest.approx(0.1)
    assert list(metrics["rows"]) == ["full", "no_pretrain", "no_clip", "shuffled_labels", "class_oracle"]
    for name, row in metrics["rows"].items():
        # each row's figures are exactly its stage-3 run's per-trial scores, summarised
        report = json.loads((dirs["outputs"] / "stage3" / name / "metrics.json").read_text())
        per_trial = np.array([t["n_way"] for t in report["trials"]])
        assert row["top1"] == pytest.approx(per_trial.mean()) and row["top1_per_slot"] == pytest.approx(per_trial.mean(0))
        low, high = row["top1_ci"]
        assert low <= row["top1"] <= high and row["n_trials"] == len(per_trial)
        if name != "class_oracle":
            assert row["retrieval_top1"] == pytest.approx(np.mean([t["retrieval"] for t in report["trials"]]))
    # the oracle uses no EEG, so it has no retrieval; rows with the pretrained encoder show its probe
    assert metrics["rows"]["class_oracle"]["retrieval_top1"] is None
    probe = metrics["probes"]["demo"]
    assert {(r["features"], r["probe"]) for r in probe["rows"]} == {
        (f, p) for f in ("encoder", "random_encoder", "raw_eeg") for p in ("linear", "knn")}
    assert metrics["rows"]["full"]["probe"]["encoder/linear"] == next(
        r["test"]["accuracy"] for r in probe["rows"] if (r["features"], r["probe"]) == ("encoder", "linear"))
    text = (results / "results.md").read_text()
    for name in metrics["rows"]:
        assert f"**{name}**" in text
    assert "## Encoder probe: demo" in text and "random_encoder" in text and "raw_eeg" in text
    assert (dirs["outputs"] / "stage1" / "demo" / "eeg_encoder" / "model.safetensors").is_file()
    assert summary["rows"].keys() == metrics["rows"].keys()


def test_a_second_run_skips_the_finished_runs(quick_demo):
    summary, dirs = quick_demo
    args = ["--quick", "--no-progress", *(f"--{k}-dir={v}" for k, v in dirs.items())]
    stamps = {p: p.stat().st_mtime_ns for p in dirs["outputs"].rglob("metrics.json")}
    again = demo_main(args)
    assert {p: p.stat().st_mtime_ns for p in dirs["outputs"].rglob("metrics.json")} == stamps
    assert again["rows"]["full"]["top1"] == summary["rows"]["full"]["top1"]


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

    from dreamdiffusion.models.classifier import load_classifier
    from dreamdiffusion.models.sd15 import load_sd15
    from dreamdiffusion.tools.demo_world import PROMPT, class_names

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
    log = (dirs["outputs"] / "stage1" / "demo.log").read_text()
    assert "stage1/demo" in summary["timings_s"] and "world" in summary["timings_s"]
    rows = (dirs["outputs"] / "stage1" / "demo" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + 2 epochs
    assert rows[-1].split(",")[rows[0].split(",").index("probe_val_acc")] != ""  # the probe monitor ran
    assert "Traceback" not in log


def test_a_failing_run_names_its_log_and_ends_the_phase(tmp_path):
    from dreamdiffusion.core.errors import DreamDiffusionError
    from dreamdiffusion.tools.grid import GridRunner, Run

    bad = Run("stage1/bad", "stage1", ["no_such_field=1"], tmp_path / "stage1" / "bad")
    later = Run("stage1/later", "stage1", [], tmp_path / "stage1" / "later")
    runner = GridRunner([bad, later], jobs=1, progress=False, log=lambda _: None)
    with pytest.raises(DreamDiffusionError, match=r"stage1/bad failed with exit code 2; see .*bad\.log"):
        runner.run(poll_s=0.1)
    assert "no_such_field" in (tmp_path / "stage1" / "bad.log").read_text()
    assert runner.pending["stage1"][1].proc is None  # never started: the first failure ends the phase


def test_demo_tokenizer_is_the_same_in_every_process():
    # tokenizers' BpeTrainer broke ties in hash order: each world build got other token ids, hence
    # another tiny CLIP and SD (the SD's accuracy on its own class names moved from 40% to 16%)
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = ("from dreamdiffusion.tools.demo_world import PROMPT, build_tokenizer_files, class_names; "
            "words = PROMPT.format('').split() + [w for n in class_names(20) for w in n.split()]; "
            "print(build_tokenizer_files(words))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO_ROOT / "code", env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1
