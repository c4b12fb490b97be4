"""Stage 1 training: the EEG MAE on unpaired EEG, with Lightning (single device or DDP).

`run_pretraining(cfg)` is what `code/stage1_pretrain_eeg.py` calls. It writes to `cfg.output_dir`:

    config.yaml                 the resolved config
    checkpoints/last.ckpt       every epoch (atomically); `resume=true` continues from it
    checkpoints/epoch_NNNN.ckpt every `checkpoint_every_n_epochs` epochs
    metrics.csv                 one row per epoch: loss, lr, reconstruction correlation (+ val loss)
    figures/recon_epoch_NNNN.png  input / masked input / reconstruction, every `figure_every_n_epochs`
    eeg_encoder/                the encoder export (model.safetensors + config.json) at the end

    metrics.json, results.md    the run's summary and the deviations from the paper / the authors' code

Randomness (data order, crops, masks) is a function of (seed, epoch, rank), so a run resumed from
`last.ckpt` continues exactly as an uninterrupted one would have.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.seed import isolate_rng
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, DistributedSampler
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup  # 4.x and 5.x

from dreamdiffusion.config import STAGES, resolved, save_config, to_container
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.files import atomic_path, check_output_dir
from dreamdiffusion.core.run_folder import owns_output_folder
from dreamdiffusion.core.stats import pearson_r_torch
from dreamdiffusion.dataset import ImageNetEEGDataset, collate_eeg, open_pretrain_corpus
from dreamdiffusion.evaluation.masked_recon import hidden_samples, interpolate_hidden, masked_correlation
from dreamdiffusion.evaluation.probe import quick_probe
from dreamdiffusion.models.mae import (
    PATCH_EMBED_INITS,
    MaskedEEGAutoencoder,
    build_mae,
    count_parameters,
    save_eeg_encoder,
)
from dreamdiffusion.train.guards import NonFiniteGuard, complete_export, fit, training_claim, write_export
from dreamdiffusion.train.lightning import (
    EpochMetricsCSV,
    EpochSeed,
    RunStats,
    SeededItems,
    SeededSampler,
    adamw,
    build_trainer,
    check_resume_checkpoint,
    check_trainer_settings,
    epoch_checkpoints,
    epoch_seed,
    format_metric,
    last_checkpoint,
    log_learning_rate,
    log_terms,
    output_paths,
    seed_all,
    write_run_summary,
)

logger = logging.getLogger(__name__)

# masked_corr / interp_corr: the reconstruction of the hidden samples and linear interpolation across them,
# each correlated with the input over the hidden samples (evaluation/masked_recon.py): the MAE has learnt
# something about EEG when the first beats the second.
METRICS_COLUMNS = ["epoch", "step", "loss", "lr", "recon_corr", "masked_corr", "interp_corr", "val_loss",
                   "probe_val_acc", "seconds"]

# -------------------------------------------------------------------------------------------------
# Optimisation


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the authors' code builds them (timm's, with no skip list): no decay on 1-D
    parameters (norms) and biases, `weight_decay` on everything else - the weight matrices and kernels
    and also the cls and mask tokens ([1, 1, D]), which the paper does not mention.

    timm returns the no-decay group first. The fixed sin-cos position table has requires_grad=False,
    so it never reaches the optimiser.
    """
    return param_groups_weight_decay(model, weight_decay)


def reconstruction_correlation(reconstruction: torch.Tensor, eeg: torch.Tensor) -> torch.Tensor:
    """Mean Pearson correlation over time between reconstruction and input, [B, C, T] each.

    Averaged over samples and channels (the authors monitor the first channel only).
    """
    return pearson_r_torch(reconstruction, eeg).mean()


