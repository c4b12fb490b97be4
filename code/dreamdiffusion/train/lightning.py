"""The Lightning pieces stages 1 and 2 share: the trainer, seeding, checkpoints, per-epoch metrics, the run summary.

- `build_trainer(cfg, out_dir, callbacks)`: a `pl.Trainer` from a stage config's `trainer` / `wandb`
  groups (single device or DDP over devices and nodes).
- `EpochSeed`: python / numpy / torch and the data module's generator re-seeded per (seed, epoch, rank),
  so a resumed run continues exactly as an uninterrupted one.
- `last_checkpoint`, `epoch_checkpoints`, `best_checkpoint`: Lightning `ModelCheckpoint`s (their
  saves are atomic: the file is written in an fsspec transaction and moved into place); what a
  checkpoint holds is up to the LightningModule's `on_save_checkpoint`.
- `EpochMetricsCSV`: one row per epoch in `metrics.csv`, resume-aware.
- `RunStats`: `runtime.json` at the end: seconds per training step, peak memory (CUDA's max
  allocated on a GPU, the process's peak RSS), and whatever the module adds (stage 2: its memory
  estimate).
- `write_run_summary`: `metrics.json` and `results.md` at the end of a run, with the deviations
  from the paper and the authors' code that apply to its config.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint

from dreamdiffusion.config import deviations, to_container
from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.fidelity import markdown_section
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text
from dreamdiffusion.core.memory import GIB, peak_rss_bytes

# ---------------------------------------------------------------------------------------------
# Seeding


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed that depends only on (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block with fixed seeds and leave the global random streams as they were."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class EpochSeed(pl.Callback):
    """Seed python/numpy/torch (random crops, masks, noise) per (seed, epoch, rank) at each epoch start;
    a data module with a `generator` (DataLoader worker seeds) gets the same seed."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        generator = getattr(trainer.datamodule, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class _EpochsDoneCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose file names may use `{epochs_done}` (Lightning's `{epoch}` counts from 0),
    so that `epoch_0050.ckpt` is the state after 50 epochs."""

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        return {**super()._monitor_candidates(trainer), "epochs_done": torch.tensor(trainer.current_epoch + 1)}


def last_checkpoint(dirpath: Path) -> ModelCheckpoint:
    """`last.ckpt` after every training epoch (what `resume=true` starts from)."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", save_top_k=1, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False, auto_insert_metric_name=False)


def epoch_checkpoints(dirpath: Path, every_n_epochs: int) -> ModelCheckpoint:
    """`epoch_NNNN.ckpt` every `every_n_epochs` epochs, all kept."""
    return _EpochsDoneCheckpoint(dirpath=dirpath, filename="epoch_{epochs_done:04d}", save_top_k=-1,
                                 every_n_epochs=every_n_epochs, save_on_train_epoch_end=True,
                                 enable_version_counter=False, auto_insert_metric_name=False)


def best_checkpoint(dirpath: Path, monitor: str, mode: str) -> ModelCheckpoint:
    """`best.ckpt` whenever the monitored validation metric improves (checked after each validation)."""
    return ModelCheckpoint(dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           save_on_train_epoch_end=False, enable_version_counter=False,
                           auto_insert_metric_name=False)


# ---------------------------------------------------------------------------------------------
# Per-epoch metrics


def format_metric(value: Any) -> str:
    return "" if value is None else f"{float(value):.6g}"


class EpochMetricsCSV(pl.Callback):
    """One row per epoch in `metrics.csv`, rewritten atomically after every epoch. On resume the
    rows of the epochs already done are kept and any written after `last.ckpt` are dropped.
    Subclasses set `columns` and say what a row holds (`row`); epoch, step and seconds are added here.
    """

    columns: list[str] = []

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._started = time.time()

    def row(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        raise NotImplementedError

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < trainer.current_epoch]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank builds the row: reading the metrics runs the cross-process reduction of sync_dist.
        row = self.row(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self.rows.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **row,
                          "seconds": f"{time.time() - self._started:.2f}"})
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)


