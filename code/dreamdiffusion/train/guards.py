"""What keeps a training run (stages 1 and 2) from ending in a state nobody can use:

- `training_claim`: the output folder and the settings that own it (`dreamdiffusion.core.run_folder`);
- `NonFiniteGuard`: a NaN/Inf loss, gradient or weight stops the run at that step with a sentence
  naming the step and the likely causes; the last checkpoint (written at the end of the last good
  epoch) is kept, and nothing is exported;
- `write_export`: an export (`eeg_encoder/`, `model/`) written all at once (`core.files.atomic_dir`),
  only from finite weights; `complete_export` writes it after `fit` when it is missing - a run resumed
  after its last epoch (killed during the export) never reaches Lightning's `on_train_end`;
- `AtomicCheckpointIO`: checkpoints written next to their final name and renamed into place (a kill
  mid-write leaves the previous `last.ckpt` as it was, on any file system);
- `fit`: `trainer.fit` with Ctrl-C ending as a KeyboardInterrupt (one line from `run_cli`, exit 130)
  instead of Lightning's exit(1), and the SIGINT handler Lightning switches off put back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from dreamdiffusion.config import resolve_path, to_container
from dreamdiffusion.core.errors import NonFiniteError
from dreamdiffusion.core.files import atomic_dir, atomic_path, is_complete
from dreamdiffusion.core.run_folder import FolderClaim

# Settings that may differ between a run and its resume without changing what it produces.
RUN_CONTROL = ("output_dir", "resume", "overwrite", "stop_after_epochs", "memory_check", "wandb",
               "trainer.progress_bar", "trainer.num_workers", "trainer.log_every_n_steps",
               # where checks and caches are kept, and the CLIP cache (the same numbers as per step)
               "data.check_record", "cache_dir", "cache_clip_embeddings")
# Precisions whose GradScaler skips steps with Inf gradients by design (so they are not an error).
SCALED_PRECISIONS = ("16-mixed", "16")


def training_claim(cfg: DictConfig) -> FolderClaim:
    """A stage-1/2 config's output folder and the settings that own it (all but RUN_CONTROL)."""
    settings = to_container(cfg)
    for key in RUN_CONTROL:
        *parents, name = key.split(".")
        node = settings
        for part in parents:
            node = node.get(part, {})
        node.pop(name, None)
    # a resumed run may be extended (or shortened): `epochs` is recorded, but compared only when starting
    return FolderClaim(resolve_path(cfg.output_dir), settings, bool(cfg.overwrite), clear=not cfg.resume,
                       may_change=("epochs",) if cfg.resume else ())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf (one device sync for all of them)."""
    peaks = [t.detach().abs().amax().float() for t in tensors if t.numel()]
    return not peaks or bool(torch.isfinite(torch.stack([p.to(peaks[0].device) for p in peaks])).all())


class NonFiniteGuard(pl.Callback):
    """Stop at the first non-finite loss (before its backward), gradient (before the optimiser step)
    or trained weight. `causes` completes the sentence: the settings worth checking.

    On the CPU every check is immediate. On a GPU a check would synchronise host and device every
    step, so the loss is checked on the device (the first bad step is recorded there, no sync) and the
    verdict is read every `trainer.log_every_n_steps` steps, at every epoch end and before any
    checkpoint is written - the sentence still names the step where it happened, and no checkpoint or
    export ever holds the NaN weights. Gradients and weights are checked at those points too."""

    def __init__(self, causes: str, checkpoint: Path):
        self.causes, self.checkpoint = causes, Path(checkpoint)
        self._first_bad: torch.Tensor | None = None  # on the device: the first step with a non-finite loss, or -1

    def _stop(self, trainer: pl.Trainer, what: str, step: int | None = None) -> None:
        kept = (f"{self.checkpoint} (the end of the last finished epoch) is kept: fix the setting, then continue "
                "from it with resume=true overwrite=true or start again with overwrite=true"
                if self.checkpoint.is_file() else "no epoch had finished, so no checkpoint was written")
        step = trainer.global_step if step is None else step
        raise NonFiniteError(f"training stopped at step {step} (epoch {trainer.current_epoch}): "
                             f"{what} is not finite (NaN or Inf). Likely causes: {self.causes}. Nothing was exported; "
                             f"{kept}")

    def _any_rank(self, trainer: pl.Trainer, bad: bool) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the device-side verdict (one sync) and check the weights; stop if anything is non-finite."""
        first_bad = -1 if self._first_bad is None else int(self._first_bad)
        if self._any_rank(trainer, first_bad >= 0):
            self._stop(trainer, "the training loss", step=first_bad if first_bad >= 0 else None)
        if not all_finite(p for p in pl_module.parameters() if p.requires_grad):
            self._stop(trainer, "a trained weight (after the optimiser step)")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if loss.device.type == "cpu":  # no device to wait for: check at once
            if self._any_rank(trainer, not all_finite([loss])):
                self._stop(trainer, "the training loss")
            return
        bad = ~torch.isfinite(loss.detach()).all()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_bad = torch.where((self._first_bad < 0) & bad, trainer.global_step, self._first_bad)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if str(trainer.precision) in SCALED_PRECISIONS:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        on_cpu = not grads or grads[0].device.type == "cpu"
        if on_cpu and not all_finite(grads):  # gradients are all-reduced: every rank sees the same
            self._stop(trainer, "a gradient")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._first_bad is None:  # CPU: the weights are checked at once
            if not all_finite(p for p in pl_module.parameters() if p.requires_grad):
                self._stop(trainer, "a trained weight (after the optimiser step)")
        elif (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._flush(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing a temporary file beside the checkpoint and renaming it into
    place (`core.files.atomic_path`). Lightning's own stages the file in the system's temp folder; on
    another file system its final move is a plain copy, which a kill leaves half-written."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO (local checkpoints only)")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def write_export(path: Path, what: str, weights: Iterable[torch.Tensor], write: Callable[[Path], Any]) -> None:
    """`write(folder)` into a temporary folder renamed onto `path` when complete (`atomic_dir`); refused
    when `weights` (what training changed) are not all finite."""
    if not all_finite(weights):
        raise NonFiniteError(f"the {what} holds NaN or Inf weights: {path} is not written (no NaN model is exported)")
    with atomic_dir(path, what) as tmp:
        write(tmp)


def complete_export(exporter: pl.Callback, trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """After `fit`: write `exporter`'s folder (its `dirpath`) with its `on_train_end` if it is missing or
    incomplete - a resume of a run whose last epoch was done (but whose export was not) skips training."""
    if trainer.is_global_zero and not is_complete(exporter.dirpath):
        exporter.on_train_end(trainer, module)


def fit(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """`trainer.fit(...)`; Ctrl-C surfaces as a KeyboardInterrupt. Lightning catches it, shuts down,
    sets SIGINT to be ignored and calls sys.exit(1)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
