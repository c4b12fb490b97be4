"""The demo's synthetic world: data in the real formats and tiny stand-ins for the pretrained models.

`make demo` must show the whole method learn on a 2-core CPU in minutes, with nothing downloaded.
The real method needs ImageNet-EEG, SD1.5, CLIP ViT-L/14 and a ViT-H/14 classifier; here each is
replaced by a small thing of the same kind, written in the same file format, so the stage scripts
load it through the same code paths:

    datasets/demo/                 `write_synthetic_imagenet_eeg` (synthetic.py): eeg_5_95_std.pth,
                                   block_splits_by_image_{single,all}.pth, images/<wnid>/*.JPEG,
                                   class_names.json; pretrain_eeg/**.npy (unpaired corpus)
    pretrains/demo/clip/           a transformers CLIPModel (text + vision towers) + CLIPTokenizer,
                                   trained contrastively on stimuli and "a photo of a <class name>"
    pretrains/demo/sd/             a diffusers Stable Diffusion folder (unet/, vae/, scheduler/,
                                   text_encoder/, tokenizer/, model_index.json): a small VAE and a
                                   UNet conditioned on the tiny CLIP's text token states, trained to
                                   draw each class from its name
    pretrains/demo/classifier/     a timm classifier over the K classes (classifier.json +
                                   model.safetensors, `classifier.save_local_classifier`)
    pretrains/demo/world_report.json   how good the stand-ins are (see `check_world`)

The stand-ins are trained on fresh draws of the stimulus classes ("the world"), never on the
dataset's own images: like SD, CLIP and the ImageNet classifier, they have seen the kind of image,
not the test images. Each part is rebuilt only when its folder is missing or incomplete.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from tokenizers import pre_tokenizers
from torchvision.utils import make_grid
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, get_cosine_schedule_with_warmup

from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.files import atomic_torch_save, atomic_write_json
from dreamdiffusion.core.images import to_uint8
from dreamdiffusion.data.synthetic import (
    draw_stimulus,
    sample_stimulus_params,
    stimulus_classes,
    write_synthetic_imagenet_eeg,
    write_synthetic_pretrain_corpus,
)
from dreamdiffusion.dataset import CLIP_MEAN, CLIP_STD
from dreamdiffusion.models.classifier import load_classifier, save_local_classifier
from dreamdiffusion.models.clip_embedder import clip_tokenizer, load_clip_image_encoder

PROMPT = "a photo of a {}"  # the caption the tiny CLIP and SD learn; Stage3Config.oracle_prompt
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_NAME = "test_resnet"  # timm's 0.4M-parameter test ResNet: seconds to train at 32 px


@dataclass
class DemoWorldConfig:
    """Sizes and training budgets of the demo world (defaults: `make demo`; `quick()`: the test)."""

    # --- the paired dataset (synthetic ImageNet-EEG) ---
    n_classes: int = 20  # K stimulus classes (shape x colour x texture)
    images_per_class: int = 20  # ImageNet-EEG has 50; 20 keeps the EEG file at ~0.6 GB
    n_subjects: int = 6  # as ImageNet-EEG
    n_channels: int = 128  # as ImageNet-EEG
    image_size: int = 32  # px, stored JPEGs and the stand-ins' resolution (SD1.5: 512)
    # Evoked peak / background std (synthetic.py's SNR knob). At synthetic.py's 2.0 a logistic
    # regression on subject 4's raw EEG (307 training trials) reaches ~23% test accuracy (chance 5%)
    # and no EEG model learns anything in the demo's few hundred stage-2 steps; at 4.0 it reaches
    # ~77%, and an EEG encoder + CLIP head trained alone ~60% after 400 steps.
    signal_strength: float = 4.0
    seed: int = 0
    # --- the unpaired corpus for stage 1 ---
    n_pretrain_files: int = 400
    pretrain_length_range: tuple[int, int] = (600, 2000)  # samples at 1 kHz per recording
    # The share of the corpus's recordings from a visual paradigm (as MOABB's ERP/SSVEP datasets):
    # responses to random shape/colour/texture combinations, the components the paired stimuli evoke,
    # with no labels (synthetic.write_synthetic_pretrain_corpus). 0: only other event types, which share
    # nothing but the noise model with the paired EEG. Each share has its own corpus folder
    # (`DemoWorld.pretrain_dir`), so the stand-ins are shared. docs/trust.md measures both.
    corpus_visual_share: float = 0.0
    # --- the stand-ins: trained on fresh draws, `world_images_per_class` per class ---
    world_images_per_class: int = 100
    text_width: int = 64  # tiny CLIP text width = the UNet's cross-attention dim
    vision_width: int = 64
    projection_dim: int = 64  # CLIP embedding size (ViT-L/14: 768)
    clip_layers: int = 2
    clip_patch_size: int = 4
    max_text_tokens: int = 77  # SD1.5's text length; Stage2Config.context_tokens must match
    clip_steps: int = 150
    clip_lr: float = 2e-3
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 32 px -> 8x8 latents
    latent_channels: int = 8  # SD has 4 at 64x64; 8x8 latents need more channels to keep the shapes
    vae_steps: int = 600
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6  # SD's VAE uses a tiny KL weight too (its latents are nearly deterministic)
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    # Attention heads per transformer block (SD1.5: 8, at 320-1280 channels). 8 heads of 4-8
    # channels cost 30% more time than 2 of 16-32 here, for the same samples.
    unet_attention_heads: int = 2
    # The tiny SD's samples from class names, classified by the tiny classifier (8 per class):
    # 49% after 1500 steps, 65% after 2200 (the VAE's reconstructions of the dataset: 77%).
    unet_steps: int = 2200
    unet_lr: float = 2e-3
    unet_min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 = plain MSE, as SD
    unet_ema_decay: float = 0.99  # samples come from an EMA of the weights, as SD's release
    classifier_steps: int = 150
    classifier_lr: float = 2e-3
    batch_size: int = 32
    # --- the sanity check of the stand-ins ---
    check_samples_per_class: int = 4
    check_inference_steps: int = 25

    @classmethod
    def quick(cls, **overrides: Any) -> DemoWorldConfig:
        """A much smaller world for the test of `demo.py --quick` (minutes -> tens of seconds)."""
        small = dict(n_classes=10, images_per_class=10, n_subjects=4, n_pretrain_files=40,
                     world_images_per_class=20, clip_steps=30, vae_steps=30, unet_steps=40,
                     classifier_steps=30, batch_size=16, check_samples_per_class=1,
                     check_inference_steps=5)
        return replace(cls(), **{**small, **overrides})


@dataclass
class DemoWorld:
    """Where the world's files are (everything a stage config needs to point at)."""

    datasets_dir: Path
    pretrains_dir: Path
    corpus_visual_share: float = 0.0  # which corpus stage 1 reads (DemoWorldConfig.corpus_visual_share)

    eeg_path = property(lambda self: self.datasets_dir / "eeg_5_95_std.pth")
    splits_path = property(lambda self: self.datasets_dir / "block_splits_by_image_single.pth")
    splits_all_path = property(lambda self: self.datasets_dir / "block_splits_by_image_all.pth")
    image_dir = property(lambda self: self.datasets_dir / "images")
    class_names_path = property(lambda self: self.datasets_dir / "class_names.json")
    pretrain_dir = property(lambda self: self.datasets_dir / corpus_folder(self.corpus_visual_share))
    clip_dir = property(lambda self: self.pretrains_dir / "clip")
    sd_dir = property(lambda self: self.pretrains_dir / "sd")
    classifier_dir = property(lambda self: self.pretrains_dir / "classifier")
    report_path = property(lambda self: self.pretrains_dir / "world_report.json")


