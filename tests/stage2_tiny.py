"""Tiny real stage-2 components for the tests: a diffusers UNet/VAE from small configs, a CLIP
vision tower from a small config, and a small EEG encoder. Sizes flow from here, never constants:
VAE factor 2, latent 8x8, images 16x16, EEG 128 channels x 32 samples (8 tokens of width 32)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamdiffusion.models.clip_embedder import TransformersCLIP
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, time_cond_overrides
from dreamdiffusion.models.mae import EEGEncoder
from dreamdiffusion.models.sd15 import SD15Components, read_sd15_configs

IMAGE_SIZE = 16  # pixels; the VAE halves it once -> latents 8x8 = UNet sample_size
CLIP_IMAGE_SIZE = 32
ENCODER = dict(n_channels=128, n_times=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0)


def tiny_sd_configs(time_cond: bool = True) -> tuple[dict, dict, dict]:
    unet = dict(
        UNet2DConditionModel.from_config(dict(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )).config
    )
    vae = dict(
        AutoencoderKL.from_config(dict(
            block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=IMAGE_SIZE,
        )).config
    )
    _, _, scheduler = read_sd15_configs()  # SD1.5's own noise schedule (the package's configs)
    drop = "_use_default_values"  # diffusers would reset those keys (and our overrides) to defaults
    return {k: v for k, v in unet.items() if k != drop}, {k: v for k, v in vae.items() if k != drop}, scheduler


def write_config_dir(path, unet_config: dict, vae_config: dict, scheduler_config: dict):
    """A diffusers-layout config folder like configs/sd15/ for the tiny models."""
    import json

    for sub, name, cfg in (("unet", "config.json", unet_config), ("vae", "config.json", vae_config),
                           ("scheduler", "scheduler_config.json", scheduler_config)):
        (path / sub).mkdir(parents=True, exist_ok=True)
        plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "_use_default_values"}
        (path / sub / name).write_text(json.dumps(plain))
    return path


def tiny_sd(seed: int = 0, time_cond: bool = True) -> SD15Components:
    unet_config, vae_config, scheduler_config = tiny_sd_configs()
    torch.manual_seed(seed)
    overrides = time_cond_overrides() if time_cond else {}
    unet = UNet2DConditionModel.from_config({**unet_config, **overrides}).eval()
    vae = AutoencoderKL.from_config(vae_config).eval()
    return SD15Components(unet, vae, DDPMScheduler.from_config(scheduler_config))


def tiny_clip_model(seed: int = 0) -> CLIPVisionModelWithProjection:
    """A tiny transformers CLIP vision tower (what a CLIP folder holds)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=CLIP_IMAGE_SIZE, patch_size=8, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_clip(seed: int = 0) -> TransformersCLIP:
    """The tiny CLIP as the project loads it: an ImageEmbedder with CLIP's own preprocessing."""
    return TransformersCLIP.from_model(tiny_clip_model(seed))


def tiny_encoder(seed: int = 0) -> EEGEncoder:
    torch.manual_seed(seed)
    return EEGEncoder(**ENCODER)


def tiny_model(seed: int = 0, time_cond: bool = True, clip=None, **settings) -> DreamDiffusion:
    sd = tiny_sd(seed, time_cond)
    clip = clip if clip is not None else tiny_clip(seed)
    torch.manual_seed(seed + 1)
    return DreamDiffusion.build(tiny_encoder(seed), sd, clip_encoder=clip, **settings)


def tiny_batch(batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "eeg": torch.randn(batch_size, ENCODER["n_channels"], ENCODER["n_times"], generator=g),
        "image": torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1,
        "clip_pixel_values": torch.randn(batch_size, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, generator=g),
    }
