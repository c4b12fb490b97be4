"""Files in the original, non-diffusers formats: the CompVis/LDM layout and the authors' checkpoints.

Everything the project reads or writes in a layout it did not define lives here, so the models
never parse foreign key names themselves:

- the CompVis (LDM) layout of Stable Diffusion single files (`v1-5-pruned.ckpt`): a map from
  diffusers' key names to CompVis' (`compvis_key_map`, the inverse of diffusers' converter), a
  strict loader (`load_compvis_weights`) and a writer (`save_compvis_checkpoint`);
- the authors' stage-1 checkpoint (`torch.save({"model", "optimizer", "epoch", "config":
  <config.Config_MBM_EEG>})` of their stageA1_eeg_pretrain.py): `read_stage1_checkpoint`,
  `write_stage1_checkpoint`;
- the authors' generation checkpoint (`checkpoint.pth` of their eeg_ldm.py: `{"model_state_dict":
  <LatentDiffusion state dict>, "config": <config.Config_Generative_Model>, "state": <rng state>}`):
  `read_generation_checkpoint`, `write_generation_checkpoint`.

Their pickled config objects are read without importing their code (`io.safe_torch_load` rebuilds
them as inert `PickledObject`s) and written through `pickled_as`, which gives a plain object the
class path their files carry. docs/method.md, "The authors' files", lists the facts relied on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.core.files import atomic_path, atomic_torch_save, pickled_attrs, safe_torch_load

# ---------------------------------------------------------------------------------------------
# The CompVis / LDM layout of Stable Diffusion

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# LatentDiffusion registers its latent scale as a buffer when trained with `scale_by_std` (its value
# then learnt from the first batch); otherwise it is a plain attribute (0.18215 for SD1.5).
SCALE_FACTOR_KEY = "scale_factor"
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
            "the one of this checkpoint (the package's SD1.5 configs for SD1.5)?"
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


def compvis_state_dict(unet: UNet2DConditionModel, vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The UNet and VAE weights under their CompVis key names (CPU tensors)."""
    state_dict = {}
    modules = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    for ours, ldm in compvis_key_map(unet, vae).items():
        group, _, key = ours.partition(".")
        tensor = modules[group][key].detach().cpu().contiguous()
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor[:, :, None, None]  # CompVis' VAE attention uses 1x1 convolutions
        state_dict[ldm] = tensor
    return state_dict


def save_compvis_checkpoint(
    unet: UNet2DConditionModel, vae: AutoencoderKL, path: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write the UNet and VAE as a CompVis-layout file (`.safetensors`, else a torch file with the
    state dict under `state_dict`, like `v1-5-pruned.ckpt`). `extra` tensors are added as they are."""
    path = Path(path)
    state_dict = {**compvis_state_dict(unet, vae), **(extra or {})}
    if path.suffix == ".safetensors":

        with atomic_path(path) as tmp:
            save_file(state_dict, str(tmp))
    else:
        atomic_torch_save({"state_dict": state_dict}, path)
    return path


def read_compvis_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat CompVis state dict of a `.ckpt`/`.pth` (read without running pickled code) or `.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"Stable Diffusion file {path} could not be read as safetensors: {err}") from err
    # mmap: the 4-8 GB file is paged in as its tensors are copied into the models, and DDP ranks share the pages
    return unwrap_state_dict(safe_torch_load(path, "Stable Diffusion checkpoint", mmap=True), str(path))


def pop_scale_factor(state_dict: dict[str, torch.Tensor]) -> float | None:
    """Remove LatentDiffusion's `scale_factor` buffer from `state_dict` and return its value (or None)."""
    value = state_dict.pop(SCALE_FACTOR_KEY, None)
    if value is None:
        return None
    try:
        return float(torch.as_tensor(value).reshape(()))
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's '{SCALE_FACTOR_KEY}' is not a number: {value!r}") from err


@contextlib.contextmanager
def pickled_as(module: str, name: str, attrs: dict[str, Any]) -> Iterator[Any]:
    """An object that pickles as an instance of `module.name` (e.g. the authors' `config.Config_MBM_EEG`)
    with `attrs`, for writing files in their format. The throw-away module is gone afterwards."""
    if module in sys.modules:
        raise RuntimeError(f"a module named {module!r} is already imported; refusing to shadow it")
    fake = types.ModuleType(module)
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    setattr(fake, name, cls)
    sys.modules[module] = fake
    try:
        obj = cls()
        obj.__dict__.update(attrs)
        yield obj
    finally:
        del sys.modules[module]


# ---------------------------------------------------------------------------------------------
# The authors' stage-1 checkpoint (MAEforEEG)

# Their Config_MBM_EEG attribute -> our EEGEncoder argument.
STAGE1_CONFIG_ATTRS = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads",
                       "patch_size": "patch_size", "mlp_ratio": "mlp_ratio", "time_len": "n_times"}