def corpus_folder(visual_share: float) -> str:
    """The unpaired corpus's folder name: `pretrain_eeg` (no visual recordings), `pretrain_eeg_visual0.3`."""
    return "pretrain_eeg" if visual_share == 0 else f"pretrain_eeg_visual{visual_share:g}"


# The settings that only the unpaired corpus depends on: it has a folder per share, so they are not
# compared with the stand-ins' world_config.json.
CORPUS_ONLY = ("corpus_visual_share",)


# ---------------------------------------------------------------------------------------------
# Images of the world


def class_names(n_classes: int) -> list[str]:
    """Readable names of the K classes, in class-index order ("red circle", "green striped square")."""
    return [c.name for c in stimulus_classes(n_classes)]


def _jpeg_roundtrip(img: Image.Image, quality: int = 90) -> Image.Image:
    """The image as the dataset stores it (synthetic.py writes JPEG quality 90)."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def render_world_images(cfg: DemoWorldConfig, per_class: int, seed_offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh draws of every class (disjoint from the dataset's images: other parameter seeds).

    Returns images [K * per_class, 3, S, S] in [-1, 1] and labels [K * per_class] (int64).
    """
    classes = stimulus_classes(cfg.n_classes)
    rng = np.random.default_rng([cfg.seed, seed_offset, 7919])
    images, labels = [], []
    for k, stimulus in enumerate(classes):
        for _ in range(per_class):
            img = _jpeg_roundtrip(draw_stimulus(stimulus, cfg.image_size, sample_stimulus_params(rng)))
            images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
            labels.append(k)
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, torch.tensor(labels)


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[-1, 1] images -> (x01 - mean) / std, per channel."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean_t) / std_t


