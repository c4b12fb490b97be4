"""`make rehearsal`: every stage at the paper's model sizes and in the real file formats, before GPU-days.

1. Stand-ins (`dreamdiffusion.tools.standins`, written once into pretrains/rehearsal/ and datasets/rehearsal/,
   reused while present) - unless the real files are in pretrains/ and datasets/, which are used:
   SD1.5 as a CompVis `v1-5-pruned.ckpt`, CLIP ViT-L/14 as a transformers folder, ViT-H/14 as a
   torchvision state dict, a generation checkpoint in the authors' layout, ImageNet-EEG-shaped data
   (128 channels, 450..600 samples, 512 px JPEGs) and an unpaired corpus.
2. The real stage scripts, a few steps each, each in its own process (so its peak memory is its own):
   stage 1 with the large encoder; stage 2 at 512 px with the paper's settings; stage 3 on the
   authors'-format checkpoint, on the stage-2 export, and the class-name oracle.
3. The memory each setting needs (`dreamdiffusion.core.memory`): stage 2 (and stage 1) at fp32 and
   bf16-mixed, with gradient checkpointing on and off, computed from one real step's saved
   activations and scaled to batch 4 and 25 (measured directly on a GPU: CUDA's peak).
4. results/rehearsal/rehearsal.json and rehearsal.md: per stage ok or the error, seconds per step,
   peak memory, and the paper's full run projected at that speed.
Everything is written under outputs/rehearsal/ (runs), results/rehearsal/ and the stand-in folders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamdiffusion.config import REPO_ROOT, STAGES, resolve_path
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.files import atomic_write_json, atomic_write_text
from dreamdiffusion.core.memory import GIB, estimate
from dreamdiffusion.models.clip_embedder import load_clip_image_encoder
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, select_trainable, time_cond_overrides
from dreamdiffusion.models.mae import EEGEncoder, MaskedEEGAutoencoder
from dreamdiffusion.models.sd15 import load_sd15
from dreamdiffusion.tools import standins

# The paper's full run, for the projections (ImageNet-EEG subject 4: about 2,000 trials, split 80/10/10).
PAPER_RUN = {"stage1_epochs": 500, "stage1_windows": 120_000, "stage2_epochs": 300, "stage2_train_trials": 1_600,
             "stage3_test_trials": 200, "stage3_images_per_trial": 5, "stage3_unet_calls": 251}
REAL_FILES = {"sd": "pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt", "clip": "pretrains/clip-vit-large-patch14",
              "classifier": "pretrains/classifiers/vit_h_14_swag_e2e_v1.pth",
              "authors": "pretrains/dreamdiffusion/checkpoint.pth", "eeg": "datasets/eeg_5_95_std.pth",
              "splits": "datasets/block_splits_by_image_single.pth", "images": "datasets/imageNet_images",
              "corpus": "datasets/pretrain_eeg"}


@dataclass
class Folders:
    pretrains: Path
    datasets: Path
    outputs: Path
    results: Path


# ---------------------------------------------------------------------------------------------
# 1. the inputs


def _real(key: str) -> Path | None:
    path = resolve_path(REAL_FILES[key])
    return path if path.exists() else None


def prepare_inputs(folders: Folders, sizes: standins.Sizes, log: Callable[[str], None], use_real: bool = True
                   ) -> dict[str, Any]:
    """The files every step reads: the real ones when present (and `use_real`), else stand-ins
    (written once). Returns {key: path, "sources": {key: "real" | "stand-in"}}."""
    p, d = folders.pretrains, folders.datasets
    plan = [("sd", p / "sd15" / "v1-5-pruned.ckpt", lambda out: standins.sd15(out, sizes)),
            ("clip", p / "clip-vit-large-patch14", lambda out: standins.clip(out, sizes)),
            ("classifier", p / "classifiers" / f"{sizes.classifier}.pth", lambda out: standins.classifier(out, sizes)),
            ("corpus", d / "pretrain_eeg", lambda out: standins.corpus(out, sizes))]
    inputs: dict[str, Any] = {"sources": {}}
    for key, target, write in plan:
        inputs[key] = _use_or_write(key, target, write, use_real, inputs["sources"], log)
    data = _real("eeg") if use_real else None
    if data is not None and _real("splits") and _real("images"):
        inputs.update(eeg=data, splits=_real("splits"), images=_real("images"), class_names=None)
        inputs["sources"]["data"] = "real"
    else:
        if not (d / "imagenet_eeg" / "class_names.json").is_file():
            log("[rehearsal] writing ImageNet-EEG-shaped data ...")
            standins.imagenet_eeg(d / "imagenet_eeg", sizes)
        inputs.update(eeg=d / "imagenet_eeg" / "eeg_5_95_std.pth", splits=d / "imagenet_eeg" / "block_splits_by_image_single.pth",
                      images=d / "imagenet_eeg" / "images", class_names=d / "imagenet_eeg" / "class_names.json")
        inputs["sources"]["data"] = "stand-in"
    inputs["authors"] = _use_or_write("authors", p / "dreamdiffusion" / "checkpoint.pth",
                                      lambda out: standins.authors_checkpoint(out, inputs["sd"], sizes), use_real,
                                      inputs["sources"], log)
    return inputs


def _use_or_write(key: str, target: Path, write, use_real: bool, sources: dict, log) -> Path:
    real = _real(key) if use_real else None
    if real is not None:
        sources[key] = "real"
        return real
    # A file stand-in is written atomically; a folder one is complete once its DONE marker exists.
    done = target / "DONE" if target.suffix == "" else target
    if not done.exists():
        log(f"[rehearsal] writing the {key} stand-in to {target} ...")
        started = time.perf_counter()
        write(target)
        if done != target:
            done.write_text("done\n")
        log(f"[rehearsal] {key}: {time.perf_counter() - started:.0f} s")
    sources[key] = "stand-in"
    return target


# ---------------------------------------------------------------------------------------------
# 2. the stage runs


def stage_steps(inputs: dict[str, Any], folders: Folders, sizes: standins.Sizes, gpu: bool) -> list[tuple[str, str, list[str]]]:
    """(name, stage, arguments) of each run, a few steps each; batches: the paper's on a GPU, 4 / 1 on the CPU."""
    out = folders.outputs
    data = [f"data.eeg_path={inputs['eeg']}", f"data.splits_path={inputs['splits']}", f"data.image_dir={inputs['images']}",
            "data.subject=4"]
    sd_cfg = [f"sd_config_dir={sizes.sd_config_dir}"] if sizes.sd_config_dir else []
    encoder = [f"encoder.{k}={v}" for k, v in sizes.encoder.items()]
    n_times = f"data.n_times={sizes.encoder.get('n_times', 512)}"
    stage1 = [f"output_dir={out / 'stage1'}", f"data.root={inputs['corpus']}", f"batch_size={100 if gpu else 4}",
              "epochs=1", "warmup_epochs=0", "trainer.limit_train_batches=4", "trainer.num_workers=0",
              "checkpoint_every_n_epochs=0", "figure_every_n_epochs=0", "trainer.progress_bar=false", *encoder,
              n_times]
    stage2 = [f"output_dir={out / 'stage2'}", f"eeg_encoder_path={out / 'stage1' / 'eeg_encoder'}",
              f"sd_path={inputs['sd']}", f"clip_path={inputs['clip']}", *sd_cfg, *data, f"batch_size={4 if gpu else 1}",
              "epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "val_every_n_epochs=1",
              "sample_every_n_epochs=0", "n_val_samples=1", "trainer.num_workers=0", "trainer.progress_bar=false",
              f"data.image_size={sizes.image_size}", f"data.clip_image_size={sizes.clip_vision['image_size']}",
              n_times]
    weights = f"classifier_weights={inputs['classifier']}"
    stage3 = [*data, *sd_cfg, f"classifier=torchvision:{sizes.classifier}", weights, f"clip_path={inputs['clip']}",
              "max_trials=2", "num_images_per_eeg=1", "num_inference_steps=3", "batch_size=2", "n_way=50",
              "bootstrap_samples=100", "progress_bar=false", "metrics=[n_way,mse,pcc,ssim,clip_similarity,retrieval]",
              f"data.image_size={sizes.image_size}", n_times]
    oracle = [f"oracle_sd_path={inputs['sd']}", "class_oracle=true", "metrics=[n_way,mse,ssim]"]
    if inputs.get("class_names"):
        oracle.append(f"class_names_path={inputs['class_names']}")
    return [("stage 1 (large encoder)", "stage1", stage1),
            (f"stage 2 ({sizes.image_size} px, the paper's settings)", "stage2", stage2),
            ("stage 3 (the authors'-format checkpoint)", "stage3",
             [*stage3, f"model={inputs['authors']}", f"output_dir={out / 'stage3_authors'}"]),
            ("stage 3 (the stage-2 export)", "stage3",
             [*stage3, f"model={out / 'stage2' / 'model'}", f"output_dir={out / 'stage3_export'}"]),
            ("stage 3 (class-name oracle)", "stage3",
             [*stage3, *oracle, f"output_dir={out / 'stage3_oracle'}"])]


