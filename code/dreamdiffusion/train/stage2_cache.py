"""Stage 2's work done once, wired into a run: the per-image features of `data/stage2_cache.py` computed
when the fit starts - the model on its device, under the precision the training step runs with, so
the numbers are those the step would compute - and handed to the train and val datasets before any
DataLoader worker starts.

    clip_embeds      with cache_clip_embeddings (default) and a frozen CLIP target
    latent_moments   with cache_latents=true (the random crop is off: a deviation, core/fidelity.py)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from dreamdiffusion.data.stage2_cache import (
    UnaugmentedImage,
    WithImageFeatures,
    cache_key,
    default_cache_dir,
    load_or_compute,
)
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion

logger = logging.getLogger(__name__)


class WorkDoneOnce(pl.Callback):
    """At fit start: the features `clip` / `latents` of every image of `datasets`, read from `cache_dir`
    or computed once on this process's device (every process computes what is missing; rank 0 writes
    the files), then installed into the datasets."""

    def __init__(self, datasets: list[WithImageFeatures], cache_dir: Path, clip: bool, latents: bool,
                 image_size: int, batch_size: int, num_workers: int):
        self.datasets, self.cache_dir = datasets, Path(cache_dir)
        self.clip, self.latents, self.image_size = clip, latents, image_size
        self.batch_size, self.num_workers = batch_size, num_workers

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        model: DreamDiffusion = pl_module.model
        paths = list(dict.fromkeys(p for d in self.datasets for p in d.image_paths()))
        precision, device, step_context = str(trainer.precision), pl_module.device, trainer.precision_plugin.train_step_context
        common = dict(paths=paths, cache_dir=self.cache_dir, device=device, batch_size=self.batch_size,
                      num_workers=self.num_workers, write=trainer.is_global_zero)
        features: dict[str, torch.Tensor] = {}
        if self.clip:
            encoder = model.clip_encoder
            # its own preprocessing (`ImageEmbedder._preprocess`), described by a repr that is stable across runs
            key = cache_key(encoder, paths, precision, device, preprocess=repr(encoder._preprocess))

            def clip_embeds(pixels: torch.Tensor) -> torch.Tensor:
                with step_context():
                    return encoder(pixels)

            features["clip_embeds"] = load_or_compute("clip_embeds", key, prepare=encoder.preprocess,
                                                      network=clip_embeds, **common)
        if self.latents:
            prepare = UnaugmentedImage(self.image_size)
            key = cache_key(model.vae, paths, precision, device, preprocess=repr(prepare))

            def latent_moments(images: torch.Tensor) -> torch.Tensor:
                with step_context():
                    return model.image_moments(images)

            features["latent_moments"] = load_or_compute("latent_moments", key, prepare=prepare,
                                                         network=latent_moments, **common)
        for dataset in self.datasets:
            dataset.install(paths, features)
        seconds = round(time.perf_counter() - started, 2)
        getattr(pl_module, "runtime", {})["work_done_once"] = {"features": sorted(features), "images": len(paths),
                                                               "seconds": seconds, "cache_dir": str(self.cache_dir)}


def work_done_once(cfg: DictConfig, model: DreamDiffusion, train_set: Any, val_set: Any
                   ) -> tuple[list[pl.Callback], Any, Any]:
    """(the callback or none, train set, val set) for a stage-2 config with resolved paths. The sets
    come back wrapped (`WithImageFeatures`) when something is cached. Call after `select_trainable`,
    which decides whether the CLIP target is frozen."""
    clip = bool(cfg.cache_clip_embeddings) and model.clip_encoder is not None and cfg.clip_weight > 0
    if clip and model.clip_target != "frozen":
        logger.info("stage 2: the CLIP embeddings are computed at every step: trainable=%s trains CLIP's "
                    "layer_norm2, so they change", cfg.trainable)
        clip = False
    if not (clip or cfg.cache_latents):
        return [], train_set, val_set
    train_set, val_set = WithImageFeatures(train_set), WithImageFeatures(val_set)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cfg.output_dir)
    callback = WorkDoneOnce([train_set, val_set], cache_dir, clip, bool(cfg.cache_latents), cfg.data.image_size,
                            cfg.batch_size, cfg.trainer.num_workers)
    return [callback], train_set, val_set