def _augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random flips and small translations (the classes are rotation/position invariant)."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


def _blur(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur of random strength per batch (robustness to soft generated images, which a
    large ImageNet classifier has and a tiny one trained on crisp drawings would lack)."""
    sigma = float(torch.empty(1).uniform_(0.3, 1.5, generator=generator))
    radius = 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _bar(iterable, desc: str, total: int, progress: bool):
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not progress, unit="step")


def _cosine_lr(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 20):

    return get_cosine_schedule_with_warmup(optimizer, warmup, steps)


# ---------------------------------------------------------------------------------------------
# Tiny CLIP with an offline tokenizer


def build_tokenizer_files(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE (CLIP's: the last symbol of a word carries "</w>") learnt
    on the distinct `words` until each is one token; every byte, alone and word-final, is in the
    vocabulary too, so any text tokenizes.

    Each step merges the most frequent adjacent pair, ties broken by the pair itself, so the same
    words always give the same files. (`tokenizers`' BpeTrainer breaks ties in hash order, which
    changes from process to process - and with the token ids, the tiny CLIP and SD trained on them.)
    """

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([BOS, EOS, *alphabet, *(ch + "</w>" for ch in alphabet)])}
    symbols = [[*word[:-1], word[-1] + "</w>"] for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for word in symbols for pair in zip(word, word[1:]))
        if not counts:
            return vocab, merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        symbols = [_merge_pair(word, pair) for word in symbols]


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """`word` with every occurrence of `pair` (left to right) joined into one symbol."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def make_tokenizer(names: Sequence[str], max_length: int):
    """A CLIPTokenizer that knows the prompt's words and the class names' words, built offline."""

    words = PROMPT.format("").split() + [w for name in names for w in name.split()]
    vocab, merges = build_tokenizer_files(words)
    return clip_tokenizer(vocab, merges, max_length)


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """[n, max_length] token ids padded as SD1.5 pads its prompts."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def build_clip(cfg: DemoWorldConfig, vocab_size: int):

    heads = 4
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
                         num_hidden_layers=cfg.clip_layers, num_attention_heads=heads,
                         max_position_embeddings=cfg.max_text_tokens, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=cfg.projection_dim),
        vision_config=dict(image_size=cfg.image_size, patch_size=cfg.clip_patch_size,
                           hidden_size=cfg.vision_width, intermediate_size=2 * cfg.vision_width,
                           num_hidden_layers=cfg.clip_layers, num_attention_heads=heads,
                           projection_dim=cfg.projection_dim),
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