def run_step(name: str, stage: str, args: list[str], log_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One stage script in its own process; its row: ok or the error, seconds, speed, peak memory."""
    out_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    log_file = log_dir / f"{out_dir.name}.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    log(f"[rehearsal] {name} ...")
    started = time.perf_counter()
    with open(log_file, "w") as f:
        code = subprocess.run([sys.executable, str(STAGES[stage].script_path), *args], stdout=f,
                              stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    seconds = round(time.perf_counter() - started, 1)
    row: dict[str, Any] = {"stage": name, "ok": code == 0, "seconds": seconds, "log": str(log_file)}
    if code != 0:
        lines = log_file.read_text().strip().splitlines()
        row["error"] = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "?")
    stats_file = out_dir / "runtime.json"
    if stats_file.is_file():
        row.update(json.loads(stats_file.read_text()))
    log(f"[rehearsal] {name}: {'ok' if code == 0 else 'FAILED: ' + row['error']} in {seconds} s")
    return row


def projected_hours(row: dict[str, Any], stage: str, batch: int) -> float | None:
    """The paper's full run at the measured speed (per sample, so a CPU run at a small batch projects too)."""
    per_step = row.get("seconds_per_step")
    if not row["ok"] or per_step is None:
        return None
    if stage == "stage1":
        return PAPER_RUN["stage1_epochs"] * PAPER_RUN["stage1_windows"] / batch * per_step / 3600
    if stage == "stage2":
        return PAPER_RUN["stage2_epochs"] * PAPER_RUN["stage2_train_trials"] / batch * per_step / 3600
    images = PAPER_RUN["stage3_test_trials"] * PAPER_RUN["stage3_images_per_trial"]
    return images * PAPER_RUN["stage3_unet_calls"] * per_step / 3600


# ---------------------------------------------------------------------------------------------
# 3. the memory table (its own process: `python -m dreamdiffusion.tools.rehearsal memory`)


def memory_table(sd_path: Path, clip_path: Path, sizes: standins.Sizes, device: str) -> list[dict[str, Any]]:
    """Computed peaks of stage 2 (the paper's settings, 512 px) and stage 1 (batch 100) for each
    precision and gradient-checkpointing setting, from one real step at batch 1 each."""

    rows = []
    sd = load_sd15(sd_path, sizes.sd_config_dir, unet_overrides=time_cond_overrides())
    encoder = EEGEncoder(n_channels=sizes.n_channels, **sizes.encoder)
    model = DreamDiffusion.build(encoder, sd, clip_encoder=load_clip_image_encoder(clip_path)).to(device).train()
    select_trainable(model, "paper")
    n_times = sizes.encoder.get("n_times", 512)
    clip_size = sizes.clip_vision["image_size"]

    def stage2_loss(n: int) -> torch.Tensor:
        return model.training_losses({
            "eeg": torch.randn(n, sizes.n_channels, n_times, device=device),
            "image": torch.rand(n, 3, sizes.image_size, sizes.image_size, device=device) * 2 - 1,
            "clip_pixel_values": torch.randn(n, 3, clip_size, clip_size, device=device)})["loss"]

    for checkpointing in (False, True):
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        for precision in ("32-true", "bf16-mixed"):
            rows.append({"stage": "stage 2", **estimate(model, stage2_loss, precision, checkpointing).record((4, 25))})
    model = sd = None  # free SD1.5 before the MAE
    mae = MaskedEEGAutoencoder(n_channels=sizes.n_channels, **sizes.encoder).to(device).train()
    for precision in ("32-true", "bf16-mixed"):
        est = estimate(mae, lambda n: mae(torch.randn(n, sizes.n_channels, n_times, device=device))["loss"],
                       precision, False)
        rows.append({"stage": "stage 1", **est.record((4, 100))})
    return rows


def fits_table(memory: list[dict[str, Any]], cards: Sequence[int] = (24, 40, 80)) -> str:
    """Markdown: which stage-2 settings fit a 24, 40 and 80 GB GPU (computed)."""
    lines = ["| stage | precision | gradient checkpointing | batch | computed peak | " +
             " | ".join(f"fits {c} GB" for c in cards) + " |", "|---|---|---|---|---|" + "---|" * len(cards)]
    for row in memory:
        for batch, peak in row["peak_gib"].items():
            fits = ["yes" if peak * GIB <= c * 1e9 * 0.95 else "no" for c in cards]  # 5% for the CUDA context
            lines.append(f"| {row['stage']} | {row['precision']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                         f"{batch} | {peak:.1f} GiB | " + " | ".join(fits) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 4. the report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Rehearsal at the paper's sizes ({report['device']})", "",
             f"Inputs: {', '.join(f'{k}: {v}' for k, v in report['sources'].items())}. Wall time: "
             f"{report['seconds'] / 60:.1f} min (stand-ins {report['standin_seconds'] / 60:.1f} min).", "",
             "| stage | ok | seconds (process) | s / step | peak memory | the paper's full run at this speed |",
             "|---|---|---|---|---|---|"]
    for row in report["stages"]:
        memory = (f"{row['cuda_max_allocated_gib']:.1f} GiB CUDA" if "cuda_max_allocated_gib" in row
                  else f"{row['peak_rss_gib']:.1f} GiB RSS" if "peak_rss_gib" in row else "–")
        hours, step = row.get("projected_hours"), row.get("seconds_per_step")
        status = "ok" if row["ok"] else "FAILED: " + row.get("error", "")
        lines.append(f"| {row['stage']} | {status} | {row['seconds']} | {'–' if step is None else f'{step:.2f}'} | "
                     f"{memory} | {'–' if hours is None else f'{hours:,.0f} h'} |")
    lines += ["", "Steps: stages 1 and 2 per training batch (the median after the first); stage 3 per sampling "
              "step per image (the VAE decoder and the scores spread over the steps). Projections: "
              + "; ".join(f"{k} {v:,}" for k, v in report["paper_run"].items()) + ".",
              "", "## Memory of each setting (computed from one real step's saved activations)", "",
              fits_table(report["memory"]) if report.get("memory") else "not computed", ""]
    return "\n".join(lines) + "\n"


def run(folders: Folders, sizes: standins.Sizes, use_real: bool = True, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """The whole rehearsal; returns the rehearsal.json dict."""
    started = time.perf_counter()
    inputs = prepare_inputs(folders, sizes, log, use_real)
    standin_seconds = time.perf_counter() - started
    gpu = torch.cuda.is_available()
    rows = []
    for name, stage, args in stage_steps(inputs, folders, sizes, gpu):
        row = run_step(name, stage, args, folders.outputs / "logs", log)
        batch = int(next((a.split("=", 1)[1] for a in args if a.startswith("batch_size=")), 1))
        row["projected_hours"] = projected_hours(row, stage, batch)
        rows.append(row)
    memory = _memory_in_a_process(inputs, folders, sizes, log)
    report = {"device": torch.cuda.get_device_name() if gpu else f"CPU, {os.cpu_count()} cores",
              "sources": inputs["sources"], "stages": rows, "memory": memory, "paper_run": PAPER_RUN,
              "seconds": round(time.perf_counter() - started, 1), "standin_seconds": round(standin_seconds, 1),
              "torch": torch.__version__}
    atomic_write_json(folders.results / "rehearsal.json", report)
    atomic_write_text(folders.results / "rehearsal.md", report_markdown(report))
    log(f"[rehearsal] wrote {folders.results / 'rehearsal.json'} and rehearsal.md in {report['seconds'] / 60:.1f} min")
    return report


def _memory_in_a_process(inputs: dict[str, Any], folders: Folders, sizes: standins.Sizes, log) -> list[dict]:
    out = folders.outputs / "memory.json"
    log("[rehearsal] the memory of each setting (one real step each) ...")
    args = [sys.executable, "-m", "dreamdiffusion.tools.rehearsal", "memory", "--sd", str(inputs["sd"]), "--clip",
            str(inputs["clip"]), "--out", str(out)] + (["--sd-config-dir", sizes.sd_config_dir] if sizes.sd_config_dir else [])
    if sizes.image_size != 512:
        args.append("--tiny")
    with open(folders.outputs / "logs" / "memory.log", "w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    if code != 0:
        log(f"[rehearsal] the memory table failed (see {folders.outputs / 'logs' / 'memory.log'})")
        return []
    return json.loads(out.read_text())


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """code/rehearsal.py, and `python -m dreamdiffusion.tools.rehearsal memory` (the memory table's own process)."""
    parser = argparse.ArgumentParser(prog="rehearsal.py", description="Every stage at the paper's sizes, a few steps each.")
    parser.add_argument("command", nargs="?", default="run", choices=["run", "memory"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the test of this code path)")
    parser.add_argument("--no-real", action="store_true", help="use stand-ins even where the real files are present")
    parser.add_argument("--pretrains-dir", default="pretrains/rehearsal")
    parser.add_argument("--datasets-dir", default="datasets/rehearsal")
    parser.add_argument("--outputs-dir", default="outputs/rehearsal")
    parser.add_argument("--results-dir", default="results/rehearsal")
    parser.add_argument("--sd-config-dir", default=None, help="with --tiny: the tiny SD's config folder")
    parser.add_argument("--sd", default=None, help="memory: the SD file")
    parser.add_argument("--clip", default=None, help="memory: the CLIP folder")
    parser.add_argument("--out", default=None, help="memory: where to write the table")
    args = parser.parse_args(argv)
    sizes = standins.Sizes.tiny(args.sd_config_dir) if args.tiny else standins.Sizes(sd_config_dir=args.sd_config_dir)
    if args.command == "memory":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        atomic_write_json(Path(args.out), memory_table(Path(args.sd), Path(args.clip), sizes, device))
        return None
    folders = Folders(*(resolve_path(d) for d in (args.pretrains_dir, args.datasets_dir, args.outputs_dir,
                                                     args.results_dir)))
    if args.tiny and args.sd_config_dir is None:

        raise ConfigError("--tiny needs --sd-config-dir (a diffusers-layout config folder of a tiny UNet/VAE)")
    return run(folders, sizes, use_real=not args.no_real and not args.tiny)


if __name__ == "__main__":
    from dreamdiffusion.core.errors import run_cli

    sys.exit(run_cli(main))
