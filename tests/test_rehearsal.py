"""The rehearsal's code path at toy sizes (`make rehearsal` runs it at the paper's sizes), and the
memory accounting against a hand count."""

import json

import torch
from torch import nn

from dreamdiffusion.core.memory import (
    ALLOCATOR_MARGIN,
    MemoryEstimate,
    advice,
    estimate,
    kept_activation_bytes,
)
from dreamdiffusion.tools.rehearsal import main
from stage2_tiny import tiny_sd_configs, write_config_dir


def test_saved_activations_are_what_autograd_keeps_counted_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
    x = torch.randn(7, 10)
    # Linear 1 keeps its input x [7, 10]; ReLU keeps its output [7, 20], which Linear 2 keeps too
    # (the same storage, counted once); the weights are parameters, not activations.
    kept = kept_activation_bytes(model, lambda: model(x).sum())
    assert (kept.saved, kept.other) == (7 * (10 + 20) * 4, 0)
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradients
    est = estimate(model, lambda n: model(torch.randn(n, 10)).sum(), "32-true", False)
    assert (est.activations_per_sample, est.activations_fixed) == (30 * 4, 0)
    n_params = sum(p.numel() for p in model.parameters())
    assert (est.weights, est.gradients, est.optimizer) == (n_params * 4, n_params * 4, n_params * 8)
    # at the step's worst moment: the kept activations or more (the backward's activation gradients),
    # with every gradient; then the allocator margin (no CUDA context on the CPU)
    assert 3 * 120 <= est.step_activations(3) - n_params * 4 <= 2 * 3 * 120 + est.step_peak_fixed
    assert est.peak(3) == int((n_params * 12 + est.step_activations(3)) * (1 + ALLOCATOR_MARGIN))


def test_advice_names_the_settings_to_change():
    est = MemoryEstimate(weights=10, gradients=2, optimizer=4, activations_per_sample=5, activations_fixed=1,
                         precision="32-true", gradient_checkpointing=False)
    assert advice(est, batch=2, device_bytes=100) is None
    # 17 fixed + 5 per sample, times 1 + the allocator margin: 4 samples fit in 44 bytes, 5 do not
    text = advice(est, batch=20, device_bytes=44)
    assert "gradient_checkpointing=true" in text and "bf16-mixed" in text
    assert "batch_size=4 with trainer.accumulate_grad_batches=5" in text
    assert est.fitting_batch(44) == 4


def test_the_rehearsal_runs_every_stage_and_reports_each(tmp_path):
    config_dir = write_config_dir(tmp_path / "sd_config", *tiny_sd_configs())
    dirs = {name: tmp_path / name for name in ("pretrains", "datasets", "outputs", "results")}
    report = main(["--tiny", "--sd-config-dir", str(config_dir), *(f"--{k}-dir={v}" for k, v in dirs.items())])
    assert [row["stage"].split(" (")[0] for row in report["stages"]] == ["stage 1", "stage 2"] + ["stage 3"] * 3
    for row in report["stages"]:
        assert row["ok"], row
        assert row["seconds_per_step"] > 0 and row["peak_rss_gib"] > 0 and row["projected_hours"] > 0
    saved = json.loads((dirs["results"] / "rehearsal.json").read_text())
    assert saved["sources"] == {k: "stand-in" for k in ("sd", "clip", "classifier", "corpus", "data", "authors")}
    settings = {(r["stage"], r["precision"], r["gradient_checkpointing"]) for r in saved["memory"]}
    assert ("stage 2", "bf16-mixed", True) in settings and ("stage 1", "32-true", False) in settings
    md = (dirs["results"] / "rehearsal.md").read_text()
    assert "| stage 3 (the authors'-format checkpoint) | ok |" in md and "fits 24 GB" in md
    # stage 2 printed its computed peak next to the device's memory at start-up
    log = (dirs["outputs"] / "logs" / "stage2.log").read_text()
    assert "stage 2 memory (computed):" in log and "GiB" in log
    stamps = {p: p.stat().st_mtime_ns for p in dirs["pretrains"].rglob("*") if p.is_file()}
    main(["--tiny", "--sd-config-dir", str(config_dir), *(f"--{k}-dir={v}" for k, v in dirs.items())])
    assert {p: p.stat().st_mtime_ns for p in dirs["pretrains"].rglob("*") if p.is_file()} == stamps  # reused
