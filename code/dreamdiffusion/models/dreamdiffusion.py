"""DreamDiffusion's stage-2 model: Stable Diffusion 1.5 conditioned on EEG instead of text.

    eeg [B, n_channels, n_times]
      -> EEGEncoder (stage 1)                      tokens  [B, N, D]        (N = n_times / patch_size)
      -> channel_mapper: Conv1d(N -> N/2 -> 77, k=1) over the token axis   [B, 77, D]
      -> dim_mapper: Linear(D -> cross_attention_dim)                context [B, 77, 768]
    context replaces the CLIP text embedding in every cross-attention layer of the UNet.
    time_cond (optional): Conv1d(77 -> 38 -> 1, k=1) -> Linear(768 -> 1280) maps the context to a
      vector added to the UNet's timestep embedding (diffusers `class_embed_type="identity"`).
    clip_head: Conv1d(N -> 1, k=1) -> Linear(D -> 768) maps the tokens to one vector that is pulled
      towards the frozen CLIP image embedding of the image the subject saw.

Sizes come from the encoder, the UNet config and the CLIP config, so tiny models work the same way.
What trains is decided in one place, `select_trainable` ("paper" or the authors' code's set; see
docs/method.md, "Stage 2").
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, DDPMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.models import original_formats as original
from dreamdiffusion.models.mae import EEGEncoder, eeg_encoder_from_state_dict
from dreamdiffusion.models.sd15 import (
    SD15Components,
    load_diffusers_folder,
    sd15_from_compvis,
    set_latent_scale,
)

logger = logging.getLogger(__name__)

# The folder layout of earlier versions (`dreamdiffusion.json` + `conditioner.safetensors` beside
# unet/, vae/, scheduler/): still read by `load_conditioner`; DreamDiffusionPipeline.save_pretrained
# writes diffusers' layout (model_index.json, conditioner/ beside the same three folders).
LEGACY_FORMAT = "dreamdiffusion-stage2/1"
LEGACY_CONFIG_NAME = "dreamdiffusion.json"
LEGACY_CONDITIONER_WEIGHTS = "conditioner.safetensors"
# Encoder parameters that never take part in its forward pass (kept for checkpoint compatibility)
# or are a fixed sin-cos table: they stay frozen even though the conditioner trains. The authors'
# code trains pos_embed too (every cond_stage_model parameter gets requires_grad=True).
ENCODER_FIXED = {"paper": ("cls_token", "mask_token", "pos_embed"), "authors_code": ("cls_token", "mask_token")}
TRAINABLE_SETS = tuple(ENCODER_FIXED)
CLIP_LOSSES = ("cosine", "contrastive")


@dataclass
class EEGCondition:
    """What the EEG conditions SD1.5 with."""

    context: torch.Tensor  # [B, context_tokens, cross_attention_dim], in place of the text embedding
    time_embedding: torch.Tensor | None  # [B, time_embed_dim], added to the timestep embedding
    clip_embedding: torch.Tensor  # [B, clip_dim], aligned to CLIP's image embedding


class EEGConditioner(ModelMixin, ConfigMixin):
    """EEG encoder + token/dim mappers + optional time conditioning + CLIP head: the component of
    `DreamDiffusionPipeline` that stands where SD1.5's text encoder stood (a diffusers model, so
    `save_pretrained` / `from_pretrained(..., torch_dtype=...)` work as for the UNet).

    encoder_config: the `EEGEncoder`'s sizes (its `config`), from which a fresh encoder is built; or
    encoder: an existing `EEGEncoder` (e.g. stage 1's), used as it is (its sizes become encoder_config).
    """

    ignore_for_config = ["encoder"]  # a module, not a setting: its sizes are stored as encoder_config

    @register_to_config
    def __init__(
        self,
        encoder_config: dict[str, Any] | None = None,
        context_dim: int = 768,
        time_embed_dim: int | None = None,
        clip_dim: int = 768,
        context_tokens: int = 77,
        global_pool: bool = False,
        pool_before_norm: bool = False,
        encoder: nn.Module | None = None,
    ):
        super().__init__()
        if (encoder is None) == (encoder_config is None):
            raise ConfigError("an EEGConditioner needs either encoder_config (the EEG encoder's sizes) or an encoder")
        if encoder is None:
            encoder = EEGEncoder(**encoder_config)
        else:
            self.register_to_config(encoder_config=dict(encoder.config))
        n_tokens, width = encoder.num_patches, encoder.embed_dim
        self.encoder = encoder
        self.context_tokens = 1 if global_pool else context_tokens
        self.global_pool = global_pool
        self.pool_before_norm = pool_before_norm
        if not global_pool:
            # names .0/.1 as in the authors' nn.Sequential, so their weights map one to one
            self.channel_mapper = nn.Sequential(
                nn.Conv1d(n_tokens, n_tokens // 2, 1), nn.Conv1d(n_tokens // 2, context_tokens, 1)
            )
        self.dim_mapper = nn.Linear(width, context_dim)
        if time_embed_dim is None:
            self.time_cond = None
        elif global_pool:
            self.time_cond = nn.Linear(context_dim, time_embed_dim)
        else:
            self.time_cond = nn.Sequential(
                nn.Conv1d(context_tokens, context_tokens // 2, 1),
                nn.Conv1d(context_tokens // 2, 1, 1),
                nn.Linear(context_dim, time_embed_dim),
            )
        self.clip_head = nn.Sequential(nn.Conv1d(n_tokens, 1, 1), nn.Linear(width, clip_dim))

    @property
    def sizes(self) -> dict[str, Any]:
        return {
            "context_dim": self.dim_mapper.out_features,
            "time_embed_dim": None if self.time_cond is None else
            (self.time_cond if self.global_pool else self.time_cond[2]).out_features,
            "clip_dim": self.clip_head[1].out_features,
            "context_tokens": self.context_tokens,
            "global_pool": self.global_pool,
            "pool_before_norm": self.pool_before_norm,
        }

    def forward(self, eeg: torch.Tensor) -> EEGCondition:
        """eeg [B, n_channels, n_times] -> EEGCondition."""
        features = self.encoder(eeg, norm=False)  # [B, N, D], before the final LayerNorm
        tokens = self.encoder.norm(features)
        if not self.global_pool:
            pooled = self.channel_mapper(tokens)  # [B, 77, D]
        elif self.pool_before_norm:  # the authors' encoder averages, then normalises
            pooled = self.encoder.norm(features.mean(dim=1, keepdim=True))
        else:
            pooled = tokens.mean(dim=1, keepdim=True)
        context = self.dim_mapper(pooled)  # [B, 77, context_dim]
        time_embedding = None if self.time_cond is None else self.time_cond(context).squeeze(1)
        clip_embedding = self.clip_head(tokens).squeeze(1)  # [B, clip_dim]
        return EEGCondition(context, time_embedding, clip_embedding)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> EEGConditioner:
        """diffusers' loading, strictly: a missing, unexpected or mis-shaped weight is a CheckpointError."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"could not load the EEG conditioner of {pretrained_model_name_or_path}: {err}") from err
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise CheckpointError(f"{pretrained_model_name_or_path}: the EEG conditioner's weights do not match its "
                                  f"config: {bad}")
        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
        if dtype is not None:  # also the tensors built in a fixed dtype (the sin-cos positions), which diffusers
            nn.Module.to(model, dtype)  # keeps as built; not ModelMixin.to, which warns on every dtype cast
        return (model, info) if want_info else model


def denoise(unet: UNet2DConditionModel, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: Any) -> torch.Tensor:
    """The one place the UNet is called: noisy_latents [B, 4, h, w], timesteps [B] -> eps [B, 4, h, w].
    `condition`: an EEGCondition, or any object with `context` [B, 77, D] and `time_embedding`
    ([B, time_embed_dim] or None; e.g. the class-name oracle's text states).
    The UNet gets its inputs in its own dtype; eps comes back in fp32, so the sampler's arithmetic on
    the latents stays fp32 whatever dtype the UNet runs in."""
    time_embedding = condition.time_embedding
    return unet(
        noisy_latents.to(unet.dtype),
        timesteps,
        encoder_hidden_states=condition.context.to(unet.dtype),
        class_labels=None if time_embedding is None else time_embedding.to(unet.dtype),
    ).sample.float()


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (not clamped)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample


def clip_alignment_loss(
    eeg_embeds: torch.Tensor, image_embeds: torch.Tensor, kind: str = "cosine", temperature: float = 0.07
) -> torch.Tensor:
    """cosine: 1 - mean cosine similarity of each pair (the paper's loss);
    contrastive: symmetric InfoNCE over the batch (other images of the batch are the negatives).
    Computed in fp32 with autocast off: under bf16 the logits (cosines / 0.07) keep 8 bits and the
    softmax over the batch is blurred."""
    with torch.autocast(eeg_embeds.device.type, enabled=False):
        return _alignment(eeg_embeds.float(), image_embeds.float(), kind, temperature)


def _alignment(eeg_embeds: torch.Tensor, image_embeds: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "cosine":
        return 1 - F.cosine_similarity(eeg_embeds, image_embeds, dim=-1).mean()
    if kind == "contrastive":
        logits = F.normalize(eeg_embeds, dim=-1) @ F.normalize(image_embeds, dim=-1).T / temperature
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    raise ConfigError(f"clip_loss must be one of {CLIP_LOSSES}, got {kind!r}")


class DreamDiffusion(nn.Module):
    """SD1.5 (UNet + VAE + noise schedule) conditioned on EEG through an `EEGConditioner`.

    `clip_encoder` (an `ImageEmbedder`, the CLIP image tower) is only needed for training with clip_weight > 0; it is
    never saved with the model. `clip_target="frozen"` runs it under no_grad (the paper);
    "drifting" runs it with gradients, as the authors' code does, so whatever of it
    `select_trainable` lets train (their layer_norm2) moves with the alignment loss.
    """

    def __init__(
        self,
        conditioner: EEGConditioner,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        noise_scheduler: DDPMScheduler,
        clip_encoder: nn.Module | None = None,
        clip_weight: float = 1.0,
        clip_loss: str = "cosine",
        clip_temperature: float = 0.07,
        clip_target: str = "frozen",
    ):
        super().__init__()
        if clip_target not in ("frozen", "drifting"):
            raise ConfigError(f"clip_target must be 'frozen' or 'drifting', got {clip_target!r}")
        if clip_loss not in CLIP_LOSSES:
            raise ConfigError(f"clip_loss must be one of {CLIP_LOSSES}, got {clip_loss!r}")
        sizes = conditioner.sizes
        if sizes["context_dim"] != unet.config.cross_attention_dim:
            raise ConfigError(
                f"the EEG context has width {sizes['context_dim']} but the UNet's cross-attention expects "
                f"{unet.config.cross_attention_dim}"
            )
        if (sizes["time_embed_dim"] is not None) != (unet.config.class_embed_type == "identity"):
            raise ConfigError(
                "time conditioning needs a UNet built with class_embed_type='identity' (and only then): "
                f"time_cond={'on' if sizes['time_embed_dim'] else 'off'}, "
                f"class_embed_type={unet.config.class_embed_type!r}"
            )
        if clip_encoder is not None and clip_encoder.projection_dim != sizes["clip_dim"]:
            raise ConfigError(
                f"the CLIP head outputs {sizes['clip_dim']} values but the CLIP image embedding has "
                f"{clip_encoder.projection_dim}"
            )
        self.conditioner = conditioner
        self.unet = unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.clip_encoder = clip_encoder
        self.clip_weight = clip_weight
        self.clip_loss = clip_loss
        self.clip_temperature = clip_temperature
        self.clip_target = clip_target
        # Where vae.config.scaling_factor came from (the protocol of stage 3 prints it).
        self.latent_scale_source = "the VAE config"
        for frozen in (self.vae, self.clip_encoder):
            if frozen is not None:
                frozen.requires_grad_(False)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        encoder: nn.Module,
        sd: SD15Components,
        clip_encoder: nn.Module | None = None,
        clip_dim: int | None = None,
        context_tokens: int = 77,
        global_pool: bool = False,
        pool_before_norm: bool = False,
        **loss_settings,
    ) -> DreamDiffusion:
        """Wire an encoder to SD components. `sd.unet` must have class_embed_type="identity" for the
        time conditioning (load it with `load_sd15(..., unet_overrides=time_cond_overrides())`)."""
        use_time_cond = sd.unet.config.class_embed_type == "identity"
        if clip_dim is None:
            if clip_encoder is None:
                raise ConfigError("give clip_dim or a clip_encoder to size the CLIP head")
            clip_dim = clip_encoder.projection_dim
        conditioner = EEGConditioner(
            encoder=encoder,
            context_dim=sd.unet.config.cross_attention_dim,
            time_embed_dim=time_embed_dim(sd.unet.config) if use_time_cond else None,
            clip_dim=clip_dim,
            context_tokens=context_tokens,
            global_pool=global_pool,
            pool_before_norm=pool_before_norm,
        )
        return cls(conditioner, sd.unet, sd.vae, sd.noise_scheduler, clip_encoder, **loss_settings)

    # ---- properties --------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def latent_size(self) -> int:
        """Latent side of the UNet's native resolution (64 for SD1.5 at 512 px)."""
        return self.unet.config.sample_size

    @property
    def image_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def train(self, mode: bool = True) -> DreamDiffusion:
        super().train(mode)
        # The frozen parts never train: no dropout / norm-statistics changes there.
        self.vae.eval()
        if self.clip_encoder is not None:
            self.clip_encoder.eval()
        return self

    # ---- the method --------------------------------------------------------------------------

    def encode_eeg(self, eeg: torch.Tensor) -> EEGCondition:
        """eeg [B, n_channels, n_times] -> EEGCondition (context [B, 77, D_ctx], ...), in the
        conditioner's dtype (stage 3 keeps it fp32 while the UNet runs in half precision)."""
        return self.conditioner(eeg.to(self.conditioner.dtype))

    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: EEGCondition) -> torch.Tensor:
        """noisy_latents [B, 4, h, w], timesteps [B] -> eps [B, 4, h, w] (`denoise` below)."""
        return denoise(self.unet, noisy_latents, timesteps, condition)

    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, eeg: torch.Tensor) -> torch.Tensor:
        return self.denoise(noisy_latents, timesteps, self.encode_eeg(eeg))

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] (a posterior sample), fp32
        whatever the VAE's dtype or autocast: the posterior's moments and its noise are taken in fp32."""
        return self.sample_latents(self.image_moments(images), generator)

    def image_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> the VAE posterior's moments (mean | log-variance) [B, 8, H/8, W/8], fp32."""
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.parameters.float()

    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample of the moments [B, 8, h, w] -> scaled latents [B, 4, h, w], fp32."""
        return DiagonalGaussianDistribution(moments.float()).sample(generator) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] in [-1, 1] (not clamped)."""
        return decode_latents(self.vae, latents)

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: eeg [B, C, T], image [B, 3, S, S] in [-1, 1], clip_pixel_values [B, 3, c, c]; or, from the
        stage-2 caches of work done once (data/stage2_cache.py), latent_moments [B, 8, S/8, S/8] in place
        of image and clip_embeds [B, clip_dim] in place of clip_pixel_values.

        Returns {"loss": diffusion + clip_weight * clip, "diffusion": eps MSE, "clip": alignment}.
        """
        eeg = batch["eeg"]
        with torch.no_grad():
            moments = batch["latent_moments"] if "latent_moments" in batch else self.image_moments(batch["image"])
            latents = self.sample_latents(moments)
        noise = torch.randn_like(latents)
        n_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, n_steps, (len(latents),), device=latents.device)
        # The schedule's arithmetic in fp32 (latents and noise are): in bf16, sqrt(1 - alpha_bar_t) of
        # the smallest timesteps rounds to 0 and the targets there are wrong.
        noisy_latents = self.noise_scheduler.add_noise(latents.float(), noise.float(), timesteps)
        condition = self.encode_eeg(eeg)
        eps = self.denoise(noisy_latents, timesteps, condition)
        losses = {"diffusion": F.mse_loss(eps.float(), noise.float())}
        if self.clip_weight > 0:
            if self.clip_encoder is None:
                raise ConfigError("clip_weight > 0 needs a CLIP image encoder (clip_path)")
            # The paper's target is frozen; the authors' drifts (its layer_norm2 trains through this loss).
            if "clip_embeds" in batch and self.clip_target == "frozen":  # a frozen target, computed once
                image_embeds = batch["clip_embeds"]
            else:
                with torch.set_grad_enabled(self.clip_target == "drifting" and torch.is_grad_enabled()):
                    image_embeds = self.clip_encoder(batch["clip_pixel_values"])
            losses["clip"] = clip_alignment_loss(
                condition.clip_embedding.float(), image_embeds.float(), self.clip_loss, self.clip_temperature
            )
        else:
            losses["clip"] = torch.zeros((), device=latents.device)
        losses["loss"] = losses["diffusion"] + self.clip_weight * losses["clip"]
        return losses

    # ---- saving and loading ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, clip_encoder: nn.Module | None = None,
                        torch_dtype: torch.dtype | None = None, **loss_settings) -> DreamDiffusion:
        """The training-side model from a saved folder (`DreamDiffusionPipeline.save_pretrained`, or an
        earlier version's layout), strictly, in eval mode. The CLIP image encoder is a training-only
        target and is never saved: pass `clip_encoder` to train on."""
        root = Path(model_dir)
        conditioner, legacy_settings = load_conditioner(root, torch_dtype)
        sd = load_diffusers_folder(root, torch_dtype=torch_dtype)
        model = cls(conditioner, sd.unet, sd.vae, sd.noise_scheduler, clip_encoder, **{**legacy_settings, **loss_settings})
        return model.eval()

    @classmethod
    def from_original_checkpoint(
        cls, path: str | os.PathLike, sd_config: str | os.PathLike | None = None,
        clip_encoder: nn.Module | None = None,
    ) -> DreamDiffusion:
        """The authors' released generation checkpoint (`checkpoint.pth` of their eeg_ldm.py).

        Read by `original.read_generation_checkpoint` without running pickled code. The UNet/VAE
        architecture comes from `sd_config` (a diffusers-layout config folder; default SD1.5's), the
        encoder's sizes from the pickled config or the tensor shapes, the latent scale from the
        state dict's `scale_factor` when it has one (`model.latent_scale_source` says which).
        """

        checkpoint = original.read_generation_checkpoint(path)
        source = checkpoint.source
        encoder = eeg_encoder_from_state_dict(checkpoint.conditioner["encoder"], checkpoint.encoder_sizes or None,
                                              where=source)
        overrides = time_cond_overrides() if checkpoint.use_time_cond else {}
        sd = sd15_from_compvis(checkpoint.compvis, source, sd_config, unet_overrides=overrides)
        if checkpoint.scale_factor is not None:  # LatentDiffusion's learnt latent scale (scale_by_std)
            set_latent_scale(sd, checkpoint.scale_factor, source)
            sd.latent_scale_source = "the checkpoint's scale_factor key"
        if checkpoint.unused:
            logger.info("%s: skipped %d keys of parts not used here (%s)", source, len(checkpoint.unused),
                        ", ".join(sorted({k.split(".")[0] for k in checkpoint.unused})))
        conditioner = _conditioner_for(checkpoint, encoder, sd.unet.config.cross_attention_dim)
        model = cls(conditioner, sd.unet, sd.vae, sd.noise_scheduler, clip_encoder)
        model.latent_scale_source = sd.latent_scale_source
        return model.eval()


def _conditioner_for(checkpoint: original.GenerationCheckpoint, encoder: nn.Module, context_dim: int) -> EEGConditioner:
    """An EEGConditioner sized like the checkpoint's parts, holding their weights (strictly)."""
    parts, global_pool = checkpoint.conditioner, checkpoint.global_pool
    time_dim = None
    if checkpoint.use_time_cond:
        time_dim = parts["time_cond"]["weight" if global_pool else "2.weight"].shape[0]
    conditioner = EEGConditioner(
        encoder=encoder,
        context_dim=context_dim,
        time_embed_dim=time_dim,
        clip_dim=parts["clip_head"]["1.weight"].shape[0],
        context_tokens=1 if global_pool else parts["channel_mapper"]["1.weight"].shape[0],
        global_pool=global_pool,
        # their encoder averages before its final norm (docs/method.md, "Stage 2")
        pool_before_norm=global_pool,
    )
    state = {f"{part}.{k}": v for part, tensors in parts.items() if part != "encoder" for k, v in tensors.items()}
    state.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    _load_strict(conditioner, state, checkpoint.source)
    return conditioner


def load_conditioner(root: Path, torch_dtype: torch.dtype | None = None) -> tuple[EEGConditioner, dict[str, Any]]:
    """The EEG conditioner of a saved model folder, strictly: `conditioner/` (diffusers' layout), or an
    earlier version's `dreamdiffusion.json` + `conditioner.safetensors`. Also returns the loss settings
    that layout recorded (clip_weight, clip_loss, clip_temperature; none in diffusers' layout)."""
    if (root / "conditioner" / "config.json").is_file():
        conditioner = EEGConditioner.from_pretrained(root / "conditioner", torch_dtype=torch_dtype,
                                                     low_cpu_mem_usage=False)  # as sd15.load_diffusers_folder
        return conditioner, {}
    legacy = root / LEGACY_CONFIG_NAME
    if not legacy.is_file():
        raise CheckpointError(
            f"{root} is not a DreamDiffusion model folder: neither conditioner/config.json (written by "
            f"DreamDiffusionPipeline.save_pretrained, e.g. <stage-2 output_dir>/model) nor {LEGACY_CONFIG_NAME} "
            "(an earlier version's export) is there")
    settings = json.loads(legacy.read_text())
    if settings.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{legacy}: format {settings.get('format')!r}, expected {LEGACY_FORMAT!r}")
    conditioner = EEGConditioner(
        encoder_config=settings["encoder"], context_dim=settings["context_dim"],
        time_embed_dim=settings["time_embed_dim"], clip_dim=settings["clip_dim"],
        context_tokens=settings["context_tokens"], global_pool=settings["global_pool"],
        pool_before_norm=settings.get("pool_before_norm", False),  # folders written before the switch
    )
    weights = root / LEGACY_CONDITIONER_WEIGHTS
    _load_strict(conditioner, load_file(str(weights)), str(weights))
    if torch_dtype is not None:
        nn.Module.to(conditioner, torch_dtype)  # not ModelMixin.to, which warns on every dtype cast
    return conditioner, {k: settings[k] for k in ("clip_weight", "clip_loss", "clip_temperature")}


def time_embed_dim(unet_config) -> int:
    """Width of the UNet's timestep embedding (4 x the first block's channels: 1280 for SD1.5)."""
    return unet_config.get("time_embedding_dim") or 4 * unet_config["block_out_channels"][0]


def time_cond_overrides() -> dict[str, Any]:
    """UNet config changes for the time conditioning: an identity class embedding (no weights)
    through which our vector is added to the timestep embedding."""
    return {"class_embed_type": "identity"}


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected, present = set(module.state_dict()), set(state)
    if expected != present:
        missing, unexpected = sorted(expected - present), sorted(present - expected)
        raise CheckpointError(
            f"{source}: EEG conditioner weights do not match: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: EEG conditioner weights have the wrong shapes: {err}") from err


# ---------------------------------------------------------------------------------------------
# What trains


def select_trainable(model: DreamDiffusion, trainable: str = "paper") -> list[dict[str, Any]]:
    """Decide what trains, by module type, and nothing more (docs/method.md, "What trains").

    "paper": the whole EEG conditioner (except the encoder's unused tokens and fixed sin-cos
    positions, and the CLIP head when clip_weight is 0) and, in the UNet, each transformer block's
    cross-attention `attn2` and the LayerNorm in front of it (`norm2` of `BasicTransformerBlock`;
    ResNet blocks have a `norm2` too). 198,330,697 parameters at SD1.5 size.
    "authors_code": that, plus what the authors' code changes besides - the encoder's `pos_embed`
    (every cond_stage_model parameter gets requires_grad) and CLIP's `layer_norm2` (caught by
    their `'norm2' in name` filter; trained through the CLIP loss, so the model is switched to a
    drifting CLIP target). 198,511,945 parameters. Their optimiser also lists parameters that never
    change (cls/mask tokens, the VAE's ResNet norm2: no gradient reaches them); those stay frozen.
    Everything else gets requires_grad=False. Returns one row per group: {"group", "trainable", "frozen"}.
    """
    if trainable not in TRAINABLE_SETS:
        raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE_SETS)}, got {trainable!r}")
    model.requires_grad_(False)
    fixed = ENCODER_FIXED[trainable]
    for name, param in model.conditioner.named_parameters():
        param.requires_grad = not (name.startswith("encoder.") and name.split(".")[1] in fixed)
    if model.clip_weight == 0:
        # without the CLIP loss nothing reaches the CLIP head (and DDP rejects parameters without gradients)
        model.conditioner.clip_head.requires_grad_(False)
    cross_attention = [m for m in model.unet.modules() if isinstance(m, BasicTransformerBlock) and m.attn2 is not None]
    for block in cross_attention:
        block.attn2.requires_grad_(True)
        block.norm2.requires_grad_(True)
    model.clip_target = "frozen"
    if trainable == "authors_code" and model.clip_encoder is not None and model.clip_weight > 0:
        for layer in model.clip_encoder.modules():
            if isinstance(layer, CLIPEncoderLayer):
                layer.layer_norm2.requires_grad_(True)
        model.clip_target = "drifting"
    table = _parameter_table(model, {id(p) for m in cross_attention for p in (*m.attn2.parameters(), *m.norm2.parameters())})
    logger.info("trainable parameters (%s):\n%s", trainable, format_table(table))
    return table