class RunStats(pl.Callback):
    """`runtime.json`: seconds per training step (all steps of this run; the first includes warm-up),
    peak memory, and `pl_module.runtime` (a dict the module may fill)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.steps: list[float] = []
        self._t0 = 0.0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.steps.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:

        if not trainer.is_global_zero:
            return
        timed = self.steps[1:] or self.steps  # the first step carries one-off costs (allocation, compilation)
        stats = {"steps": len(self.steps), "step_seconds": [round(t, 4) for t in self.steps[:50]],
                 "seconds_per_step": round(sorted(timed)[len(timed) // 2], 4) if timed else None,
                 "peak_rss_gib": round(peak_rss_bytes() / GIB, 3), "device": str(pl_module.device)}
        if pl_module.device.type == "cuda":
            stats["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(pl_module.device) / GIB, 3)
        stats.update(getattr(pl_module, "runtime", {}))
        atomic_write_json(self.path, stats)


# ---------------------------------------------------------------------------------------------
# The trainer


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` -> bf16-mixed on a GPU, 32-true on the CPU; anything else is passed to Lightning."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision == "auto":
        return "bf16-mixed" if on_gpu else "32-true"
    if precision in ("16-mixed", "16") and not on_gpu:
        raise ConfigError(f"trainer.precision={precision} (fp16 autocast) needs a GPU; use 32 or bf16-mixed on the CPU")
    return precision


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """The Lightning trainer of stages 1 and 2 from a stage config's `trainer`/`wandb` groups.

    `callbacks` include the stage's ModelCheckpoints; `overrides` are the few trainer arguments a
    stage sets itself.
    """
    check_trainer_settings(cfg)
    tcfg = cfg.trainer
    logger: Any = False
    if cfg.wandb.enabled:
        # lazy: wandb is optional (wandb.enabled)
        from pytorch_lightning.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
        logger = WandbLogger(
            project=cfg.wandb.project, name=cfg.wandb.run_name, save_dir=str(out_dir),
            offline=cfg.wandb.mode == "offline", mode=cfg.wandb.mode, config=to_container(cfg),
        )
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(out_dir),
        max_epochs=cfg.epochs,
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=tcfg.strategy,
        precision=resolve_precision(tcfg.precision, tcfg.accelerator),
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        gradient_clip_val=cfg.grad_clip if cfg.grad_clip > 0 else None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=tcfg.log_every_n_steps,
        limit_train_batches=tcfg.limit_train_batches,
        limit_val_batches=tcfg.limit_val_batches,
        enable_progress_bar=tcfg.progress_bar,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
    )
    try:
        return pl.Trainer(**{**kwargs, **overrides})
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError(f"invalid trainer settings (trainer.accelerator={tcfg.accelerator}, devices={tcfg.devices}, "
                          f"num_nodes={tcfg.num_nodes}, strategy={tcfg.strategy}, precision={tcfg.precision}): "
                          f"{str(err).splitlines()[0]}") from err


WANDB_MODES = ("online", "offline", "disabled")


def check_trainer_settings(cfg: DictConfig) -> None:
    """The `trainer` / `wandb` values Lightning would only reject mid-run (or with a traceback)."""
    t = cfg.trainer
    checks = [
        (t.accumulate_grad_batches >= 1, f"trainer.accumulate_grad_batches must be >= 1, got {t.accumulate_grad_batches}"),
        (t.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {t.log_every_n_steps}"),
        (t.num_workers >= 0, f"trainer.num_workers must be >= 0 (0 = load in the main process), got {t.num_workers}"),
        (t.num_nodes >= 1, f"trainer.num_nodes must be >= 1, got {t.num_nodes}"),
        (not isinstance(t.devices, int) or t.devices >= 1 or t.devices == -1,
         f"trainer.devices must be >= 1, -1 (all), a list of ids or \"auto\", got {t.devices}"),
        (not cfg.wandb.enabled or cfg.wandb.mode in WANDB_MODES,
         f"wandb.mode must be one of {', '.join(WANDB_MODES)}, got '{cfg.wandb.mode}'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_resume_checkpoint(module: pl.LightningModule, path: Path, keys: set[str] | None = None) -> None:
    """resume=true: `path` must hold this module's weights (`keys`, default all; same shapes), else a
    sentence now instead of Lightning's wall of missing keys."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any decode failure means "not a checkpoint of ours"
        raise CheckpointError(f"resume=true: {path} cannot be read as a Lightning checkpoint ({err})") from err
    state = loaded.get("state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"resume=true: {path} holds no Lightning state_dict")
    own = module.state_dict()
    expected = set(own) if keys is None else keys
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    shapes = [k for k in expected & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"other shapes {sorted(shapes)[:3]}" if shapes else "") if part)
        raise CheckpointError(f"resume=true: {path} was not written by this stage with these model sizes ({detail}); "
                              "resume with the settings it was trained with, or use a new output_dir")


def output_paths(cfg: DictConfig) -> tuple[Path, Path, Path]:
    """(output folder, its `checkpoints/`, `checkpoints/last.ckpt`) of a stage-1 or stage-2 run, from
    a config whose paths are resolved; a ConfigError, before anything is built, when `resume=true`
    finds no `last.ckpt` to resume from."""
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if cfg.resume and not last.is_file():
        raise ConfigError(f"resume=true but there is no checkpoint to resume from: {last}")
    return out_dir, ckpt_dir, last


# ---------------------------------------------------------------------------------------------
# The run summary


def write_run_summary(cfg: DictConfig, out_dir: Path, title: str, summary: dict[str, Any],
                      table: list[tuple[str, str]]) -> dict[str, Any]:
    """`metrics.json` ({"summary", "deviations", "config"}) and `results.md` (a two-column table of
    `table` rows, then the deviations that apply to `cfg`) in `out_dir`; returns the metrics.json dict."""
    records = deviations(cfg)
    report = {"summary": summary, "deviations": records, "config": to_container(cfg)}
    atomic_write_json(out_dir / "metrics.json", report)
    lines = [f"# {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in table), ""]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n" + markdown_section([d["line"] for d in records]))
    return report
