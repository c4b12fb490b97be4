"""Stable Diffusion 1.5 without the hub: local configs, CompVis single files and diffusers folders.

SD1.5 is distributed in two layouts:
- CompVis (`v1-5-pruned.ckpt` / `.safetensors`): one state dict with `model.diffusion_model.*` (UNet)
  and `first_stage_model.*` (VAE), optionally nested under `state_dict`, plus keys we do not use
  (`cond_stage_model.*` = the CLIP text encoder, `model_ema.*`, the schedule buffers `betas`,
  `alphas_cumprod`, ...).
- diffusers (a folder with `unet/`, `vae/`, `scheduler/`).

For a single file the models are built from the LOCAL configs in `configs/sd15/` (diffusers'
`from_single_file` asks the hub for them unless given a config) and the weights are converted with
diffusers' own `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`. Those converters
silently drop keys they do not know, so the file's keys are first compared with the exact list the
configured models expect (`compvis_key_map`, the inverse of diffusers' rules); a missing or extra
key is a `CheckpointError` that lists them. The same map writes CompVis files
(`save_compvis_checkpoint`), which diffusers cannot do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from .errors import CheckpointError
from .io import atomic_path, atomic_torch_save, safe_torch_load

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Keys of a CompVis SD file that belong to parts we do not use: the text encoder (replaced by EEG),
# the EMA copy (the authors fine-tune the non-EMA weights) and LatentDiffusion's schedule buffers
# (the noise scheduler recomputes them from its config).
UNUSED_PREFIXES = ("cond_stage_model.", "model_ema.", "first_stage_model.loss.")
SCHEDULE_BUFFERS = frozenset(
    {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    }
)
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


# ---------------------------------------------------------------------------------------------
# Configs and models


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{what} not found: {path} (a diffusers-layout config folder needs unet/config.json, "
            "vae/config.json and scheduler/scheduler_config.json; configs/sd15/ has SD1.5's)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from err


def read_sd15_configs(config_dir: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(unet_config, vae_config, scheduler_config) from a diffusers-layout folder."""
    root = Path(config_dir)
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
# CompVis <-> diffusers key names

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _unet_key_to_compvis(key: str, layers_per_block: int, attention_blocks: set[int]) -> str | None:
    """diffusers UNet key -> CompVis key (without prefix); None for a key the layout has no place for."""
    step = layers_per_block + 1  # resnets (+ attentions) per level, plus one down/up-sampler slot
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, leaf = key.rpartition(".")
    if head in simple:
        return f"{simple[head]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + block * step + j
        return f"input_blocks.{i}.0.{_rename_resnet(rest, _UNET_RESNET)}" if kind == "resnets" \
            else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = block * step + j
        return f"output_blocks.{i}.0.{_rename_resnet(rest, _UNET_RESNET)}" if kind == "resnets" \
            else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in attention_blocks else 1  # after the attention, if the level has one
        return f"output_blocks.{block * step + layers_per_block}.{slot}.conv.{m[2]}"
    return None