class MAEPretrainModule(pl.LightningModule):
    """The MAE plus its optimiser and schedule. `config` is the stage-1 config as plain data."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.model: MaskedEEGAutoencoder = build_mae(config["encoder"], config["decoder"], config["mask_ratio"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        eeg = batch["eeg"]
        out = self.model(eeg)
        with torch.no_grad():
            recon = self.model.unpatchify(out["pred"])
            hidden = hidden_samples(out["mask"], self.model.patch_size)
            corr = {"recon_corr": reconstruction_correlation(recon, eeg),
                    "masked_corr": masked_correlation(recon, eeg, hidden),
                    "interp_corr": masked_correlation(interpolate_hidden(eeg, hidden), eeg, hidden)}
        n = eeg.shape[0]
        log_terms(self, "train", {"loss": out["loss"]}, n, per_step=True)
        log_terms(self, "train", corr, n)
        log_learning_rate(self)
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        eeg = batch["eeg"]
        # The same tokens are hidden at every validation, so the val loss is comparable across epochs.
        generator = torch.Generator().manual_seed(self.config["seed"] + batch_idx)
        noise = torch.rand(eeg.shape[0], self.model.encoder.num_patches, generator=generator).to(eeg.device)
        out = self.model(eeg, noise=noise)
        log_terms(self, "val", {"loss": out["loss"]}, eeg.shape[0], prog_bar=())

    def configure_optimizers(self):
        cfg = self.config
        groups = parameter_groups(self.model, cfg["weight_decay"])
        optimizer = adamw(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs))
        warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))
        # Linear warm-up, then a half-cosine to min_lr, per optimiser step (the authors compute the
        # same curve from a fractional epoch).
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup_steps, total_steps, min_lr_rate=cfg["min_lr"] / cfg["lr"])
        world = self.trainer.world_size
        accumulate = self.trainer.accumulate_grad_batches
        # our logger, not Lightning's rank_zero_info: Lightning's own lines are captured (core/logs.py)
        (logger.info if rank_zero_only.rank == 0 else logger.debug)(
            "stage 1: effective batch {eff} ({b} per device x {w} devices x {a} accumulation), lr {lr:g} "
            "(min {mlr:g}), {spe} optimiser steps/epoch, {tot} steps in all, {wu} warm-up steps; "
            "parameters: {np_:,} ({nd:,} with weight decay)".format(
                eff=cfg["batch_size"] * world * accumulate, b=cfg["batch_size"], w=world, a=accumulate,
                lr=cfg["lr"], mlr=cfg["min_lr"], spe=steps_per_epoch, tot=total_steps, wu=warmup_steps,
                np_=count_parameters(self.model),
                nd=sum(p.numel() for g in groups if g["weight_decay"] for p in g["params"]),
            )
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self.config  # plain data: the checkpoint reloads on its own


# -------------------------------------------------------------------------------------------------
# Data and callbacks


class PretrainData(pl.LightningDataModule):
    """Loaders whose randomness is a function of (seed, epoch, rank) only.

    Shuffling uses a `DistributedSampler` (also for one process: it shards for DDP and permutes by
    seed + epoch) and worker seeds come from `generator`, which `EpochSeed` re-seeds each epoch.
    Lightning builds the loader and its first iterator (workers prefetch at once) before it
    restores the epoch counter of a resumed run, so the epoch to start from travels in this
    module's own checkpoint state (restored earlier) and the loader is built for it.
    """

    def __init__(self, train_set, val_set, batch_size: int, num_workers: int, pin_memory: bool, seed: int):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.generator = torch.Generator()
        self.resume_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        # Saved at the end of epoch `current_epoch`; a resumed run starts with the next one.
        return {"next_epoch": self.trainer.current_epoch + 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_epoch = int(state["next_epoch"])

    def _loader(self, dataset, shuffle: bool, epoch: int) -> DataLoader:
        trainer = self.trainer
        sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=shuffle, seed=self.seed)
        sampler.set_epoch(epoch)
        # Workers persist across epochs: an item's crop is seeded by (seed, epoch, index), not by the worker.
        return DataLoader(SeededItems(dataset), batch_size=self.batch_size, sampler=SeededSampler(sampler, self.seed),
                          num_workers=self.num_workers, pin_memory=self.pin_memory, generator=self.generator,
                          persistent_workers=self.num_workers > 0,
                          collate_fn=collate_eeg)  # a batch cropped into one buffer is handed on, not copied

    def train_dataloader(self) -> DataLoader:
        epoch = max(self.trainer.current_epoch, self.resume_epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.trainer.global_rank))
        return self._loader(self.train_set, shuffle=True, epoch=epoch)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False, epoch=0)


class MetricsCSV(EpochMetricsCSV):
    """Stage 1: epoch-mean loss and reconstruction correlation, last lr, val loss."""

    columns = METRICS_COLUMNS

    def row(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        metrics = dict(trainer.callback_metrics)
        return {
            "loss": format_metric(metrics.get("train/loss_epoch", metrics.get("train/loss"))),
            "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.6g}",
            "recon_corr": format_metric(metrics.get("train/recon_corr")),
            "masked_corr": format_metric(metrics.get("train/masked_corr")),
            "interp_corr": format_metric(metrics.get("train/interp_corr")),
            "val_loss": format_metric(metrics.get("val/loss")),
            "probe_val_acc": format_metric(metrics.get("probe/val_acc")) if trainer.current_epoch == getattr(
                pl_module, "probe_epoch", None) else "",
        }


class ReconstructionFigures(pl.Callback):
    """PNG of input, masked input and reconstruction for a few fixed samples and channels."""

    def __init__(self, dirpath: Path, every_n_epochs: int, n_samples: int, n_channels: int, seed: int):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.n_samples = n_samples
        self.n_channels = n_channels
        self.seed = seed
        self.eeg: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.every_n_epochs <= 0 or self.n_samples <= 0:
            return
        dataset = trainer.train_dataloader.dataset
        with isolate_rng():  # the same crops every time, without touching training's streams
            seed_all(self.seed)
            items = [dataset[i]["eeg"] for i in range(min(self.n_samples, len(dataset)))]
        self.eeg = torch.stack(items)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch == trainer.max_epochs
        if self.eeg is None or not trainer.is_global_zero or (epoch % self.every_n_epochs and not last):
            return
        self.save(pl_module.model, self.dirpath / f"recon_epoch_{epoch:04d}.png", f"epoch {epoch}")

    @torch.no_grad()
    def save(self, model: MaskedEEGAutoencoder, path: Path, title: str) -> None:
        # imported here, not at the top - matplotlib (heavy to import) only when a figure is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        eeg = self.eeg.to(device)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(eeg.shape[0], model.encoder.num_patches, generator=generator).to(device)
        out = model(eeg, noise=noise)
        model.train(was_training)
        recon = model.unpatchify(out["pred"]).float().cpu()
        hidden = out["mask"].float().cpu().repeat_interleave(model.patch_size, dim=1).bool()  # [B, T]
        eeg = eeg.float().cpu()
        channels = np.linspace(0, eeg.shape[1] - 1, min(self.n_channels, eeg.shape[1])).round().astype(int)
        n_rows, n_cols = eeg.shape[0], len(channels)
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 2.2 * n_rows), squeeze=False)
        t = np.arange(eeg.shape[2])
        for i in range(n_rows):
            for j, c in enumerate(channels):
                ax = axes[i, j]
                visible = np.where(hidden[i].numpy(), np.nan, eeg[i, c].numpy())
                ax.plot(t, eeg[i, c].numpy(), color="0.75", lw=0.8, label="input")
                ax.plot(t, visible, color="k", lw=0.8, label="masked input (visible part)")
                ax.plot(t, recon[i, c].numpy(), color="tab:red", lw=0.8, label="reconstruction")
                ax.set_title(f"sample {i}, channel {c}", fontsize=8)
                ax.tick_params(labelsize=6)
        axes[0, 0].legend(fontsize=6, loc="upper right")
        fig.suptitle(f"{title}: loss on hidden tokens {float(out['loss']):.4f}", fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)


class ProbeMonitor(pl.Callback):
    """Every `every_n_epochs` (and after the last epoch), the linear-probe val accuracy of the encoder
    on paired data (`probe.quick_probe`), logged as probe/val_acc. Every rank computes it (it is
    deterministic and cheap next to an epoch), so no rank waits for another."""

    def __init__(self, data_cfg: DictConfig, every_n_epochs: int, n_channels: int):

        self.every_n_epochs = every_n_epochs
        splits = {name: ImageNetEEGDataset.from_config(data_cfg, name) for name in ("train", "val")}
        if splits["train"].n_channels != n_channels:
            raise ConfigError(f"probe.data gives EEG of {splits['train'].n_channels} channels "
                              f"({data_cfg.eeg_path}) but the encoder takes {n_channels} (encoder.n_channels)")
        self.eeg = {name: torch.stack([ds[i]["eeg"] for i in range(len(ds))]) for name, ds in splits.items()}
        self.labels = {name: np.asarray(ds.labels) for name, ds in splits.items()}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:

        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        accuracy = quick_probe(pl_module.model.encoder, self.eeg["train"], self.eeg["val"], self.labels["train"],
                               self.labels["val"])
        pl_module.log("probe/val_acc", accuracy, prog_bar=True, sync_dist=False)
        pl_module.probe_epoch = trainer.current_epoch


class StopAfterEpochs(pl.Callback):
    """End the run after `n_epochs` epochs in all (counting those before a resume)."""

    def __init__(self, n_epochs: int | None):
        self.n_epochs = n_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.n_epochs is not None and trainer.current_epoch + 1 >= self.n_epochs:
            trainer.should_stop = True


class ExportEncoder(pl.Callback):
    """Write the `eeg_encoder/` export when training ends (all at once, from finite weights only)."""

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            encoder = pl_module.model.encoder
            write_export(self.dirpath, "EEG encoder", encoder.parameters(), lambda folder: save_eeg_encoder(encoder, folder))


# -------------------------------------------------------------------------------------------------
# Putting it together


def check_config(cfg: DictConfig) -> None:
    """Reject inconsistent stage-1 settings with a sentence naming the field."""
    enc = cfg.encoder
    checks = [
        (0.0 < cfg.mask_ratio < 1.0, f"mask_ratio must be in (0, 1), got {cfg.mask_ratio} (0 hides no patch: "
                                     "the loss is over the hidden patches, so nothing would be learnt)"),
        (enc.patch_embed_init in PATCH_EMBED_INITS,
         f"encoder.patch_embed_init must be one of {PATCH_EMBED_INITS}, got {enc.patch_embed_init!r}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (0 <= cfg.warmup_epochs <= cfg.epochs,
         f"warmup_epochs must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (0 <= cfg.min_lr <= cfg.lr, f"min_lr must be in [0, lr={cfg.lr}], got {cfg.min_lr}"),
        (len(cfg.betas) == 2, f"betas must be two numbers, got {list(cfg.betas)}"),
        (cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.checkpoint_every_n_epochs >= 0, f"checkpoint_every_n_epochs must be >= 0 (0 = off), got "
                                             f"{cfg.checkpoint_every_n_epochs}"),
        (cfg.figure_every_n_epochs >= 0, f"figure_every_n_epochs must be >= 0 (0 = off), got {cfg.figure_every_n_epochs}"),
        (cfg.n_figure_samples >= 0 and cfg.n_figure_channels >= 1,
         f"n_figure_samples must be >= 0 and n_figure_channels >= 1, got {cfg.n_figure_samples}, {cfg.n_figure_channels}"),
        (enc.n_times % enc.patch_size == 0,
         f"encoder.n_times ({enc.n_times}) must be a multiple of encoder.patch_size ({enc.patch_size})"),
        (enc.embed_dim % enc.num_heads == 0,
         f"encoder.embed_dim ({enc.embed_dim}) must be a multiple of encoder.num_heads ({enc.num_heads})"),
        (cfg.decoder.decoder_embed_dim % cfg.decoder.decoder_num_heads == 0,
         "decoder.decoder_embed_dim must be a multiple of decoder.decoder_num_heads"),
        (enc.n_channels == cfg.data.n_channels,
         f"encoder.n_channels ({enc.n_channels}) and data.n_channels ({cfg.data.n_channels}) differ"),
        (enc.n_times == cfg.data.n_times,
         f"encoder.n_times ({enc.n_times}) and data.n_times ({cfg.data.n_times}) differ"),
        (cfg.stop_after_epochs is None or cfg.stop_after_epochs >= 1,
         f"stop_after_epochs must be >= 1 or null, got {cfg.stop_after_epochs}"),
        (0.0 <= cfg.data.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}"),
        (cfg.probe.every_n_epochs >= 0, f"probe.every_n_epochs must be >= 0 (0 = off), got {cfg.probe.every_n_epochs}"),
        (cfg.probe.every_n_epochs == 0 or cfg.probe.data.n_times == enc.n_times,
         f"probe.data.n_times ({cfg.probe.data.n_times}) must be encoder.n_times ({enc.n_times}): the probe feeds "
         "the paired EEG to the encoder"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_trainer_settings(cfg)  # the trainer's values, and devices against torchrun's / SLURM's counts


def build_datasets(cfg: DictConfig):
    """(train, val or None) stage-1 datasets (a packed corpus or a folder of *.npy: `open_pretrain_corpus`);
    val holds `data.val_fraction` of the windows. Only rank 0 updates the corpus's check records."""

    full = open_pretrain_corpus(cfg.data, write_record=rank_zero_only.rank == 0)
    n_val = int(round(len(full) * cfg.data.val_fraction))
    if n_val == 0:
        return full, None
    order = np.random.default_rng(cfg.seed).permutation(len(full))
    if n_val >= len(order):
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} leaves no training files of {len(order)}")
    return full.select(order[n_val:]), full.select(order[:n_val])