def _parameter_table(model: DreamDiffusion, cross_attention: set[int]) -> list[dict[str, Any]]:
    groups = {
        "conditioner.encoder": list(model.conditioner.encoder.parameters()),
        "conditioner.mappers+heads": [p for n, p in model.conditioner.named_parameters() if not n.startswith("encoder.")],
        "unet.cross_attention (attn2+norm2)": [p for p in model.unet.parameters() if id(p) in cross_attention],
        "unet.other": [p for p in model.unet.parameters() if id(p) not in cross_attention],
        "vae": list(model.vae.parameters()),
        "clip": list(model.clip_encoder.parameters()) if model.clip_encoder is not None else [],
    }
    return [
        {
            "group": group,
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if not p.requires_grad),
        }
        for group, params in groups.items()
    ]


def format_table(table: list[dict[str, Any]]) -> str:
    lines = [f"{'group':<36}{'trainable':>14}{'frozen':>14}"]
    lines += [f"{row['group']:<36}{row['trainable']:>14,}{row['frozen']:>14,}" for row in table]
    total_t, total_f = sum(r["trainable"] for r in table), sum(r["frozen"] for r in table)
    lines.append(f"{'total':<36}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)


__all__ = [
    "DreamDiffusion", "EEGConditioner", "EEGCondition", "select_trainable", "format_table",
    "clip_alignment_loss", "time_embed_dim", "time_cond_overrides", "denoise", "decode_latents", "load_conditioner",
]