def _vae_key_to_compvis(key: str, n_levels: int) -> str | None:
    head, _, leaf = key.rpartition(".")
    simple = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    if head in simple:
        return f"{simple[head]}.{leaf}"
    if head in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(en|de)coder\.conv_(in|out)", head):
        return key
    nin = [("conv_shortcut", "nin_shortcut")]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_resnet(m[3], nin)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # CompVis numbers the decoder's levels from the lowest resolution up, diffusers the reverse
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{_rename_resnet(m[3], nin)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(en|de)coder\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}coder.mid.block_{int(m[2]) + 1}.{_rename_resnet(m[3], nin)}"
    if m := re.fullmatch(r"(en|de)coder\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] in _VAE_ATTENTION:
            return f"{m[1]}coder.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    return None


def compvis_key_map(unet: UNet2DConditionModel, vae: AutoencoderKL) -> dict[str, str]:
    """`{"unet.<diffusers key>" | "vae.<diffusers key>": "<CompVis key with prefix>"}` for every tensor."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise CheckpointError(f"the CompVis layout needs one layers_per_block for every level, got {layers}")
    attention_blocks = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    mapping, unplaced = {}, []
    for key in unet.state_dict():
        ldm = _unet_key_to_compvis(key, layers, attention_blocks)
        if ldm is None:
            unplaced.append(f"unet.{key}")
        mapping[f"unet.{key}"] = UNET_PREFIX + str(ldm)
    n_levels = len(vae.config.block_out_channels)
    for key in vae.state_dict():
        ldm = _vae_key_to_compvis(key, n_levels)
        if ldm is None:
            unplaced.append(f"vae.{key}")
        mapping[f"vae.{key}"] = VAE_PREFIX + str(ldm)
    if unplaced:
        raise CheckpointError(f"these UNet/VAE tensors have no place in the CompVis layout: {unplaced[:10]}")
    return mapping


def _is_unused(key: str) -> bool:
    return key.startswith(UNUSED_PREFIXES) or key in SCHEDULE_BUFFERS


def _list(keys, n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def unwrap_state_dict(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat state dict of a CompVis file (Lightning files nest it under `state_dict`)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not any(str(k).startswith(UNET_PREFIX) for k in checkpoint):
        raise CheckpointError(
            f"{source} is not a CompVis-layout Stable Diffusion checkpoint: expected keys "
            f"'{UNET_PREFIX}*' and '{VAE_PREFIX}*' (optionally under 'state_dict')"
        )
    return checkpoint


def load_compvis_weights(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    state_dict: dict[str, torch.Tensor],
    source: str,
    check_only: bool = False,
) -> list[str]:
    """Load a CompVis state dict into `unet` and `vae` strictly; return the unused keys it skipped.

    Every `model.diffusion_model.*` / `first_stage_model.*` key the models expect must be there and
    no other may be, except the unused groups (text encoder, EMA, schedule buffers); anything else
    is a CheckpointError. `check_only` compares the key sets and loads nothing.
    """
    expected = set(compvis_key_map(unet, vae).values())
    present = {k for k in state_dict if k.startswith((UNET_PREFIX, VAE_PREFIX)) and not _is_unused(k)}
    skipped = sorted(k for k in state_dict if _is_unused(k))
    unknown = sorted(k for k in state_dict if k not in present and not _is_unused(k))
    missing, unexpected = expected - present, present - expected
    if missing or unexpected or unknown:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({_list(missing)})")
        if unexpected or unknown:
            problems.append(f"unexpected {len(unexpected) + len(unknown)} keys ({_list([*unexpected, *unknown])})")
        raise CheckpointError(
            f"{source} does not match the UNet/VAE configs: {'; '.join(problems)}. Is the config folder "
            "the one of this checkpoint (configs/sd15 for SD1.5)?"
        )
    if check_only:
        return skipped
    ours = {k: v for k, v in state_dict.items() if k in present}
    unet_sd = convert_ldm_unet_checkpoint(ours, dict(unet.config))
    vae_sd = convert_ldm_vae_checkpoint(ours, dict(vae.config))
    for module, converted, what in ((unet, unet_sd, "UNet"), (vae, vae_sd, "VAE")):
        try:
            module.load_state_dict(converted, strict=True)
        except RuntimeError as err:  # shape mismatches (or a converter/key-map disagreement)
            raise CheckpointError(f"{source}: the {what} weights do not fit the config: {err}") from err
    return skipped


def save_compvis_checkpoint(
    unet: UNet2DConditionModel, vae: AutoencoderKL, path: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write the UNet and VAE as a CompVis-layout file (`.safetensors`, else a torch file with the
    state dict under `state_dict`, like `v1-5-pruned.ckpt`). `extra` tensors are added as they are."""
    path = Path(path)
    state_dict = {}
    modules = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    for ours, ldm in compvis_key_map(unet, vae).items():
        group, _, key = ours.partition(".")
        tensor = modules[group][key].detach().cpu().contiguous()
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor[:, :, None, None]  # CompVis' VAE attention uses 1x1 convolutions
        state_dict[ldm] = tensor
    state_dict.update(extra or {})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(state_dict, str(tmp))
    else:
        atomic_torch_save({"state_dict": state_dict}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def read_compvis_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"Stable Diffusion file {path} could not be read as safetensors: {err}") from err
    return unwrap_state_dict(safe_torch_load(path, "Stable Diffusion checkpoint"), str(path))


def _load_diffusers_folder(folder: Path, unet_overrides: dict) -> SD15Components:
    models = []
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        if not (folder / sub / "config.json").is_file():
            raise CheckpointError(f"{folder} is not a diffusers-layout Stable Diffusion folder: {sub}/config.json is missing")
        kwargs = unet_overrides if sub == "unet" else {}
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


def load_sd15(
    sd_path: str | os.PathLike,
    config_dir: str | os.PathLike = "configs/sd15",
    unet_overrides: dict | None = None,
) -> SD15Components:
    """UNet, VAE (both in eval mode) and training noise scheduler of SD1.5 from local files only.

    sd_path: a CompVis single file (`.ckpt`/`.pth`/`.safetensors`, configs from `config_dir`) or a
        diffusers-layout folder (its own configs).
    unet_overrides: UNet config entries to change, e.g. `{"class_embed_type": "identity"}` for the
        EEG time conditioning (a parameter-free change, so the weights still load strictly).
    """
    from .config import resolve_path

    path = resolve_path(sd_path)
    unet_overrides = dict(unet_overrides or {})
    if path is None or not path.exists():
        raise CheckpointError(f"Stable Diffusion 1.5 weights not found at {path}: {DOWNLOAD_HINT}.")
    if path.is_dir():
        return _load_diffusers_folder(path, unet_overrides)
    configs = read_sd15_configs(resolve_path(config_dir))
    state_dict = read_compvis_file(path)
    with torch.device("meta"):  # check the key set on an empty skeleton first: a mismatch fails in a second
        skeleton = build_sd15(*configs, unet_overrides=unet_overrides)
    load_compvis_weights(skeleton.unet, skeleton.vae, state_dict, str(path), check_only=True)
    parts = build_sd15(*configs, unet_overrides=unet_overrides)
    skipped = load_compvis_weights(parts.unet, parts.vae, state_dict, str(path))
    if skipped:
        logger.info("%s: skipped %d keys of unused parts (%s)", path, len(skipped), _list(skipped, 4))
    return parts
