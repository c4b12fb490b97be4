"""Stable Diffusion 1.5 without the hub: local configs, CompVis single files and diffusers folders.

SD1.5 is distributed in two layouts:
- CompVis (`v1-5-pruned.ckpt` / `.safetensors`): one state dict with `model.diffusion_model.*` (UNet)
  and `first_stage_model.*` (VAE), optionally nested under `state_dict`, plus keys we do not use
  (`cond_stage_model.*` = the CLIP text encoder, `model_ema.*`, the schedule buffers `betas`,
  `alphas_cumprod`, ...). Read and written by `dreamdiffusion.models.original_formats`.
- diffusers (a folder with `unet/`, `vae/`, `scheduler/`).

For a single file the models are built from local configs - by default SD1.5's own, shipped with
this package in `sd15_config/` (diffusers' `from_single_file` would ask the hub for them) - and the
weights are converted with diffusers' own `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint`. Those converters silently drop keys they do not know, so the file's
keys are first compared with the exact list the configured models expect
(`original.compvis_key_map`, the inverse of diffusers' rules); a missing or extra key is a
`CheckpointError` that lists them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.models import original_formats as original

logger = logging.getLogger(__name__)

# SD1.5's UNet, VAE and noise-scheduler configs (diffusers layout, no weights), shipped with the package.
SD15_CONFIG_DIR = Path(__file__).resolve().parent / "sd15_config"

DOWNLOAD_HINT = (
    "download Stable Diffusion 1.5 (`v1-5-pruned.ckpt` of stable-diffusion-v1-5/stable-diffusion-v1-5 on "
    "the Hugging Face hub: `python code/download_weights.py --only sd15` puts it at "
    "pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt) or point `sd_path` at your copy (a CompVis "
    ".ckpt/.safetensors file or a diffusers-layout folder); pretrains/README.md lists every file the "
    "project expects"
)


@dataclass
class SD15Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    # DDPM noise schedule for training (`add_noise`); `noise_scheduler.config` holds the original
    # scheduler config, from which samplers (PLMS, DDIM, DPM-Solver) are built.
    noise_scheduler: DDPMScheduler
    # Where `vae.config.scaling_factor` (the latent scale) came from, for the protocol.
    latent_scale_source: str = "the VAE config"


def set_latent_scale(parts: SD15Components, scale_factor: float | None, source: str) -> SD15Components:
    """Use a checkpoint's own LatentDiffusion `scale_factor` as the latent scale, when it has one."""
    if scale_factor is not None:
        parts.vae.register_to_config(scaling_factor=scale_factor)
        parts.latent_scale_source = f"the 'scale_factor' key of {source}"
    return parts


# ---------------------------------------------------------------------------------------------
# Configs and models


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{what} not found: {path} (a diffusers-layout config folder needs unet/config.json, "
            "vae/config.json and scheduler/scheduler_config.json; dreamdiffusion/models/sd15_config/ has SD1.5's)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from err


def read_sd15_configs(config_dir: str | os.PathLike | None = None) -> tuple[dict, dict, dict]:
    """(unet_config, vae_config, scheduler_config) from a diffusers-layout folder (default: SD1.5's)."""
    root = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
    return (
        _read_json(root / "unet" / "config.json", "UNet config"),
        _read_json(root / "vae" / "config.json", "VAE config"),
        _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config"),
    )


def build_sd15(
    unet_config: dict, vae_config: dict, scheduler_config: dict, unet_overrides: dict | None = None
) -> SD15Components:
    """Randomly initialised models from configs (`unet_overrides`, e.g. `class_embed_type`, on top)."""
    # diffusers resets the keys listed in `_use_default_values` to their defaults, which would undo
    # an override of such a key: drop the list, the explicit values are what we want.
    unet_config = {k: v for k, v in unet_config.items() if k != "_use_default_values"}
    vae_config = {k: v for k, v in vae_config.items() if k != "_use_default_values"}
    unet = UNet2DConditionModel.from_config({**unet_config, **(unet_overrides or {})}).eval()
    vae = AutoencoderKL.from_config(vae_config).eval()
    return SD15Components(unet, vae, DDPMScheduler.from_config(scheduler_config))


# ---------------------------------------------------------------------------------------------
# Loading


def load_diffusers_folder(folder: Path, unet_overrides: dict | None = None,
                          torch_dtype: torch.dtype | None = None) -> SD15Components:
    """UNet, VAE and noise scheduler from a diffusers-layout folder, strictly (eval mode), in
    `torch_dtype` when given (else as stored)."""
    unet_overrides = dict(unet_overrides or {})
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    models = []
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        if not (folder / sub / "config.json").is_file():
            raise CheckpointError(f"{folder} is not a diffusers-layout Stable Diffusion folder: {sub}/config.json is missing")
        kwargs = {**(unet_overrides if sub == "unet" else {}), **dtype}
        try:
            model, info = cls.from_pretrained(
                folder, subfolder=sub, local_files_only=True, output_loading_info=True, low_cpu_mem_usage=False,
                **kwargs,
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"could not load the {sub} of {folder}: {err}") from err
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise CheckpointError(f"{folder}/{sub} weights do not match its config: {bad}")
        models.append(model)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    return SD15Components(models[0], models[1], DDPMScheduler.from_config(scheduler_config))


def sd15_from_compvis(state_dict: dict[str, torch.Tensor], source: str, config_dir: str | os.PathLike | None = None,
                      unet_overrides: dict | None = None) -> SD15Components:
    """UNet + VAE from a CompVis state dict, built from `config_dir` (default SD1.5's), strictly.

    The key set is checked on an empty (meta-device) skeleton first, so a mismatch fails in a
    second, before gigabytes are allocated. A LatentDiffusion `scale_factor` key sets the latent scale.
    """
    state_dict = dict(state_dict)
    scale_factor = original.pop_scale_factor(state_dict)
    configs = read_sd15_configs(config_dir)
    with torch.device("meta"):
        skeleton = build_sd15(*configs, unet_overrides=unet_overrides)
    original.load_compvis_weights(skeleton.unet, skeleton.vae, state_dict, source, check_only=True)
    parts = build_sd15(*configs, unet_overrides=unet_overrides)
    skipped = original.load_compvis_weights(parts.unet, parts.vae, state_dict, source)
    if skipped:
        logger.info("%s: skipped %d keys of unused parts (%s)", source, len(skipped), ", ".join(sorted(skipped)[:4]))
    return set_latent_scale(parts, scale_factor, source)


def load_sd15(
    sd_path: str | os.PathLike,
    config_dir: str | os.PathLike | None = None,
    unet_overrides: dict | None = None,
) -> SD15Components:
    """UNet, VAE (both in eval mode) and training noise scheduler of SD1.5 from local files only.

    sd_path: a CompVis single file (`.ckpt`/`.pth`/`.safetensors`, configs from `config_dir`,
        default SD1.5's) or a diffusers-layout folder (its own configs).
    unet_overrides: UNet config entries to change, e.g. `{"class_embed_type": "identity"}` for the
        EEG time conditioning (a parameter-free change, so the weights still load strictly).
    """
    path = Path(sd_path)
    if not path.exists():
        raise CheckpointError(f"Stable Diffusion 1.5 weights not found at {path}: {DOWNLOAD_HINT}.")
    if path.is_dir():
        return load_diffusers_folder(path, unet_overrides)
    return sd15_from_compvis(original.read_compvis_file(path), str(path), config_dir, unet_overrides)
