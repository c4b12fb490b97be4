"""The Lightning pieces stages 1 and 2 share: the trainer, seeding, checkpoints, per-epoch metrics, the run summary.

- `build_trainer(cfg, out_dir, callbacks)`: a `pl.Trainer` from a stage config's `trainer` / `wandb`
  groups (single device or DDP over devices and nodes).
- `EpochSeed`: python / numpy / torch and the data module's generator re-seeded per (seed, epoch, rank),
  so a resumed run continues exactly as an uninterrupted one.
- `last_checkpoint`, `epoch_checkpoints`, `best_checkpoint`: Lightning `ModelCheckpoint`s (their
  saves are atomic: the file is written in an fsspec transaction and moved into place); what a
  checkpoint holds is up to the LightningModule's `on_save_checkpoint`.
- `EpochMetricsCSV`: one row per epoch in `metrics.csv`, resume-aware.
- `RunStats`: `runtime.json` at the end: seconds per training step (CUDA events read at the end: no
  per-step synchronisation), peak memory (CUDA's max allocated on a GPU, the process's peak RSS), the
  number formats (TF32, bf16, fused AdamW), and whatever the module adds (stage 2: its memory estimate).
- `log_terms`, `log_learning_rate`, `adamw`: logging that never waits for the GPU (epoch means reduced
  across processes once per epoch), and AdamW fused on a GPU.
- `SeededSampler` + `SeededItems`: items whose random draws depend on (seed, epoch, index) only, so
  loader workers persist across epochs and a resume stays exact.
- `write_run_summary`: `metrics.json` and `results.md` at the end of a run, with the deviations
  from the paper and the authors' code that apply to its config.
"""

from __future__ import annotations

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
from dreamdiffusion.core.errors import CheckpointError, ConfigError, DataError
from dreamdiffusion.core.extras import require_extra
from dreamdiffusion.core.fidelity import markdown_section
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text
from dreamdiffusion.core.launch import launcher_devices
from dreamdiffusion.core.logs import verbose_requested
from dreamdiffusion.core.memory import GIB, peak_rss_bytes
from dreamdiffusion.core.precision import bf16_supported, numerics_record, set_tf32
from dreamdiffusion.train.guards import AtomicCheckpointIO

