"""Stage 2: fine-tune SD1.5 on paired EEG and images, with the CLIP alignment loss (Lightning).

`run_finetuning(cfg)` (cfg: a `Stage2Config`) writes to `output_dir`:
    config.yaml                  the resolved config (the deviations that apply head it as comments)
    trainable_parameters.txt     what trains, per group (from `select_trainable`)
    metrics.csv                  one row per epoch: train and val loss terms, val top-1, seconds
    samples/epoch_NNNN.png       val-split trials: ground truth | generated, every sample_every_n_epochs
    checkpoints/last.ckpt        after every epoch (resume=true continues from it)
    checkpoints/best.ckpt        best val loss (the training objective: diffusion + clip_weight x CLIP
                                 term), or best val top-1 when a classifier is set
    model/                       the final model, a diffusers pipeline folder (`DreamDiffusionPipeline.
                                 from_pretrained` reads it) + selection.json + training.json (the config,
                                 its deviations and the val figures, for stage 3) + README.md (model card)
    metrics.json, results.md     the run's summary and its deviations from the paper / the authors' code
    cache/                       the CLIP embeddings (and with cache_latents the VAE latents) of the
                                 images, computed once (train/stage2_cache.py; cache_dir moves it)
Checkpoints hold only what trains (plus the conditioner's buffers), the optimiser state and the
config - not the frozen SD1.5 weights, which come from `sd_path` again on resume.
Checkpoint selection only ever looks at the val split.
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
from PIL import Image
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from dreamdiffusion.config import STAGES, deviations, resolved, save_config, to_container
from dreamdiffusion.core.compat import FIT_WEIGHTS_ONLY
from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    read_own_json,
)
from dreamdiffusion.core.images import to_uint8
from dreamdiffusion.core.memory import AUTOCAST_DTYPES, GIB, advice, device_memory, estimate, store_frozen_at
from dreamdiffusion.core.run_folder import check_export, owns_output_folder
from dreamdiffusion.dataset import paired_dataset
from dreamdiffusion.evaluation.scoring import MetricNetworks, Scorer
from dreamdiffusion.models.classifier import check_n_way, load_classifier
from dreamdiffusion.models.clip_embedder import OPEN_CLIP_PREFIX, check_clip_path, load_clip_image_encoder
from dreamdiffusion.models.dreamdiffusion import (
    CLIP_LOSSES,
    TRAINABLE_SETS,
    DreamDiffusion,
    format_table,
    select_trainable,
    time_cond_overrides,
)
from dreamdiffusion.models.mae import PATCH_EMBED_INITS, build_encoder, load_eeg_encoder
from dreamdiffusion.models.pipeline import SAMPLERS, DreamDiffusionPipeline
from dreamdiffusion.models.sd15 import DOWNLOAD_HINT, load_sd15
from dreamdiffusion.train.guards import NonFiniteGuard, complete_export, fit, training_claim, write_export
from dreamdiffusion.train.lightning import (
    EpochMetricsCSV,
    EpochSeed,
    RunStats,
    adamw,
    best_checkpoint,
    build_trainer,
    check_resume_checkpoint,
    check_trainer_settings,
    format_metric,
    last_checkpoint,
    log_terms,
    output_paths,
    write_run_summary,
)
from dreamdiffusion.train.model_card import write_model_card
from dreamdiffusion.train.selection_audit import SelectionAudit, audit_table_rows, summarise_audit
from dreamdiffusion.train.stage2_cache import work_done_once

logger = logging.getLogger(__name__)

METRICS_COLUMNS = ["epoch", "step", "train_loss", "train_diffusion", "train_clip",
                   "val_loss", "val_diffusion", "val_clip", "val_top1", "seconds"]


class Stage2Module(pl.LightningModule):
    """Trains a DreamDiffusion's selected parameters with AdamW at a constant learning rate.

    `config` is the stage-2 config as plain data, as the user wrote it (checkpoints carry it);
    `paths` the same with paths resolved (what the module reads files with); `val_items` the
    val-split trials sampled for images (and the val top-1 when a classifier is configured).
    """

    def __init__(self, model: DreamDiffusion, config: dict[str, Any], val_items: list[dict] | None = None,
                 paths: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.config = config
        self.paths = paths or config
        self.val_items = val_items or []
        self._classifier: list = []  # a list, so that the classifier is not registered as a submodule
        self.trainable_table = select_trainable(model, config["trainable"])
        # Checkpoints carry only the trained tensors; `on_load_checkpoint` checks their key set.
        self.strict_loading = False
        if config["gradient_checkpointing"]:
            model.unet.enable_gradient_checkpointing()
        self.memory_sample: dict[str, Any] | None = None  # one training item, for the start-up memory estimate
        self.runtime: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        """Under autocast, the frozen CLIP image encoder's matrix layers are stored at the autocast dtype
        (`store_frozen_at`: the same results, no per-step casts, half its memory). It only ever runs
        inside `training_losses`, under autocast, and is never saved."""
        dtype = AUTOCAST_DTYPES.get(str(self.trainer.precision))
        if dtype is not None and self.model.clip_encoder is not None:
            saved = store_frozen_at(self.model.clip_encoder, dtype)
            self.runtime["frozen_clip_matrices"] = f"{dtype} ({saved / GIB:.2f} GiB saved)"

    def on_fit_start(self) -> None:
        """The computed peak memory of this run's training step, next to the memory free on this
        process's device, with the settings to change when it will not fit (dreamdiffusion.core.memory)."""

        if self.memory_sample is None:
            return
        sample = {k: v[None].to(self.device) for k, v in self.memory_sample.items() if torch.is_tensor(v)}

        def loss(n: int) -> torch.Tensor:
            return self.model.training_losses({k: v.expand(n, *v.shape[1:]) for k, v in sample.items()})["loss"]

        computed = estimate(self.model, loss, str(self.trainer.precision), bool(self.config["gradient_checkpointing"]),
                            world_size=self.trainer.world_size)
        per_device = self.config["batch_size"]
        memory = device_memory(self.device)
        self.runtime["memory_estimate"] = {**computed.record((1, per_device, 4, 25)),
                                           "device_gib": round(memory.total / GIB, 2),
                                           "device_usable_gib": round(memory.usable / GIB, 2)}
        if self.trainer.is_global_zero:
            print(f"stage 2 memory (computed): {computed.describe(per_device)}; {memory.describe()}")
            warning = advice(computed, per_device, memory.usable)
            if warning:
                print(f"stage 2 memory: {warning}")

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
                "written with other model settings or another `trainable` set?)"
            )

    # ---- steps ----------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Constant learning rate, as in the authors' code (no warm-up, no schedule).
        return adamw(params, lr=self.config["lr"], weight_decay=self.config["weight_decay"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.model.training_losses(batch)
        log_terms(self, "train", losses, len(batch["eeg"]), per_step=True)  # epoch means over every process
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so val losses of different epochs are comparable.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config["seed"] + batch_idx)
            losses = self.model.training_losses(batch)
        log_terms(self, "val", losses, len(batch["eeg"]))

    def on_validation_epoch_end(self) -> None:
        """Val top-1 at every validation when a classifier is set (it may pick best.ckpt); the image
        grid every `sample_every_n_epochs` and after the last epoch."""
        if self.trainer.sanity_checking or not self.val_items:
            return
        epoch = self.current_epoch + 1
        every = self.config["sample_every_n_epochs"]
        want_grid = every > 0 and (epoch % every == 0 or epoch == self.trainer.max_epochs)
        if not (want_grid or self.config["classifier"]):
            return
        truth, generated = self.sample_val_images()
        if self.config["classifier"]:
            self.log("val/top1", self.val_top1(truth, generated), sync_dist=False)
        if want_grid and self.trainer.is_global_zero:
            save_grid(truth, generated, Path(self.paths["output_dir"]) / "samples" / f"epoch_{epoch:04d}.png")

    @torch.no_grad()
    def sample_val_images(self) -> tuple[np.ndarray, np.ndarray]:
        """One image per val trial with the fast sampler: (ground truth, generated), uint8
        [n, H, W, 3] each, at the model's output size - the form stage 3 scores."""
        truth, generated = self.sample_images(self.val_items, 1)
        return truth, generated[:, 0]

    @torch.no_grad()
    def sample_images(self, items: list[dict], num_images_per_eeg: int) -> tuple[np.ndarray, np.ndarray]:
        """`num_images_per_eeg` images per item with the val sampler and a generator seeded `seed`:
        (ground truth uint8 [n, H, W, 3], generated uint8 [n, k, H, W, 3]) at the model's output size.
        Also what the selection audit (train/selection_audit.py) samples the test trials with."""

        cfg = self.config
        eeg = torch.stack([item["eeg"] for item in items]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        pipe = DreamDiffusionPipeline.from_model(self.model)
        pipe.set_progress_bar_config(disable=True)
        generated = pipe(
            eeg, num_images_per_eeg=num_images_per_eeg, num_inference_steps=cfg["val_inference_steps"],
            sampler=cfg["val_sampler"], generator=torch.Generator().manual_seed(cfg["seed"]), output_type="np",
        ).images
        self.model.train(was_training)
        size = generated.shape[2]
        truth = np.stack([_to_uint8(item["image"], size) for item in items])
        return truth, generated

    def val_top1(self, truth: np.ndarray, generated: np.ndarray) -> float:
        """The n-way top-1 of the val images, scored exactly as stage 3 scores (`scoring.Scorer`)."""

        cfg = self.paths
        if not self._classifier:
            self._classifier.append(load_classifier(cfg["classifier"], cfg["classifier_weights"]))
        # On the GPU only while it scores: the paper's ViT-H/14 holds 2.4 GiB the training step needs.
        classifier = self._classifier[0].to(self.device)
        try:
            scorer = Scorer(["n_way"], MetricNetworks(classifier=classifier), n_way=cfg["n_way"])
            scorer.add_trials([Image.fromarray(t) for t in truth], [[Image.fromarray(g)] for g in generated])
            return float(scorer.compute(n_bootstrap=0)["n_way"]["mean"])
        finally:
            classifier.to("cpu")  # its blocks stay in the allocator's cache, for the training step to reuse


def _to_uint8(image: torch.Tensor, size: int) -> np.ndarray:
    """A dataset image [3, S, S] in [-1, 1] -> uint8 [size, size, 3] (resized when S != size)."""
    if image.shape[-1] != size:
        image = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return to_uint8(image)


def save_grid(truth: np.ndarray, generated: np.ndarray, path: Path) -> None:
    """One row per trial: ground truth | generated (uint8 [n, H, W, 3] each), via torchvision."""

    pairs = np.stack([truth, generated], axis=1).reshape(-1, *truth.shape[1:])  # trial-major
    grid = make_grid(torch.from_numpy(pairs).permute(0, 3, 1, 2), nrow=2, padding=2, pad_value=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------
# Callbacks


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
        names = ["val/loss", "val/diffusion", "val/clip", "val/top1"]
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
    """`model/` (the pipeline's save_pretrained) when training ends, plus `selection.json` saying which
    checkpoint it is, `training.json` (the config, its deviations, the val figures of the exported and
    the last epoch from `metrics_csv`) and the model card `README.md` (train/model_card.py). With
    `export="best"` the weights of `best.ckpt` (chosen on the val split, never on test) are exported."""

    def __init__(self, dirpath: Path, best: pl.callbacks.ModelCheckpoint, export: str, training: dict[str, Any],
                 metrics_csv: Path | None = None):
        self.dirpath = Path(dirpath)
        self.best, self.export, self.training = best, export, training
        self.metrics_csv = metrics_csv

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = Path(self.best.best_model_path) if self.best.best_model_path else None
        if self.export == "best" and best is not None and best.is_file():
            try:
                ckpt = torch.load(best, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways: each means "not readable"
                raise CheckpointError(f"{best} cannot be read ({type(err).__name__}): delete it and rerun with "
                                      "resume=true - the last epoch is then exported instead") from err
            if set(ckpt["state_dict"]) != pl_module.checkpoint_keys():
                raise CheckpointError(f"{best} does not hold the tensors this model trains")
            pl_module.load_state_dict(ckpt["state_dict"], strict=False)  # the frozen SD weights are not in it
            selection = {"export": "best", "chosen_on": "val", "monitor": self.best.monitor,
                         "value": float(self.best.best_model_score), "epoch": int(ckpt["epoch"])}
        else:
            reason = "export=last" if self.export == "last" else "no validation ran, so no best.ckpt"
            selection = {"export": "last", "chosen_on": f"none: the last epoch ({reason})",
                         "epoch": trainer.current_epoch}

        encoder = pl_module.model.conditioner.encoder.config
        training = {**self.training, "val": _val_figures(self.metrics_csv, selection["epoch"]),
                    "eeg_input": {"n_channels": encoder["n_channels"], "n_times": encoder["n_times"]}}

        def write(folder: Path) -> None:  # all of it, or none: `write_export` renames the folder into place
            DreamDiffusionPipeline.from_model(pl_module.model).save_pretrained(folder)
            atomic_write_json(folder / "selection.json", selection)
            atomic_write_json(folder / "training.json", training)
            write_model_card(folder)

        trained = (p for p in pl_module.model.parameters() if p.requires_grad)
        write_export(self.dirpath, "stage-2 model", trained, write)


def _val_figures(metrics_csv: Path | None, exported_epoch: int) -> dict[str, Any]:
    """The val columns of metrics.csv for the exported epoch and the last epoch that ran validation."""
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return {}
    with Path(metrics_csv).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    columns = ("epoch", "val_loss", "val_diffusion", "val_clip", "val_top1")
    pick = {"exported": [r for r in rows if int(r["epoch"]) == exported_epoch], "last": rows[-1:]}
    return {name: {k: found[-1].get(k) or None for k in columns} for name, found in pick.items() if found}


# ---------------------------------------------------------------------------------------------
# Putting it together


def check_config(cfg: DictConfig) -> None:
    """Reject inconsistent stage-2 settings with a sentence naming the field."""

    checks = [
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}"),
        (cfg.clip_loss in CLIP_LOSSES, f"clip_loss must be one of {CLIP_LOSSES}, got {cfg.clip_loss!r}"),
        (cfg.clip_weight >= 0, f"clip_weight must be >= 0, got {cfg.clip_weight}"),
        (cfg.trainable in TRAINABLE_SETS, f"trainable must be one of {TRAINABLE_SETS}, got {cfg.trainable!r}"),
        (cfg.encoder.patch_embed_init in PATCH_EMBED_INITS,
         f"encoder.patch_embed_init must be one of {PATCH_EMBED_INITS}, got {cfg.encoder.patch_embed_init!r}"),
        (cfg.val_sampler in SAMPLERS, f"val_sampler must be one of {SAMPLERS}, got {cfg.val_sampler!r}"),
        (cfg.val_every_n_epochs >= 1, f"val_every_n_epochs must be >= 1, got {cfg.val_every_n_epochs}"),
        (cfg.export in ("best", "last"), f"export must be 'best' or 'last', got {cfg.export!r}"),
        (cfg.context_tokens >= 2, f"context_tokens must be >= 2, got {cfg.context_tokens}"),
        (cfg.clip_temperature > 0, f"clip_temperature must be > 0 (the contrastive loss divides by it), got "
                                   f"{cfg.clip_temperature}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.n_val_samples >= 0, f"n_val_samples must be >= 0, got {cfg.n_val_samples}"),
        (cfg.sample_every_n_epochs >= 0, f"sample_every_n_epochs must be >= 0 (0 = no image grids), got "
                                         f"{cfg.sample_every_n_epochs}"),
        (1 <= cfg.val_inference_steps <= 1000, f"val_inference_steps must be in [1, 1000] (validation samples images "
                                               f"with it), got {cfg.val_inference_steps}"),
        (not cfg.classifier or cfg.n_val_samples >= 1,
         "a classifier is set (val top-1 picks the best checkpoint), so n_val_samples must be >= 1"),
        (not cfg.selection_audit or cfg.classifier,
         "selection_audit=true scores test images with the n-way classifier: set classifier (and classifier_weights)"),
        (cfg.audit_trials >= 1 and cfg.audit_slots >= 1,
         f"audit_trials and audit_slots must be >= 1, got {cfg.audit_trials} and {cfg.audit_slots}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_trainer_settings(cfg)  # the trainer's values, and devices against torchrun's / SLURM's counts


def check_pretrained_files(cfg: DictConfig) -> None:
    """Fail in a second, with what to download and where, before any data or weights are loaded
    (`cfg` with resolved paths)."""

    if not Path(cfg.sd_path).exists():
        raise CheckpointError(f"Stable Diffusion 1.5 weights not found at {cfg.sd_path}: {DOWNLOAD_HINT}.")
    if cfg.clip_weight > 0 and not str(cfg.clip_path).startswith(OPEN_CLIP_PREFIX):
        check_clip_path(cfg.clip_path)
    if cfg.eeg_encoder_path and not Path(cfg.eeg_encoder_path).exists():
        raise CheckpointError(
            f"stage-1 EEG encoder not found at {cfg.eeg_encoder_path}: run stage 1 "
            "(code/stage1_pretrain_eeg.py) or put the authors' pretrained encoder there (pretrains/README.md), "
            "or set eeg_encoder_path=null to train the encoder from scratch"
        )
    if cfg.eeg_encoder_path:
        check_export(cfg.eeg_encoder_path, "stage-1 encoder export", "rerun stage 1 with resume=true in "
                     f"{Path(cfg.eeg_encoder_path).parent} to finish it")


def build_model(cfg: DictConfig, encoder: torch.nn.Module | None = None,
                clip_encoder: torch.nn.Module | None = None) -> DreamDiffusion:
    """A DreamDiffusion from a Stage2Config with resolved paths (`config.resolved`): SD1.5, the CLIP
    target, and the stage-1 encoder (or a fresh one with the sizes in `encoder` when
    `eeg_encoder_path` is null)."""

    if clip_encoder is None and cfg.clip_weight > 0:
        clip_encoder = load_clip_image_encoder(cfg.clip_path, cfg.clip_weights)
    overrides = time_cond_overrides() if cfg.use_time_cond else {}
    sd = load_sd15(cfg.sd_path, cfg.sd_config_dir, unet_overrides=overrides)
    if encoder is None:
        encoder = load_eeg_encoder(cfg.eeg_encoder_path) if cfg.eeg_encoder_path else build_encoder(dict(cfg.encoder))
    clip_dim = clip_encoder.projection_dim if clip_encoder is not None else cfg.clip_dim
    return DreamDiffusion.build(
        encoder, sd, clip_encoder=clip_encoder, clip_dim=clip_dim, context_tokens=cfg.context_tokens,
        global_pool=cfg.global_pool, pool_before_norm=cfg.pool_before_norm, clip_weight=cfg.clip_weight,
        clip_loss=cfg.clip_loss, clip_temperature=cfg.clip_temperature,
    )


def _check_model_fits_data(model: DreamDiffusion, cfg: DictConfig, n_channels: int, n_times: int) -> None:
    if cfg.data.image_size % model.vae_scale_factor:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be a multiple of the VAE's "
                          f"downsampling factor ({model.vae_scale_factor})")
    encoder_config = model.conditioner.encoder.config
    if (encoder_config["n_channels"], encoder_config["n_times"]) != (n_channels, n_times):
        adapt = ("data.n_times, the EEG file's channels" if cfg.data.kind == "imagenet_eeg"
                 else "data.things_eeg2.n_channels / n_times adapt the EEG")
        raise ConfigError(
            f"the EEG encoder expects [{encoder_config['n_channels']}, {encoder_config['n_times']}] inputs but "
            f"the data gives [{n_channels}, {n_times}] ({adapt})"
        )


@owns_output_folder("stage2", training_claim)  # refuses another stage's folder, other settings, a second run
def run_finetuning(cfg: DictConfig, model: DreamDiffusion | None = None) -> Path:
    """Fine-tune as `cfg` (a `Stage2Config`) says; return the output folder. `model` replaces the
    one built from the config's files (for tests and notebooks)."""

    check_config(cfg)
    paths = resolved(cfg)
    out_dir, ckpt_dir, last = output_paths(paths)
    check_output_dir(out_dir)
    if model is None:
        check_pretrained_files(paths)
    if paths.classifier:
        check_n_way(paths.classifier, paths.classifier_weights, cfg.n_way, where="stage 2's val top-1: ")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # the data (and its content checks) before the weights: a bad file stops the run in seconds
    train_set = paired_dataset(paths.data, "train", augment=True)
    val_set = paired_dataset(paths.data, "val", augment=False)
    model = model if model is not None else build_model(paths)
    if model.clip_encoder is not None:  # the CLIP input is the alignment target's own preprocessing
        train_set.clip_transform = val_set.clip_transform = model.clip_encoder.preprocess
    _check_model_fits_data(model, paths, train_set.n_channels, train_set.n_times)

    val_items = [val_set[i] for i in range(min(cfg.n_val_samples, len(val_set)))]
    module = Stage2Module(model, to_container(cfg), val_items, paths=to_container(paths))
    # CLIP embeddings (and with cache_latents the VAE latents) computed once at fit start, not every step
    caches, train_set, val_set = work_done_once(paths, model, train_set, val_set)
    # Selection on val only. Without a classifier: the objective being trained. The diffusion term
    # alone hardly moves with conditioning quality (0.1540 vs 0.1547 between epochs whose CLIP term
    # fell 0.34 -> 0.30 in the demo), so selecting on it picks an arbitrary epoch.
    best = best_checkpoint(ckpt_dir, *(("val/top1", "max") if cfg.classifier else ("val/loss", "min")))
    training = {"config": to_container(cfg), "deviations": deviations(cfg)}
    if cfg.memory_check:
        module.memory_sample = train_set[0]
    export = ExportModel(out_dir / "model", best, cfg.export, training, out_dir / "metrics.csv")
    guard = NonFiniteGuard(f"a learning rate too high (lr={cfg.lr}), EEG of an implausible scale (the amplitude rule "
                           f"in datasets/README.md), or the CLIP loss's settings (clip_loss={cfg.clip_loss}, "
                           f"clip_temperature={cfg.clip_temperature})", last)
    callbacks = [EpochSeed(cfg.seed), Stage2MetricsCSV(out_dir / "metrics.csv"), RunStats(out_dir / "runtime.json"),
                 guard, export, best, last_checkpoint(ckpt_dir), *caches, *_selection_audit(cfg, paths, out_dir)]
    trainer = build_trainer(cfg, out_dir, callbacks, check_val_every_n_epoch=cfg.val_every_n_epochs,
                            enable_model_summary=False)  # select_trainable's table says what trains
    if cfg.resume:  # before anything is written: a refused resume leaves the folder as it was
        # its keys are what trains, so a run that trained other weights is refused here too
        check_resume_checkpoint(module, last, module.checkpoint_keys())
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
        atomic_write_text(out_dir / "trainable_parameters.txt", format_table(module.trainable_table) + "\n")
        _print_once(paths, module, len(train_set), len(val_set))
    # weights_only: our checkpoints hold tensors and plain data only, so nothing pickled is run on resume
    fit(trainer, module, train_dataloaders=_loader(paths, train_set, True), val_dataloaders=_loader(paths, val_set, False),
        ckpt_path=str(last) if cfg.resume else None, **FIT_WEIGHTS_ONLY)
    complete_export(export, trainer, module)  # a resume after the last epoch skips on_train_end
    if trainer.is_global_zero:
        _write_summary(cfg, out_dir, module, trainer)
    return out_dir


def _selection_audit(cfg: DictConfig, paths: DictConfig, out_dir: Path) -> list[pl.Callback]:
    """The selection audit's callback on the first `audit_trials` test trials (none unless selection_audit)."""
    if not cfg.selection_audit:
        return []
    test_set = paired_dataset(paths.data, "test", augment=False)
    items = [test_set[i] for i in range(min(cfg.audit_trials, len(test_set)))]
    return [SelectionAudit(out_dir, items, cfg.audit_slots, cfg.n_way, paths.classifier, paths.classifier_weights)]


def _loader(cfg: DictConfig, dataset, shuffle: bool) -> DataLoader:
    pin = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.trainer.num_workers,
                      pin_memory=pin, drop_last=False, persistent_workers=cfg.trainer.num_workers > 0)


def _write_summary(cfg: DictConfig, out_dir: Path, module: Stage2Module, trainer: pl.Trainer) -> None:

    with (out_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    selection_file = out_dir / "model" / "selection.json"
    selection = read_own_json(selection_file, f"rerun stage 2 with resume=true in {out_dir} to rewrite its export",
                              CheckpointError) if selection_file.is_file() else {}
    trainable = sum(r["trainable"] for r in module.trainable_table)
    val_rows = [r for r in rows if r.get("val_loss")]
    last_val = val_rows[-1] if val_rows else {}
    summary = {"epochs_done": len(rows), "optimizer_steps": trainer.global_step, "trainable_parameters": trainable,
               "trainable": cfg.trainable, "selection": selection,
               **{k: (float(last_val[k]) if last_val.get(k) else None)
                  for k in ("val_loss", "val_diffusion", "val_clip", "val_top1")}}
    table = [("epochs done", f"{len(rows)} of {cfg.epochs}"), ("optimiser steps", str(trainer.global_step)),
             ("trainable parameters", f"{trainable:,} ({cfg.trainable} set)"),
             ("last val loss (diffusion + CLIP term)", last_val.get("val_loss") or "-"),
             ("last val CLIP term", last_val.get("val_clip") or "-"), ("last val top-1", last_val.get("val_top1") or "-"),
             ("exported", f"{selection.get('export', '-')} (epoch {selection.get('epoch', '-')}, chosen on "
                          f"{selection.get('chosen_on', '-')})"), ("fidelity", cfg.fidelity)]
    audit = summarise_audit(out_dir, selection)  # None unless selection_audit=true
    if audit is not None:
        summary["selection_audit"] = audit
        table += audit_table_rows(audit)
    write_run_summary(cfg, out_dir, "Stage 2: fine-tuning SD1.5 on EEG", summary, table)


@rank_zero_only
def _print_once(paths: DictConfig, module: Stage2Module, n_train: int, n_val: int) -> None:
    data = paths.data
    where = (f"ImageNet-EEG subject {data.subject}, split {data.split_index}" if data.kind == "imagenet_eeg" else
             f"THINGS-EEG2 subject {data.subject or 'all'}" + (f", leaving out {data.things_eeg2.leave_out}"
                                                               if data.things_eeg2.leave_out is not None else ""))
    print(
        f"stage 2: {n_train} training / {n_val} val trials ({where}); best checkpoint by {'val top-1' if paths.classifier else 'val loss'}; "
        f"fidelity {paths.fidelity} (trainable set: {paths.trainable}); output {paths.output_dir}"
        + (" (resuming from checkpoints/last.ckpt)" if paths.resume else "")
    )
    print(format_table(module.trainable_table))


def main(argv: Sequence[str] | None = None) -> Any:
    """`code/stage2_finetune_sd.py`: the command line, then `run_finetuning`."""
    return STAGES["stage2"].main(argv, run_finetuning)
