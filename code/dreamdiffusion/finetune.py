"""Stage 2: fine-tune SD1.5 on paired EEG and images, with the CLIP alignment loss (Lightning).

`run_finetuning(cfg)` (cfg: a `Stage2Config`) writes to `output_dir`:
    config.yaml                  the resolved config
    trainable_parameters.txt     what trains, per group (from `select_trainable`)
    metrics.csv                  one row per epoch: train and val loss terms, val top-1, seconds
    samples/epoch_NNNN.png       val-split trials: ground truth | generated, every sample_every_n_epochs
    checkpoints/last.ckpt        after every epoch (resume=true continues from it)
    checkpoints/best.ckpt        best val loss (the training objective: diffusion + clip_weight x CLIP
                                 term), or best val top-1 when a classifier is set
    model/                       the final model (`DreamDiffusion.save_pretrained`)
Checkpoints hold only what trains (plus the conditioner's buffers), the optimiser state and the
config - not the frozen SD1.5 weights, which come from `sd_path` again on resume.
Checkpoint selection only ever looks at the val split.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from .config import resolve_path, save_config, to_container
from .errors import CheckpointError, ConfigError
from .io import atomic_path, atomic_write_json, atomic_write_text
from .model import CLIP_LOSSES, DreamDiffusion, build_model, format_table, select_trainable
from .pretrain import EpochMetricsCSV, EpochSeed, build_trainer, format_metric, output_paths

logger = logging.getLogger(__name__)

METRICS_COLUMNS = ["epoch", "step", "train_loss", "train_diffusion", "train_clip",
                   "val_loss", "val_diffusion", "val_clip", "val_top1", "seconds"]


class Stage2Module(pl.LightningModule):
    """Trains a DreamDiffusion's selected parameters with AdamW at a constant learning rate."""

    def __init__(self, model: DreamDiffusion, config: dict[str, Any], val_items: list[dict] | None = None):
        super().__init__()
        self.model = model
        self.config = config
        self.val_items = val_items or []
        self._classifier: list = []  # a list, so that the classifier is not registered as a submodule
        self.last_top1_epoch: int | None = None
        self.trainable_table = select_trainable(model)
        # Checkpoints carry only the trained tensors; `on_load_checkpoint` checks their key set.
        self.strict_loading = False
        if config["gradient_checkpointing"]:
            model.unet.enable_gradient_checkpointing()

    # ---- what a checkpoint holds --------------------------------------------------------------

    def checkpoint_keys(self) -> set[str]:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        buffers = {f"model.conditioner.{n}" for n, _ in self.model.conditioner.named_buffers()}
        return trainable | buffers

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["config"] = self.config  # plain data

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected, present = self.checkpoint_keys(), set(checkpoint.get("state_dict", {}))
        if expected != present:
            raise CheckpointError(
                "the stage-2 checkpoint does not hold the tensors this model trains: missing "
                f"{sorted(expected - present)[:8]}, unexpected {sorted(present - expected)[:8]} (was it "
                "written with other model settings?)"
            )

    # ---- steps ----------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Constant learning rate, as in the authors' code (no warm-up, no schedule).
        return torch.optim.AdamW(params, lr=self.config["lr"], weight_decay=self.config["weight_decay"])

    def _log_losses(self, prefix: str, losses: dict[str, torch.Tensor], batch_size: int, on_step: bool) -> None:
        for name, value in losses.items():
            self.log(f"{prefix}/{name}", value.detach(), on_step=on_step, on_epoch=True,
                     batch_size=batch_size, sync_dist=not on_step, prog_bar=name == "loss")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.model.training_losses(batch)
        self._log_losses("train", losses, len(batch["eeg"]), on_step=True)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so val losses of different epochs are comparable.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config["seed"] + batch_idx)
            losses = self.model.training_losses(batch)
        self._log_losses("val", losses, len(batch["eeg"]), on_step=False)

    def on_validation_epoch_end(self) -> None:
        epoch = self.current_epoch + 1
        every = self.config["sample_every_n_epochs"]
        last = epoch == self.trainer.max_epochs
        if self.trainer.sanity_checking or not self.val_items or every <= 0 or (epoch % every and not last):
            return
        images, top1 = self.sample_val_images()
        if top1 is not None:
            self.log("val/top1", top1, sync_dist=False)
            self.last_top1_epoch = self.current_epoch
        if self.trainer.is_global_zero:
            save_grid(images, Path(self.config["output_dir_resolved"]) / "samples" / f"epoch_{epoch:04d}.png")

    @torch.no_grad()
    def sample_val_images(self) -> tuple[torch.Tensor, float | None]:
        """Generate one image per val trial with the fast sampler; return ([n, 2, 3, H, W] ground truth
        and generated, in [-1, 1]) and their n-way top-1 when a classifier is configured."""
        from .pipeline import DreamDiffusionPipeline

        cfg = self.config
        eeg = torch.stack([item["eeg"] for item in self.val_items]).to(self.device)
        truth = torch.stack([item["image"] for item in self.val_items]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        pipe = DreamDiffusionPipeline(self.model)
        pipe.set_progress_bar_config(disable=True)
        generated = pipe(
            eeg, num_images_per_eeg=1, num_inference_steps=cfg["val_inference_steps"], sampler=cfg["val_sampler"],
            generator=torch.Generator().manual_seed(cfg["seed"]), output_type="pt",
        ).images[:, 0].to(self.device)
        self.model.train(was_training)
        if generated.shape[-1] != truth.shape[-1]:
            truth = torch.nn.functional.interpolate(truth, size=generated.shape[-2:], mode="bilinear", antialias=True)
        top1 = None
        if cfg["classifier"]:
            from .classifier import load_classifier
            from .metrics import n_way_top_k_accuracy

            if not self._classifier:
                weights = resolve_path(cfg["classifier_weights"]) if cfg["classifier_weights"] else None
                self._classifier.append(load_classifier(cfg["classifier"], weights).to(self.device).eval())
            classifier = self._classifier[0]
            # The reference class is the classifier's own verdict on the ground truth (REFERENCE section 4).
            ref_class = classifier(truth.float()).argmax(dim=-1)
            probs = classifier(generated.float())
            top1 = float(n_way_top_k_accuracy(probs.cpu(), ref_class.cpu(), n_way=cfg["n_way"], top_k=1).mean())
        return torch.stack([truth, generated], dim=1).float().cpu(), top1


def save_grid(pairs: torch.Tensor, path: Path) -> None:
    """pairs [n, k, 3, H, W] in [-1, 1] -> a PNG with one row per trial."""
    from torchvision.utils import save_image

    n, k = pairs.shape[:2]
    with atomic_path(path) as tmp:
        save_image((pairs.flatten(0, 1) + 1) / 2, tmp, nrow=k, padding=2, format="png")


# ---------------------------------------------------------------------------------------------
# Callbacks


class Stage2Checkpoints(pl.Callback):
    """`last.ckpt` after every epoch and `best.ckpt` when the monitored val metric improves
    (both written atomically)."""

    def __init__(self, dirpath: Path, monitor: str, mode: str):
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._improved = False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor:
            self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        if self.monitor == "val/top1" and getattr(pl_module, "last_top1_epoch", None) != trainer.current_epoch:
            return  # no top-1 this epoch (the logged value is an earlier epoch's)
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch, self._improved = value, trainer.current_epoch, True

    def _save(self, trainer: pl.Trainer, name: str) -> None:
        tmp = self.dirpath / f".{name}.tmp"
        trainer.save_checkpoint(tmp)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.dirpath / name)
        trainer.strategy.barrier(f"Stage2Checkpoints.{name}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._improved:
            self._improved = False
            self._save(trainer, "best.ckpt")
        self._save(trainer, "last.ckpt")


class Stage2MetricsCSV(EpochMetricsCSV):
    """Stage 2: the train loss terms (epoch means) and the last validation's terms and top-1."""

    columns = METRICS_COLUMNS

    def __init__(self, path: Path):
        super().__init__(path)
        self._val: dict[str, float] = {}
        self._val_epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        names = ["val/loss", "val/diffusion", "val/clip"]
        if getattr(pl_module, "last_top1_epoch", None) == trainer.current_epoch:
            names.append("val/top1")  # computed this epoch, not left over from an earlier one
        self._val = {name: float(metrics[name]) for name in names if name in metrics}
        self._val_epoch = trainer.current_epoch

    def row(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        metrics = trainer.callback_metrics
        val = self._val if self._val_epoch == trainer.current_epoch else {}
        return {
            "train_loss": format_metric(metrics.get("train/loss_epoch")),
            "train_diffusion": format_metric(metrics.get("train/diffusion_epoch")),
            "train_clip": format_metric(metrics.get("train/clip_epoch")),
            "val_loss": format_metric(val.get("val/loss")),
            "val_diffusion": format_metric(val.get("val/diffusion")),
            "val_clip": format_metric(val.get("val/clip")),
            "val_top1": format_metric(val.get("val/top1")),
        }


class ExportModel(pl.Callback):
    """`model/` (save_pretrained) when training ends, plus `model/selection.json` saying which
    checkpoint it is. With `export="best"` the weights of `best.ckpt` (chosen on the val split,
    never on test) are exported; stage 3 copies the selection record into its results."""

    def __init__(self, dirpath: Path, checkpoints: Stage2Checkpoints, export: str):
        self.dirpath = Path(dirpath)
        self.checkpoints, self.export = checkpoints, export

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = self.checkpoints.dirpath / "best.ckpt"
        if self.export == "best" and best.is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            if set(state) != pl_module.checkpoint_keys():
                raise CheckpointError(f"{best} does not hold the tensors this model trains")
            pl_module.load_state_dict(state, strict=False)  # the frozen SD weights are not in it
            selection = {"export": "best", "chosen_on": "val", "monitor": self.checkpoints.monitor,
                         "value": self.checkpoints.best, "epoch": self.checkpoints.best_epoch}
        else:
            reason = "export=last" if self.export == "last" else "no validation ran, so no best.ckpt"
            selection = {"export": "last", "chosen_on": f"none: the last epoch ({reason})",
                         "epoch": trainer.current_epoch}
        pl_module.model.save_pretrained(self.dirpath)
        atomic_write_json(self.dirpath / "selection.json", selection)


# ---------------------------------------------------------------------------------------------
# Putting it together


def check_config(cfg: DictConfig) -> None:
    """Reject inconsistent stage-2 settings with a sentence naming the field."""
    from .pipeline import SAMPLERS

    checks = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}"),
        (cfg.clip_loss in CLIP_LOSSES, f"clip_loss must be one of {CLIP_LOSSES}, got {cfg.clip_loss!r}"),
        (cfg.clip_weight >= 0, f"clip_weight must be >= 0, got {cfg.clip_weight}"),
        (cfg.val_sampler in SAMPLERS, f"val_sampler must be one of {SAMPLERS}, got {cfg.val_sampler!r}"),
        (cfg.val_every_n_epochs >= 1, f"val_every_n_epochs must be >= 1, got {cfg.val_every_n_epochs}"),
        (cfg.export in ("best", "last"), f"export must be 'best' or 'last', got {cfg.export!r}"),
        (cfg.context_tokens >= 2, f"context_tokens must be >= 2, got {cfg.context_tokens}"),
        (not cfg.classifier or cfg.sample_every_n_epochs > 0,
         "a classifier is set (val top-1 picks the best checkpoint), so sample_every_n_epochs must be > 0"),
        (not cfg.classifier or cfg.sample_every_n_epochs % cfg.val_every_n_epochs == 0,
         f"sample_every_n_epochs ({cfg.sample_every_n_epochs}) must be a multiple of val_every_n_epochs "
         f"({cfg.val_every_n_epochs}): the val top-1 is computed at the end of a validation"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_pretrained_files(cfg: DictConfig) -> None:
    """Fail in a second, with what to download and where, before any data or weights are loaded."""
    from .clip_embedder import check_clip_path
    from .sd15 import DOWNLOAD_HINT

    sd_path = resolve_path(cfg.sd_path)
    if sd_path is None or not sd_path.exists():
        raise CheckpointError(f"Stable Diffusion 1.5 weights not found at {sd_path}: {DOWNLOAD_HINT}.")
    if cfg.clip_weight > 0:
        check_clip_path(cfg.clip_path)
    if cfg.eeg_encoder_path and not resolve_path(cfg.eeg_encoder_path).exists():
        raise CheckpointError(
            f"stage-1 EEG encoder not found at {resolve_path(cfg.eeg_encoder_path)}: run stage 1 "
            "(code/stage1_pretrain_eeg.py) or put the authors' pretrained encoder there (pretrains/README.md), "
            "or set eeg_encoder_path=null to train the encoder from scratch"
        )


def run_finetuning(cfg: DictConfig, model: DreamDiffusion | None = None) -> Path:
    """Fine-tune as `cfg` (a `Stage2Config`) says; return the output folder. `model` replaces the
    one built from the config's files (for tests and notebooks)."""
    from .dataset import ImageNetEEGDataset

    check_config(cfg)
    out_dir, ckpt_dir, last = output_paths(cfg)
    if model is None:
        check_pretrained_files(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set = ImageNetEEGDataset.from_config(cfg.data, "train", augment=True)
    val_set = ImageNetEEGDataset.from_config(cfg.data, "val", augment=False)
    if model is None:
        model = build_model(cfg)
    if cfg.data.image_size % model.vae_scale_factor:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be a multiple of the VAE's "
                          f"downsampling factor ({model.vae_scale_factor})")
    encoder_config = model.conditioner.encoder.config
    if (encoder_config["n_channels"], encoder_config["n_times"]) != (train_set.n_channels, cfg.data.n_times):
        raise ConfigError(
            f"the EEG encoder expects [{encoder_config['n_channels']}, {encoder_config['n_times']}] inputs but "
            f"the data gives [{train_set.n_channels}, {cfg.data.n_times}] (data.n_times, the EEG file's channels)"
        )

    config = {**to_container(cfg), "output_dir_resolved": str(out_dir)}
    n_val_items = min(cfg.n_val_samples, len(val_set))
    val_items = [val_set[i] for i in range(n_val_items)]
    module = Stage2Module(model, config, val_items)
    # Selection on val only. Without a classifier: the objective being trained. The diffusion term
    # alone hardly moves with conditioning quality (0.1540 vs 0.1547 between epochs whose CLIP term
    # fell 0.34 -> 0.30 in the demo), so selecting on it picks an arbitrary epoch.
    monitor, mode = ("val/top1", "max") if cfg.classifier else ("val/loss", "min")
    callbacks = [
        EpochSeed(cfg.seed),
        Stage2MetricsCSV(out_dir / "metrics.csv"),
        (checkpoints := Stage2Checkpoints(ckpt_dir, monitor, mode)),
        ExportModel(out_dir / "model", checkpoints, cfg.export),
    ]
    trainer = build_trainer(
        cfg, out_dir, callbacks,
        check_val_every_n_epoch=cfg.val_every_n_epochs,
        enable_model_summary=False,  # select_trainable's table says what trains
    )
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
        atomic_write_text(out_dir / "trainable_parameters.txt", format_table(module.trainable_table) + "\n")
        _print_once(cfg, module, len(train_set), len(val_set))

    pin = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"

    def loader(dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.trainer.num_workers,
                          pin_memory=pin, drop_last=False, persistent_workers=cfg.trainer.num_workers > 0)

    # weights_only: our checkpoints hold tensors and plain data only, so nothing pickled is run on resume
    trainer.fit(module, train_dataloaders=loader(train_set, True), val_dataloaders=loader(val_set, False),
                ckpt_path=str(last) if cfg.resume else None, weights_only=True)
    return out_dir


@rank_zero_only
def _print_once(cfg: DictConfig, module: Stage2Module, n_train: int, n_val: int) -> None:
    print(
        f"stage 2: {n_train} training / {n_val} val trials (subject {cfg.data.subject}, split "
        f"{cfg.data.split_index}); best checkpoint by {'val top-1' if cfg.classifier else 'val loss'}; "
        f"output {resolve_path(cfg.output_dir)}" + (" (resuming from checkpoints/last.ckpt)" if cfg.resume else "")
    )
    print(format_table(module.trainable_table))