def clip_image_embeds(model, images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B, 3, S, S] -> projected CLIP image embeddings [B, projection_dim]."""
    pooled = model.vision_model(pixel_values=_normalise(images, CLIP_MEAN, CLIP_STD)).pooler_output
    return model.visual_projection(pooled)


def clip_text_embeds(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=input_ids).pooler_output)


def train_clip(cfg: DemoWorldConfig, images: torch.Tensor, labels: torch.Tensor, out_dir: Path,
               progress: bool = True) -> dict[str, float]:
    """Contrastive training of both towers on (image, "a photo of a <class>") pairs; saves to out_dir.

    Each batch's images are scored against the K class captions (image -> text cross-entropy) and
    each caption against the batch's images, every image of its class a positive (text -> image).
    """
    torch.manual_seed(cfg.seed)
    names = class_names(cfg.n_classes)
    tokenizer = make_tokenizer(names, cfg.max_text_tokens)
    # Padded to the longest caption only: the text tower is causal, so the states up to the end
    # token (and the pooled one, at the end token) are the same as with SD's padding to 77.
    input_ids = tokenizer([PROMPT.format(n) for n in names], padding="longest", return_tensors="pt").input_ids
    model = build_clip(cfg, len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    schedule = _cosine_lr(optimizer, cfg.clip_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    loss = torch.tensor(0.0)
    for idx in _bar(_batches(len(images), cfg.batch_size, cfg.clip_steps, generator), "tiny CLIP",
                    cfg.clip_steps, progress):
        image_emb = F.normalize(clip_image_embeds(model, _augment(images[idx], generator)), dim=-1)
        text_emb = F.normalize(clip_text_embeds(model, input_ids), dim=-1)  # [K, P]
        logits = model.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # [B, K]
        y = labels[idx]
        positives = (y[None, :] == torch.arange(cfg.n_classes)[:, None]).float()  # [K, B]
        present = positives.sum(1) > 0
        text_to_image = -(positives[present] / positives[present].sum(1, keepdim=True)
                          * logits.T[present].log_softmax(dim=1)).sum(1).mean()
        loss = (F.cross_entropy(logits, y) + text_to_image) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"final_loss": float(loss.detach())}


# ---------------------------------------------------------------------------------------------
# Tiny Stable Diffusion


def scheduler_config() -> dict[str, Any]:
    """SD1.5's noise schedule (configs/sd15/scheduler): scaled-linear betas 0.00085..0.012, 1000 steps."""
    return {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None}


def build_vae(cfg: DemoWorldConfig):

    levels = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.vae_block_out_channels), layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=8, sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )


def build_unet(cfg: DemoWorldConfig, latent_size: int):

    levels = len(cfg.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(cfg.unet_block_out_channels), layers_per_block=1,
        # diffusers' `attention_head_dim` is the number of heads (its naming issue #2011)
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.unet_attention_heads, norm_num_groups=8,
    )