# ---------------------------------------------------------------------------------------------
# Seeding


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed that depends only on (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global random streams (torch's seeds every GPU's too). To leave
    the streams as they were after a block, wrap it in Lightning's `isolate_rng()`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSeed(pl.Callback):
    """Seed python/numpy/torch (random crops, masks, noise) per (seed, epoch, rank) at each epoch start;
    a data module with a `generator` (DataLoader worker seeds) gets the same seed."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch, trainer.global_rank)
        seed_all(seed)
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
            try:
                with self.path.open(newline="") as f:
                    self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < trainer.current_epoch]
            except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error) as err:
                raise DataError(f"{self.path} is damaged ({type(err).__name__}: {err}): delete it to continue (the "
                                "rows of the epochs already done are then lost)") from err

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
    """`runtime.json` at the end: seconds per training step, peak memory, the run's number formats
    (TF32, bf16, fused AdamW) and `pl_module.runtime` (a dict the module may fill).

    Nothing here waits for the GPU during training: on a GPU a pair of CUDA events brackets each timed
    step (recorded into the stream, read once when training ends), on the CPU the wall clock does.
    Timed: the first `first_steps` steps and every `every`-th after them. A step's time is the span
    from its batch's start to its end (forward, backward, optimiser step; not the wait for data);
    `wall_seconds_per_step` is all of training (data, validation, checkpoints) per step."""

    first_steps = 100
    every = 50

    def __init__(self, path: Path):
        self.path = Path(path)
        self.steps: list[Any] = []  # (start, end) CUDA events, or seconds
        self._step = 0
        self._start: Any = None
        self._t_first = None

    def _timed(self) -> bool:
        return self._step < self.first_steps or self._step % self.every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t_first is None:
            self._t_first = time.perf_counter()
        if not self._timed():
            return
        if pl_module.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._timed() and self._start is not None:
            if pl_module.device.type == "cuda":
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.steps.append((self._start, end))
            else:
                self.steps.append(time.perf_counter() - self._start)
        self._start = None
        self._step += 1

    def step_seconds(self, device: torch.device) -> list[float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once, at the end: every recorded event has happened
            return [start.elapsed_time(end) / 1000 for start, end in self.steps]
        return list(self.steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self.step_seconds(pl_module.device)
        if not trainer.is_global_zero:
            return
        timed = seconds[1:] or seconds  # the first step carries one-off costs (allocation, compilation)
        wall = time.perf_counter() - self._t_first if self._t_first is not None else None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        stats = {"steps": self._step, "timed_steps": len(seconds),
                 "step_timing": ("CUDA events, read at the end" if pl_module.device.type == "cuda" else "wall clock")
                 + f" (the first {self.first_steps} steps, then every {self.every}th)",
                 "step_seconds": [round(t, 4) for t in seconds[:50]],
                 "seconds_per_step": round(sorted(timed)[len(timed) // 2], 4) if timed else None,
                 "wall_seconds_per_step": round(wall / self._step, 4) if wall and self._step else None,
                 "peak_rss_gib": round(peak_rss_bytes() / GIB, 3), "device": str(pl_module.device),
                 "precision": str(trainer.precision), "numerics": numerics_record(pl_module.device),
                 "fused_adamw": bool(optimizer is not None and optimizer.defaults.get("fused"))}
        if pl_module.device.type == "cuda":
            stats["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(pl_module.device) / GIB, 3)
            stats["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved(pl_module.device) / GIB, 3)
        stats.update(getattr(pl_module, "runtime", {}))
        atomic_write_json(self.path, stats)


# ---------------------------------------------------------------------------------------------
# Logging without waiting for the GPU, and the optimiser


def log_terms(module: pl.LightningModule, prefix: str, terms: dict[str, torch.Tensor], batch_size: int,
              per_step: bool = False, prog_bar: tuple[str, ...] = ("loss",)) -> None:
    """Log loss terms as `<prefix>/<name>` epoch means, reduced across processes once, at the epoch's
    end. `per_step` (training) logs them as `<prefix>/<name>_epoch` and also each step's value of this
    process as `<prefix>/<name>_step`, for the loggers: never reduced and never on the progress bar,
    since either would read the value back from the GPU (an all-reduce, an `.item()`) every step."""
    suffix = "_epoch" if per_step else ""
    for name, value in terms.items():
        value = value.detach()
        module.log(f"{prefix}/{name}{suffix}", value, on_step=False, on_epoch=True, batch_size=batch_size,
                   sync_dist=True, prog_bar=name in prog_bar)
        if per_step:
            module.log(f"{prefix}/{name}_step", value, on_step=True, on_epoch=False, batch_size=batch_size)


def log_learning_rate(module: pl.LightningModule) -> None:
    """`lr` on the steps whose metrics go to the loggers, as a CPU tensor: no tensor is created on the
    GPU and nothing is read back from it for the progress bar."""
    trainer = module.trainer
    if (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.global_step == 0:
        lr = module.optimizers().param_groups[0]["lr"]
        module.log("lr", torch.tensor(float(lr)), on_step=True, on_epoch=False, prog_bar=True)


def adamw(params: Any, **settings: Any) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters instead of several per tensor) when every
    parameter is on a GPU; on the CPU torch's default implementation, so CPU results stay as they were."""
    groups = list(params)
    tensors = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(groups, fused=True if fused else None, **settings)


# ---------------------------------------------------------------------------------------------
# Loaders whose workers persist across epochs


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item `index`'s random draws in `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededSampler(torch.utils.data.Sampler):
    """Yields (index, seed) pairs: the indices of `sampler` (a DistributedSampler), each with a seed
    that depends only on (seed, epoch, index). Lightning calls `set_epoch` at each epoch's start."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch  # the epoch an iterator starts in holds for all its items
        return ((i, item_seed(self.seed, epoch, i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededItems(torch.utils.data.Dataset):
    """`dataset[(index, seed)]`: the item drawn with torch's random stream seeded by `seed` (and left
    as it was after), so an item's random crop depends on (seed, epoch, index) only - not on which
    worker loads it, how many workers there are, or what that worker loaded before. Loader workers can
    then persist across epochs and a resumed run still draws exactly what an uninterrupted one does.
    A plain index gives the item from the current stream."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone (what the items draw from): torch.manual_seed also seeds every
            # accelerator's generators, ~100x slower per call (0.27 ms: more than reading an item)
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __getitems__(self, keys: list) -> list:
        """A batch: through the dataset's own batched fetch when it has one (the stage-1 datasets crop a
        batch into one buffer), which seeds each item as `__getitem__` does; else item by item."""
        batched = getattr(self.dataset, "__getitems__", None)
        if batched is None or not all(isinstance(key, tuple) for key in keys):
            return [self[key] for key in keys]
        indices, seeds = zip(*keys)
        return batched(list(indices), seeds=list(seeds))