def read_stage1_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(encoder weights without prefix, sizes in our argument names) of a stage-1 checkpoint:
    the authors' `{"model", "config"}` file, or our own Lightning `last.ckpt` (`state_dict` with
    `model.encoder.*` keys and the config as plain data)."""
    ckpt = safe_torch_load(path, "EEG encoder checkpoint")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        attrs = pickled_attrs(ckpt.get("config"))
        return dict(ckpt["model"]), {ours: attrs[theirs] for theirs, ours in STAGE1_CONFIG_ATTRS.items()
                                     if attrs.get(theirs) is not None}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        prefix = "model.encoder."
        weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        encoder_cfg = dict((ckpt.get("config") or {}).get("encoder") or {})
        return weights, {k: v for k, v in encoder_cfg.items() if k in STAGE1_CONFIG_ATTRS.values() or k == "n_channels"}
    keys = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise CheckpointError(
        f"{path} is not a stage-1 checkpoint: expected a dict with 'model' (the authors' format) or "
        f"'state_dict' (ours), found {keys}"
    )


def write_stage1_checkpoint(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                            config_attrs: dict[str, Any], epoch: int = 0) -> Path:
    """`state_dict` (MAEforEEG key names) in the authors' stage-1 layout, their config pickled as
    `config.Config_MBM_EEG` with `config_attrs` (their attribute names)."""
    with pickled_as("config", "Config_MBM_EEG", config_attrs) as config:
        atomic_torch_save({"model": state_dict, "optimizer": {}, "epoch": epoch, "config": config}, path)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# The authors' generation checkpoint (LatentDiffusion with their cond_stage_model)

# Prefix in their state dict -> part of our EEGConditioner.
GENERATION_PREFIXES = {
    "cond_stage_model.mae.": "encoder",
    "cond_stage_model.channel_mapper.": "channel_mapper",
    "cond_stage_model.dim_mapper.": "dim_mapper",
    "cond_stage_model.mapping.": "clip_head",
    "model.diffusion_model.time_embed_condtion.": "time_cond",  # sic, their spelling
}
# Their CLIP head (`mapping`): maxpool = Conv1d(N -> 1), fc = Linear(D -> 768) = our clip_head.0 / .1
CLIP_HEAD_NAMES = {"maxpool.": "0.", "fc.": "1."}
# Parts of their checkpoint this project does not use: their (drifting) CLIP image embedder and
# the unused classifier head of their cond_stage_model.
GENERATION_UNUSED_PREFIXES = ("image_embedder.", "cond_stage_model.cls_net.")
GENERATION_CONFIG_ATTRS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")


@dataclass
class GenerationCheckpoint:
    """The parts of an authors' generation checkpoint, in our names."""

    source: str
    conditioner: dict[str, dict[str, torch.Tensor]]  # part -> {key without prefix: tensor}
    compvis: dict[str, torch.Tensor]  # the UNet + VAE in the CompVis layout (and unused SD keys)
    config: dict[str, Any]  # the pickled Config_Generative_Model's attributes
    scale_factor: float | None  # LatentDiffusion's `scale_factor` buffer, when the file has one
    unused: list[str] = field(default_factory=list)

    @property
    def encoder_sizes(self) -> dict[str, Any]:
        return {k: self.config[k] for k in GENERATION_CONFIG_ATTRS if k in self.config}

    @property
    def global_pool(self) -> bool:
        return not self.conditioner["channel_mapper"]

    @property
    def use_time_cond(self) -> bool:
        return bool(self.conditioner["time_cond"])