def train_vae(cfg: DemoWorldConfig, images: torch.Tensor, progress: bool = True):
    """Reconstruction (MSE) + a tiny KL term; then `scaling_factor` = 1 / std of the latents, the
    rule SD's 0.18215 came from, so the UNet sees unit-variance latents."""
    torch.manual_seed(cfg.seed + 2)
    vae = build_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = _cosine_lr(optimizer, cfg.vae_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    vae.train()
    for idx in _bar(_batches(len(images), cfg.batch_size, cfg.vae_steps, generator), "tiny SD: VAE",
                    cfg.vae_steps, progress):
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, x) + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        recon = torch.cat([vae.decode(means[i:i + 256]).sample for i in range(0, len(means), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae, {"reconstruction_mse": float(F.mse_loss(recon, images)),
                 "scaling_factor": vae.config.scaling_factor}


@torch.no_grad()
def text_states(clip_dir: Path, prompts: Sequence[str]) -> torch.Tensor:
    """The frozen tiny CLIP's text token states [n, max_length, width], as SD1.5 is conditioned."""

    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    text_model = CLIPTextModel.from_pretrained(clip_dir, local_files_only=True).eval()
    return text_model(tokenize_prompts(tokenizer, prompts)).last_hidden_state


def train_unet(cfg: DemoWorldConfig, vae, images: torch.Tensor, labels: torch.Tensor, contexts: torch.Tensor,
               progress: bool = True):
    """Epsilon-prediction training on the VAE latents, conditioned on each class's caption states.

    contexts: [K, max_length, text_width]. Returns the EMA UNet (eval) and stats.
    """

    torch.manual_seed(cfg.seed + 4)
    with torch.no_grad():
        posteriors = [vae.encode(images[i:i + 256]).latent_dist for i in range(0, len(images), 256)]
    mean = torch.cat([p.mean for p in posteriors])
    std = torch.cat([p.std for p in posteriors])
    scale = vae.config.scaling_factor
    unet = build_unet(cfg, mean.shape[-1])
    # Samples come from an EMA of the weights, as SD's release; diffusers' EMA warms its decay up as
    # (1 + step) / (10 + step), so a short run is not dominated by the random initialisation.
    ema = EMAModel(unet.parameters(), decay=cfg.unet_ema_decay)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())
    n_train_steps = noise_scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    schedule = _cosine_lr(optimizer, cfg.unet_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 5)
    unet.train()
    losses = []
    for idx in _bar(_batches(len(images), cfg.batch_size, cfg.unet_steps, generator), "tiny SD: UNet",
                    cfg.unet_steps, progress):
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, n_train_steps, (len(idx),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        per_sample = (unet(noisy, timesteps, encoder_hidden_states=contexts[labels[idx]]).sample - noise
                      ).square().mean(dim=(1, 2, 3))
        if cfg.unet_min_snr_gamma > 0:
            # Min-SNR-gamma: down-weight the easy low-noise steps (weight min(SNR, gamma) / SNR).
            snr = compute_snr(noise_scheduler, timesteps)
            per_sample = per_sample * snr.clamp(max=cfg.unet_min_snr_gamma) / snr
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
    ema.copy_to(unet.parameters())
    return unet.eval(), {"final_loss": float(np.mean(losses[-50:]))}


def save_sd(vae, unet, clip_dir: Path, out_dir: Path) -> None:
    """A diffusers-layout Stable Diffusion folder (like stable-diffusion-v1-5's), text side included."""

    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet")
    vae.save_pretrained(out_dir / "vae")
    atomic_write_json(out_dir / "scheduler" / "scheduler_config.json", scheduler_config())
    CLIPTextModel.from_pretrained(clip_dir, local_files_only=True).save_pretrained(out_dir / "text_encoder")
    CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True).save_pretrained(out_dir / "tokenizer")

    atomic_write_json(out_dir / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


# ---------------------------------------------------------------------------------------------
# Tiny classifier


def train_classifier(cfg: DemoWorldConfig, images: torch.Tensor, labels: torch.Tensor, out_dir: Path,
                     progress: bool = True) -> dict[str, float]:
    """A timm classifier over the K classes, with flips, shifts and blur; saved in the local-folder
    format `classifier.load_classifier` reads (classifier.json + model.safetensors)."""


    torch.manual_seed(cfg.seed + 6)
    kwargs = {"num_classes": cfg.n_classes}
    model = timm.create_model(CLASSIFIER_NAME, pretrained=False, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=0.01)
    schedule = _cosine_lr(optimizer, cfg.classifier_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    model.train()
    for idx in _bar(_batches(len(images), cfg.batch_size, cfg.classifier_steps, generator), "tiny classifier",
                    cfg.classifier_steps, progress):
        x = _augment(images[idx], generator)
        blurred = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(blurred.view(-1, 1, 1, 1), _blur(x, generator), x)
        loss = F.cross_entropy(model(_normalise(x, IMAGENET_MEAN, IMAGENET_STD)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    save_local_classifier(model, out_dir, CLASSIFIER_NAME, kwargs, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD,
                          class_names(cfg.n_classes))
    return {"final_loss": float(loss.detach())}


# ---------------------------------------------------------------------------------------------
# Checking the stand-ins


@torch.no_grad()
def sample_from_text(sd_dir: Path, contexts: torch.Tensor, n_per_prompt: int, steps: int, seed: int) -> torch.Tensor:
    """Images [n_prompts, n_per_prompt, 3, S, S] in [-1, 1] from the tiny SD (DPM-Solver++, no guidance)."""

    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae", local_files_only=True).eval()
    sampler = DPMSolverMultistepScheduler.from_config(scheduler_config())
    sampler.set_timesteps(steps)
    n = len(contexts)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn((n * n_per_prompt, unet.config.in_channels, size, size), generator=generator)
    context = contexts.repeat_interleave(n_per_prompt, dim=0)
    for t in sampler.timesteps:
        latents = sampler.step(unet(latents, t, encoder_hidden_states=context).sample, t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    return images.reshape(n, n_per_prompt, *images.shape[1:])


@torch.no_grad()
def check_world(cfg: DemoWorldConfig, world: DemoWorld) -> dict[str, Any]:
    """How good the stand-ins are, measured on the dataset's own images (never trained on):
    classifier accuracy, CLIP zero-shot accuracy ("a photo of a <class>"), and the classifier's
    accuracy on images the tiny SD draws from each class name (per class)."""


    names = class_names(cfg.n_classes)
    wnids = list(json.loads(world.class_names_path.read_text()))
    images, labels = [], []
    for k, wnid in enumerate(wnids):
        for path in sorted((world.image_dir / wnid).glob("*.JPEG")):
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
            labels.append(k)
    labels_t = torch.tensor(labels)
    # the classifier and CLIP as stage 3 loads and scores them (their own preprocessing, PIL in)
    classifier = load_classifier(str(world.classifier_dir))
    classifier_acc = float((classifier.classify(images).argmax(1) == labels_t).float().mean())


    vision = load_clip_image_encoder(world.clip_dir)
    clip = CLIPModel.from_pretrained(world.clip_dir, local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(world.clip_dir, local_files_only=True)
    text = F.normalize(clip_text_embeds(clip, tokenize_prompts(tokenizer, [PROMPT.format(n) for n in names])), dim=-1)
    clip_acc = float(((vision.embed(images) @ text.T).argmax(1) == labels_t).float().mean())

    contexts = text_states(world.clip_dir, [PROMPT.format(n) for n in names])
    samples = sample_from_text(world.sd_dir, contexts, cfg.check_samples_per_class, cfg.check_inference_steps,
                               cfg.seed)
    sample_images = [Image.fromarray(a) for a in
                     ((samples.flatten(0, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    predicted = classifier.classify(sample_images).argmax(1).view(cfg.n_classes, -1)
    per_class = (predicted == torch.arange(cfg.n_classes)[:, None]).float().mean(1)
    _save_sample_grid(samples, world.pretrains_dir / "sd_samples.png")
    return {
        "classifier_accuracy_on_dataset_images": classifier_acc,
        "clip_zero_shot_accuracy_on_dataset_images": clip_acc,
        "sd_samples_classified_correctly": float(per_class.mean()),
        "sd_samples_per_class": {n: float(a) for n, a in zip(names, per_class)},
        "sd_samples_image": "sd_samples.png",
    }


def _save_sample_grid(samples: torch.Tensor, path: Path, upscale: int = 2) -> None:
    """samples [K, n, 3, S, S] in [-1, 1] -> one row per class (torchvision's grid, enlarged)."""

    grid = make_grid(samples.flatten(0, 1), nrow=samples.shape[1], padding=0)  # [3, H, W], still in [-1, 1]
    img = Image.fromarray(to_uint8(grid))
    img.resize((img.width * upscale, img.height * upscale), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------
# Building everything


def _complete(folder: Path, *files: str) -> bool:
    return all((folder / f).is_file() for f in files)


def build_demo_world(
    datasets_dir: str | Path = "datasets/demo",
    pretrains_dir: str | Path = "pretrains/demo",
    cfg: DemoWorldConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_corpus_ready: Callable[[DemoWorld], None] | None = None,
) -> tuple[DemoWorld, dict[str, Any]]:
    """Write whatever part of the world is missing; returns (paths, {part: seconds or "kept"}).

    A part counts as present when its final file exists (every file is written atomically and the
    final one last), so an interrupted build resumes where it stopped. `on_corpus_ready(world)` is
    called as soon as the unpaired corpus is complete, before the stand-ins are trained: stage 1
    needs nothing else, so `demo.py` starts it there on the second core.
    """
    cfg = cfg or DemoWorldConfig()
    world = DemoWorld(Path(datasets_dir), Path(pretrains_dir), cfg.corpus_visual_share)
    timings: dict[str, Any] = {}
    world_cfg_path = world.pretrains_dir / "world_config.json"
    stand_ins_cfg = {k: v for k, v in _jsonable(asdict(cfg)).items() if k not in CORPUS_ONLY}
    if world_cfg_path.is_file() and json.loads(world_cfg_path.read_text()) != stand_ins_cfg:
        raise ConfigError(f"{world.pretrains_dir} was built with other settings ({world_cfg_path}); "
                          "delete datasets/demo and pretrains/demo (`make clean`) to rebuild")

    part = _Parts(timings, log)
    part("paired EEG + stimuli", _complete(world.datasets_dir, "eeg_5_95_std.pth", "class_names.json"),
         lambda: write_synthetic_imagenet_eeg(
             world.datasets_dir, n_classes=cfg.n_classes, images_per_class=cfg.images_per_class,
             n_subjects=cfg.n_subjects, n_channels=cfg.n_channels, image_size=cfg.image_size, seed=cfg.seed,
             signal_strength=cfg.signal_strength))
    done_marker = world.pretrain_dir / "DONE"

    def write_corpus() -> None:
        if world.pretrain_dir.exists():
            shutil.rmtree(world.pretrain_dir)
        write_synthetic_pretrain_corpus(world.pretrain_dir, cfg.n_pretrain_files,
                                        length_range=tuple(cfg.pretrain_length_range), seed=cfg.seed,
                                        visual_share=cfg.corpus_visual_share)
        done_marker.write_text(f"{cfg.n_pretrain_files} files, visual share {cfg.corpus_visual_share:g}\n")

    part("unpaired EEG corpus", done_marker.is_file(), write_corpus)
    if on_corpus_ready is not None:
        on_corpus_ready(world)
    if world_complete(world):
        for name in ("tiny classifier", "tiny CLIP", "tiny Stable Diffusion"):
            timings[name] = "kept"
    else:
        atomic_write_json(world_cfg_path, stand_ins_cfg)
        _build_stand_ins(cfg, world, part, progress, log)
    return world, timings


class _Parts:
    """Builds one part of the world unless it is done, timing it into `timings`."""

    def __init__(self, timings: dict[str, Any], log: Callable[[str], None]):
        self.timings, self.log = timings, log

    def __call__(self, name: str, done: bool, build: Callable[[], Any]) -> Any:
        if done:
            self.timings[name] = "kept"
            return None
        self.log(f"[demo world] {name} ...")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = build()
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.log(f"[demo world] {name}: {self.timings[name]} s ({time.process_time() - cpu_start:.0f} s CPU)")
        return result


def world_complete(world: DemoWorld) -> bool:
    """Whether every stand-in and the check report are written (each part's final file is written last)."""
    return (_complete(world.clip_dir, "model.safetensors", "tokenizer_config.json")
            and _complete(world.sd_dir, "model_index.json") and _complete(world.classifier_dir, "classifier.json")
            and world.report_path.is_file())


def _build_stand_ins(cfg: DemoWorldConfig, world: DemoWorld, part: _Parts, progress: bool,
                     log: Callable[[str], None]) -> None:
    """The tiny classifier, CLIP and SD trained on fresh draws of the classes, then their check."""
    world.pretrains_dir.mkdir(parents=True, exist_ok=True)
    images, labels = render_world_images(cfg, cfg.world_images_per_class)
    stats: dict[str, Any] = {}
    stats["classifier"] = part("tiny classifier", _complete(world.classifier_dir, "classifier.json"),
                               lambda: train_classifier(cfg, images, labels, world.classifier_dir, progress))
    stats["clip"] = part("tiny CLIP", _complete(world.clip_dir, "model.safetensors", "tokenizer_config.json"),
                         lambda: train_clip(cfg, images, labels, world.clip_dir, progress))

    def build_sd() -> dict[str, Any]:
        vae, vae_stats = train_vae(cfg, images, progress)
        contexts = text_states(world.clip_dir, [PROMPT.format(n) for n in class_names(cfg.n_classes)])
        unet, unet_stats = train_unet(cfg, vae, images, labels, contexts, progress)
        save_sd(vae, unet, world.clip_dir, world.sd_dir)
        return {"vae": vae_stats, "unet": unet_stats}

    stats["sd"] = part("tiny Stable Diffusion", _complete(world.sd_dir, "model_index.json"), build_sd)
    report = part("check of the stand-ins", False, lambda: check_world(cfg, world))
    atomic_write_json(world.report_path, {"check": report, "training": stats, "timings_s": part.timings,
                                          "config": _jsonable(asdict(cfg))})
    log("[demo world] " + _summary(report))


def write_shuffled_labels_copy(world: DemoWorld, subject: int = 4, seed: int = 0) -> Path:
    """The shuffled-labels control's training data: `<datasets>/shuffled_labels/eeg_5_95_std.pth`.

    It holds `subject`'s trials only, in file order (so the positions of the "single" split file
    are unchanged), with the (image, label) of the train-split trials permuted among themselves,
    and likewise the val-split trials; test trials keep their true pairing. A model trained on it
    sees the same EEG and the same images, but no EEG -> image relation. Written once.
    """
    out = world.datasets_dir / "shuffled_labels" / "eeg_5_95_std.pth"
    if out.is_file():
        return out

    data = torch.load(world.eeg_path, weights_only=True)
    trials = [dict(t) for t in data["dataset"] if int(t["subject"]) == subject]
    if not trials:
        raise ConfigError(f"{world.eeg_path} has no trials of subject {subject}")
    split = torch.load(world.splits_path, weights_only=True)["splits"][0]
    rng = np.random.default_rng([seed, subject, 4242])
    for name in ("train", "val"):
        positions = [p for p in split[name] if p < len(trials)]
        pairs = [(trials[p]["image"], trials[p]["label"]) for p in positions]
        for p, j in zip(positions, rng.permutation(len(pairs))):
            trials[p]["image"], trials[p]["label"] = pairs[j]
    atomic_torch_save({**data, "dataset": trials}, out)
    return out


def _summary(report: dict[str, Any]) -> str:
    return (f"classifier {report['classifier_accuracy_on_dataset_images']:.0%} on the dataset's images, "
            f"CLIP zero-shot {report['clip_zero_shot_accuracy_on_dataset_images']:.0%}, "
            f"SD samples from class names classified correctly {report['sd_samples_classified_correctly']:.0%}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


__all__ = [
    "DemoWorld", "DemoWorldConfig", "PROMPT", "build_demo_world", "corpus_folder", "build_tokenizer_files", "check_world",
    "class_names", "make_tokenizer", "render_world_images", "sample_from_text", "text_states",
    "write_shuffled_labels_copy",
]