# ---------------------------------------------------------------------------------------------
# The trainer


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` -> bf16-mixed on a GPU with native bf16 (compute capability >= 8.0), 32-true on any other
    GPU and on the CPU (fp16 autocast only when asked for by name); anything else is passed to Lightning."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    native_bf16 = torch.cuda.is_available() and bf16_supported("cuda")
    if precision == "auto":
        return "bf16-mixed" if on_gpu and native_bf16 else "32-true"
    if precision in ("16-mixed", "16") and not on_gpu:
        raise ConfigError(f"trainer.precision={precision} (fp16 autocast) needs a GPU; use 32 or bf16-mixed on the CPU")
    if precision.startswith("bf16") and on_gpu and torch.cuda.is_available() and not native_bf16:
        raise ConfigError(f"trainer.precision={precision} but {torch.cuda.get_device_name()} has no native bf16 "
                          "(compute capability < 8.0): use trainer.precision=32-true, or 16-mixed (fp16 with loss scaling)")
    return precision


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """The Lightning trainer of stages 1 and 2 from a stage config's `trainer`/`wandb` groups.

    `callbacks` include the stage's ModelCheckpoints; `overrides` are the few trainer arguments a
    stage sets itself.
    """
    check_trainer_settings(cfg)
    tcfg = cfg.trainer
    set_tf32(tcfg.tf32)  # the fp32 work (validation sampling, the probe); runtime.json records it
    logger: Any = False
    if cfg.wandb.enabled:
        require_extra("wandb", "wandb.enabled=true")
        # imported here, not at the top - wandb is optional (wandb.enabled)
        from pytorch_lightning.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", cfg.wandb.mode)
        logger = WandbLogger(
            project=cfg.wandb.project, name=cfg.wandb.run_name, save_dir=str(out_dir),
            offline=cfg.wandb.mode == "offline", mode=cfg.wandb.mode, config=to_container(cfg),
        )
    devices, num_nodes = launcher_devices(tcfg.devices, tcfg.num_nodes, "trainer.")  # torchrun's / SLURM's counts
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(out_dir),
        max_epochs=cfg.epochs,
        accelerator=tcfg.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=tcfg.strategy,
        precision=resolve_precision(tcfg.precision, tcfg.accelerator),
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        gradient_clip_val=cfg.grad_clip if cfg.grad_clip > 0 else None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=tcfg.log_every_n_steps,
        limit_train_batches=tcfg.limit_train_batches,
        limit_val_batches=tcfg.limit_val_batches,
        enable_progress_bar=tcfg.progress_bar,
        enable_model_summary=verbose_requested(),  # our own lines say what trains (select_trainable's table)
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],  # a kill mid-write keeps the previous checkpoint (train/guards.py)
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
    )
    try:
        return pl.Trainer(**{**kwargs, **overrides})
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError(f"invalid trainer settings (trainer.accelerator={tcfg.accelerator}, devices={devices}, "
                          f"num_nodes={num_nodes}, strategy={tcfg.strategy}, precision={tcfg.precision}): "
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
    launcher_devices(t.devices, t.num_nodes, "trainer.")  # a contradiction with torchrun's / SLURM's counts


def check_resume_checkpoint(module: pl.LightningModule, path: Path, keys: set[str] | None = None,
                            group_sizes: list[int] | None = None) -> None:
    """resume=true: `path` must hold this module's weights (`keys`, default all; same shapes) and, when
    `group_sizes` is given, an optimiser state whose parameter groups hold as many tensors as this
    run's will; else a sentence now instead of Lightning's wall of missing keys or torch's optimiser
    error after the set-up."""
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
    if group_sizes is None:
        return
    saved_groups = [len(group["params"]) for group in (loaded.get("optimizer_states") or [{}])[0].get("param_groups", [])]
    if saved_groups and saved_groups != list(group_sizes):
        # The weights match but the optimiser was built another way (e.g. a stage-1 run from before
        # the cls/mask tokens took weight decay): Adam's moments cannot be carried over exactly.
        raise CheckpointError(
            f"resume=true: {path} holds an optimiser state with parameter groups of {saved_groups} tensors, this "
            f"run builds {list(group_sizes)}: it was written by another version of this stage, which grouped the "
            "weights for weight decay differently, so it cannot be continued exactly; start a new output_dir "
            "(its weights are intact and still load)")


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
