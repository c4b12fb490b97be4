"""Random-weight stand-ins for the pretrained files, at their real sizes and in their real formats.

The rehearsal (`dreamdiffusion.tools.rehearsal`) runs every stage at the paper's model sizes without the
downloads. Each writer produces what a user would download, in the same layout, so the stages read
it through the same code:

    sd15()            SD1.5 as a CompVis `v1-5-pruned.ckpt` (UNet + VAE, `state_dict` inside)
    clip()            CLIP ViT-L/14 as a transformers folder (CLIPModel: both towers, and a tokenizer)
    classifier()      torchvision ViT-H/14 (SWAG E2E, 518 px) as a state-dict file
    authors_checkpoint()  a generation checkpoint in the authors' layout (original.write_generation_checkpoint)
    imagenet_eeg()    ImageNet-EEG-shaped data: 128 channels, trials of 450..600 samples, 512 px JPEGs
    corpus()          unpaired EEG for stage 1

`Sizes.tiny()` makes the same files at toy sizes, for the test of the rehearsal's code path.
Random weights: the images are noise; what is measured is whether it runs, its speed and its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel

from dreamdiffusion.core.files import atomic_torch_save
from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg, write_synthetic_pretrain_corpus
from dreamdiffusion.models.clip_embedder import CLIP_VIT_L14_VISION, clip_tokenizer
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, time_cond_overrides
from dreamdiffusion.models.mae import ENCODER_PRESETS, EEGEncoder
from dreamdiffusion.models.original_formats import save_compvis_checkpoint, write_generation_checkpoint
from dreamdiffusion.models.sd15 import build_sd15, load_sd15, read_sd15_configs

# openai/clip-vit-large-patch14's text tower (SD1.5's text encoder), for the class-name oracle.
CLIP_VIT_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")


@dataclass
class Sizes:
    """The sizes of the stand-ins: SD1.5's configs (None = the real ones), CLIP, the classifier, data."""

    sd_config_dir: str | None = None  # a diffusers-layout config folder; None = SD1.5's (package data)
    clip_vision: dict[str, Any] = field(default_factory=lambda: dict(CLIP_VIT_L14_VISION))
    clip_text: dict[str, Any] = field(default_factory=lambda: dict(CLIP_VIT_L14_TEXT))
    classifier: str = "vit_h_14"  # a torchvision model name
    classifier_image_size: int = 518
    encoder: dict[str, Any] = field(default_factory=lambda: dict(ENCODER_PRESETS["large"]))
    n_channels: int = 128
    n_classes: int = 8
    images_per_class: int = 5
    image_size: int = 512
    n_corpus_files: int = 24

    @classmethod
    def tiny(cls, sd_config_dir: str) -> Sizes:
        small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, projection_dim=16)
        return replace(cls(), sd_config_dir=sd_config_dir, clip_vision={**small, "image_size": 32, "patch_size": 8},
                       clip_text={**small, "max_position_embeddings": 77, "vocab_size": 600},
                       classifier="squeezenet1_1", classifier_image_size=224,
                       encoder=dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0, n_times=32),
                       n_classes=3, images_per_class=3, image_size=16, n_corpus_files=6)


def sd15(path: Path, sizes: Sizes) -> Path:
    """A CompVis single file with random UNet + VAE weights (SD1.5's architecture by default)."""

    torch.manual_seed(0)
    parts = build_sd15(*read_sd15_configs(sizes.sd_config_dir))
    return save_compvis_checkpoint(parts.unet, parts.vae, path)


def byte_tokenizer(folder: Path, max_length: int) -> int:
    """A CLIPTokenizer over the byte alphabet (no vocabulary download) saved in `folder`; returns its
    vocabulary size (514, below CLIP's 49408)."""

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    clip_tokenizer(vocab, [], max_length).save_pretrained(folder)
    return len(vocab)


def clip(folder: Path, sizes: Sizes) -> Path:
    """A transformers CLIPModel folder (vision + text towers, random weights) with a tokenizer."""

    torch.manual_seed(0)
    projection = sizes.clip_vision["projection_dim"]
    config = CLIPConfig(text_config=sizes.clip_text, vision_config=sizes.clip_vision, projection_dim=projection)
    CLIPModel(config).save_pretrained(folder)
    byte_tokenizer(folder, sizes.clip_text["max_position_embeddings"])
    return folder


def classifier(path: Path, sizes: Sizes) -> Path:
    """torchvision's classifier architecture with random weights, as the state-dict file torchvision ships."""

    torch.manual_seed(0)
    kwargs = {"image_size": sizes.classifier_image_size} if sizes.classifier.startswith("vit_") else {}
    model = torchvision.models.get_model(sizes.classifier, weights=None, **kwargs)
    atomic_torch_save(model.state_dict(), path)
    return path


def authors_checkpoint(path: Path, sd_file: Path, sizes: Sizes) -> Path:
    """A generation checkpoint in the authors' layout: the SD file's UNet/VAE with a random conditioner."""

    sd = load_sd15(sd_file, sizes.sd_config_dir, unet_overrides=time_cond_overrides())
    torch.manual_seed(1)
    encoder = EEGEncoder(n_channels=sizes.n_channels, **sizes.encoder)
    model = DreamDiffusion.build(encoder, sd, clip_dim=sizes.clip_vision["projection_dim"])
    return write_generation_checkpoint(model, path)


def imagenet_eeg(folder: Path, sizes: Sizes) -> dict[str, Path]:
    """ImageNet-EEG-shaped data for one subject (numbered 4, as the paper's) at the real sizes."""

    return write_synthetic_imagenet_eeg(folder, n_classes=sizes.n_classes, images_per_class=sizes.images_per_class,
                                        n_subjects=4, n_channels=sizes.n_channels, image_size=sizes.image_size,
                                        out_of_range_fraction=0.0, split_fractions=(0.6, 0.2, 0.2))


def corpus(folder: Path, sizes: Sizes) -> Path:

    write_synthetic_pretrain_corpus(folder, n_files=sizes.n_corpus_files, channel_counts=(32, 64, 128),
                                    length_range=(600, 2000))
    return folder