def _split_generation_state(state: dict[str, torch.Tensor], source: str) -> GenerationCheckpoint:
    state = dict(state)
    scale_factor = pop_scale_factor(state)
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in GENERATION_PREFIXES.values()}
    compvis, unused = {}, []
    for key, tensor in state.items():
        prefix = next((p for p in GENERATION_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            if key.startswith(GENERATION_UNUSED_PREFIXES):
                unused.append(key)
            else:
                compvis[key] = tensor
            continue
        rest, part = key[len(prefix):], GENERATION_PREFIXES[prefix]
        if part == "clip_head":
            rest = next((new + rest[len(old):] for old, new in CLIP_HEAD_NAMES.items() if rest.startswith(old)), rest)
        parts[part][rest] = tensor
    return GenerationCheckpoint(source, parts, compvis, {}, scale_factor, unused)


def read_generation_checkpoint(path: str | os.PathLike) -> GenerationCheckpoint:
    """The authors' released `checkpoint.pth`, split into our parts; read without running pickled code."""
    source = str(path)
    checkpoint = safe_torch_load(path, "DreamDiffusion generation checkpoint", mmap=True)  # shared pages, read on use
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise CheckpointError(
            f"{source} is not an authors'-format generation checkpoint: expected a dict with "
            "'model_state_dict' (and 'config'), as written by their eeg_ldm.py"
        )
    parsed = _split_generation_state(checkpoint["model_state_dict"], source)
    parsed.config = pickled_attrs(checkpoint.get("config"))
    for required, theirs in (("encoder", "mae"), ("dim_mapper", "dim_mapper")):
        if not parsed.conditioner[required]:
            raise CheckpointError(f"{source} has no 'cond_stage_model.{theirs}.*' keys: not a DreamDiffusion "
                                  "generation checkpoint")
    if not parsed.conditioner["clip_head"]:
        raise CheckpointError(f"{source} has no 'cond_stage_model.mapping.*' (CLIP head) keys; it was trained "
                              "without clip_tune")
    return parsed


def write_generation_checkpoint(model: Any, path: str | os.PathLike, config_attrs: dict[str, Any] | None = None,
                                extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A `DreamDiffusion` in the authors' `checkpoint.pth` layout (for tests and the rehearsal).

    `config_attrs` go into the pickled `config.Config_Generative_Model` (default: the encoder's
    sizes); `extra` tensors are added to the state dict as they are (e.g. `scale_factor`).
    """
    state = {key: tensor for key, tensor in compvis_state_dict(model.unet, model.vae).items()}
    ours_to_theirs = {part: prefix for prefix, part in GENERATION_PREFIXES.items()}
    for key, tensor in model.conditioner.state_dict().items():
        part, _, rest = key.partition(".")
        if part == "clip_head":
            rest = next(old + rest[len(new):] for old, new in CLIP_HEAD_NAMES.items() if rest.startswith(new))
        state[ours_to_theirs[part] + rest] = tensor.detach().cpu().clone()
    state.update(extra or {})
    enc = model.conditioner.encoder.config
    attrs = {"embed_dim": enc["embed_dim"], "depth": enc["depth"], "num_heads": enc["num_heads"],
             "patch_size": enc["patch_size"], "mlp_ratio": enc["mlp_ratio"],
             "global_pool": model.conditioner.global_pool, "use_time_cond": model.conditioner.time_cond is not None,
             "clip_tune": True, "img_size": model.image_size, **(config_attrs or {})}
    with pickled_as("config", "Config_Generative_Model", attrs) as config:
        atomic_torch_save({"model_state_dict": state, "config": config, "state": torch.get_rng_state()}, path)
    return Path(path)