@owns_output_folder("stage1", training_claim)  # refuses another stage's folder, other settings, a second run
def run_pretraining(cfg: DictConfig) -> Path:
    """Train the MAE as `cfg` (a `Stage1Config`) says; return the output folder."""
    check_config(cfg)
    paths = resolved(cfg)  # absolute paths; config.yaml keeps the user's
    out_dir, ckpt_dir, last = output_paths(paths)
    check_output_dir(out_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set, val_set = build_datasets(paths)
    pin = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    data = PretrainData(train_set, val_set, cfg.batch_size, cfg.trainer.num_workers, pin, cfg.seed)
    monitor = ([ProbeMonitor(paths.probe.data, cfg.probe.every_n_epochs, cfg.encoder.n_channels)]
               if cfg.probe.every_n_epochs else [])
    callbacks = [
        EpochSeed(cfg.seed),
        *monitor,  # before MetricsCSV, which writes its value
        MetricsCSV(out_dir / "metrics.csv"),
        ReconstructionFigures(out_dir / "figures", cfg.figure_every_n_epochs, cfg.n_figure_samples,
                              cfg.n_figure_channels, cfg.seed),
        StopAfterEpochs(cfg.stop_after_epochs),
        NonFiniteGuard(f"a learning rate too high (lr={cfg.lr}), or EEG of an implausible scale (data.scale="
                       f"{cfg.data.scale}; the amplitude rule in datasets/README.md)", last),
        export := ExportEncoder(out_dir / "eeg_encoder"),
        RunStats(out_dir / "runtime.json"),
        last_checkpoint(ckpt_dir),
        *([epoch_checkpoints(ckpt_dir, cfg.checkpoint_every_n_epochs)] if cfg.checkpoint_every_n_epochs > 0 else []),
    ]
    trainer = build_trainer(
        cfg, out_dir, callbacks,
        limit_val_batches=cfg.trainer.limit_val_batches if val_set is not None else 0,
        use_distributed_sampler=False,  # PretrainData shards and shuffles itself (exact resume)
    )
    module = MAEPretrainModule(to_container(cfg))
    if cfg.resume:  # before anything is written: a refused resume leaves the folder as it was
        check_resume_checkpoint(module, last, group_sizes=[
            len(group["params"]) for group in parameter_groups(module.model, cfg.weight_decay)])
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
        if cfg.data.skip_bad_files:
            train_set.write_skipped(out_dir / "skipped_files.txt")  # what the whole folder's scan skipped
        _print_once(paths, len(train_set), 0 if val_set is None else len(val_set))
    fit(trainer, module, datamodule=data, ckpt_path=str(last) if cfg.resume else None)
    complete_export(export, trainer, module)  # a resume after the last epoch skips on_train_end
    if trainer.is_global_zero:
        _write_summary(cfg, out_dir, module, trainer, len(train_set))
    return out_dir


def _write_summary(cfg: DictConfig, out_dir: Path, module: MAEPretrainModule, trainer: pl.Trainer,
                   n_windows: int) -> None:

    with (out_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    final = rows[-1] if rows else {}
    summary = {"epochs_done": len(rows), "optimizer_steps": trainer.global_step, "n_training_windows": n_windows,
               "parameters": count_parameters(module.model),
               "encoder_parameters": count_parameters(module.model.encoder),
               **{k: (float(final[k]) if final.get(k) else None) for k in ("loss", "recon_corr", "masked_corr",
                                                                             "interp_corr", "val_loss",
                                                                             "probe_val_acc")}}
    table = [("epochs done", f"{summary['epochs_done']} of {cfg.epochs}"), ("optimiser steps", str(trainer.global_step)),
             ("final masked MSE (train)", final.get("loss") or "-"), ("final val loss", final.get("val_loss") or "-"),
             ("reconstruction correlation", final.get("recon_corr") or "-"),
             ("hidden samples: reconstruction vs linear interpolation (correlation with the input)",
              f"{final.get('masked_corr') or '-'} vs {final.get('interp_corr') or '-'}"),
             ("probe: linear val accuracy on paired data", final.get("probe_val_acc") or "-"),
             ("encoder parameters", f"{summary['encoder_parameters']:,}"), ("mask ratio", str(cfg.mask_ratio)),
             ("fidelity", cfg.fidelity)]
    write_run_summary(cfg, out_dir, "Stage 1: masked signal modelling", summary, table)


@rank_zero_only
def _print_once(paths: DictConfig, n_train: int, n_val: int) -> None:
    print(
        f"stage 1: {n_train} training windows, {n_val} validation windows from {paths.data.root}; "
        f"mask ratio {paths.mask_ratio}; fidelity {paths.fidelity}; output {paths.output_dir}"
        + (" (resuming from checkpoints/last.ckpt)" if paths.resume else "")
    )


def main(argv: Sequence[str] | None = None) -> Any:
    """`code/stage1_pretrain_eeg.py`: the command line, then `run_pretraining`."""
    return STAGES["stage1"].main(argv, run_pretraining)
