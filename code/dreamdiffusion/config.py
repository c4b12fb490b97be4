"""Strict, typed configuration for the three stages (OmegaConf structured configs).

One dataclass per stage. A stage script builds its config from, in order:
  1. the dataclass defaults (the paper's values),
  2. the stage's default file `configs/<stage>.yaml`,
  3. each `--config FILE` given (presets, the demo's configs), merged in order,
  4. `key=value` overrides on the command line (dotted keys: `encoder.depth=12`).
An unknown key or a value of the wrong type is a `ConfigError` that names the key and where it
came from. `--print-config` prints the resolved config and exits. The resolved config is saved as
`config.yaml` in every output folder (`save_config`) and, as plain data, inside checkpoints.

Paths in configs are relative to the repository root unless absolute (`resolve_path`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .io import atomic_write_text


def _find_repo_root() -> Path:
    env = os.environ.get("DREAMDIFFUSION_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]  # code/dreamdiffusion/config.py -> repo root
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd().resolve()


REPO_ROOT = _find_repo_root()
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """An absolute path as is; a relative one against the repository root; None stays None."""
    if path is None or str(path) == "":
        return None
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else REPO_ROOT / path


# ---------------------------------------------------------------------------------------------
# Shared groups


@dataclass
class EEGEncoderConfig:
    """The stage-1 encoder (the MAE's encoder half). Defaults: the paper's `large` encoder."""

    n_channels: int = 128  # EEG channels of every input (the ImageNet-EEG cap has 128)
    n_times: int = 512  # time samples per input after interpolation
    patch_size: int = 4  # time samples per token: 512 / 4 = 128 tokens
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 1.0  # the authors' code uses 1.0, not ViT's usual 4.0


@dataclass
class MAEDecoderConfig:
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


@dataclass
class TrainerConfig:
    """Lightning trainer settings shared by stages 1 and 2."""

    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, list of ids or "auto"; >1 runs DDP
    num_nodes: int = 1
    strategy: str = "auto"  # auto picks DDP when devices * num_nodes > 1
    precision: str = "auto"  # auto = bf16-mixed on a GPU, 32 on the CPU
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    num_workers: int = 2  # DataLoader workers per process
    limit_train_batches: Any = None  # int or fraction; None = all (for smoke runs)
    limit_val_batches: Any = None
    progress_bar: bool = True


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dreamdiffusion"
    mode: str = "offline"  # offline | online | disabled
    run_name: str | None = None


@dataclass
class PairedDataConfig:
    """ImageNet-EEG (Spampinato et al. 2017) as the authors load it (REFERENCE section 1)."""

    eeg_path: str = "datasets/eeg_5_95_std.pth"
    splits_path: str = "datasets/block_splits_by_image_single.pth"
    image_dir: str | None = "datasets/imageNet_images"
    subject: int = 4  # 0 = all subjects; the paper uses subject 4 with the "single" split file
    split_index: int = 0
    time_window: list[int] = field(default_factory=lambda: [20, 460])  # samples kept, [start, stop)
    n_times: int = 512  # the window is linearly interpolated to this many samples
    min_trial_length: int = 450  # trials shorter or longer are dropped, as in the authors' loader
    max_trial_length: int = 600
    image_size: int = 512
    crop_probability: float = 0.5  # train-time random square crop, then resize back
    crop_ratio: float = 0.2  # crop side = image_size - crop_ratio * image_size
    clip_image_size: int = 224  # CLIP ViT-L/14 input


@dataclass
class PretrainDataConfig:
    """Unpaired EEG for stage 1: every *.npy (channels x time) below `root`."""

    root: str = "datasets/pretrain_eeg"
    n_channels: int = 128
    n_times: int = 512
    scale: float = 0.1  # the authors divide the raw signal by 10 before the MAE
    skip_bad_files: bool = False
    val_fraction: float = 0.0  # files held out for a validation loss (0 = none)


# ---------------------------------------------------------------------------------------------
# Stage 1: masked signal modelling


@dataclass
class Stage1Config:
    output_dir: str = "outputs/stage1"
    seed: int = 2022
    encoder: EEGEncoderConfig = field(default_factory=EEGEncoderConfig)
    decoder: MAEDecoderConfig = field(default_factory=MAEDecoderConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mask_ratio: float = 0.75  # paper; the authors' code default is 0.1
    batch_size: int = 100  # per device
    epochs: int = 500
    warmup_epochs: int = 40
    lr: float = 2.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 0.8
    checkpoint_every_n_epochs: int = 50  # checkpoints/epoch_NNNN.ckpt (last.ckpt is every epoch); 0 = off
    figure_every_n_epochs: int = 10  # figures/recon_epoch_NNNN.png (and after the last epoch); 0 = off
    n_figure_samples: int = 4  # EEG windows (rows) per reconstruction figure
    n_figure_channels: int = 3  # channels (columns) per figure, evenly spaced over the cap
    # End this run after this many epochs while the lr schedule still spans `epochs` (to split a
    # long run into jobs; continue with resume=true). None = run to `epochs`.
    stop_after_epochs: int | None = None
    resume: bool = False


# ---------------------------------------------------------------------------------------------
# Stage 2: fine-tuning Stable Diffusion 1.5 with CLIP alignment


@dataclass
class Stage2Config:
    output_dir: str = "outputs/stage2"
    seed: int = 2022
    data: PairedDataConfig = field(default_factory=PairedDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # A stage-1 export folder or an authors'-format stage-1 checkpoint; None trains the encoder
    # from scratch with the sizes in `encoder` (the "no pretraining" ablation).
    eeg_encoder_path: str | None = "outputs/stage1/eeg_encoder"
    encoder: EEGEncoderConfig = field(default_factory=EEGEncoderConfig)
    # SD1.5: a CompVis single file (.ckpt/.safetensors) or a diffusers-layout folder.
    sd_path: str = "pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt"
    sd_config_dir: str = "configs/sd15"
    clip_path: str = "pretrains/clip-vit-large-patch14"  # transformers CLIP folder (or hub id online)
    context_tokens: int = 77  # the UNet's cross-attention sees 77 EEG tokens, like SD's text
    global_pool: bool = False
    use_time_cond: bool = True
    clip_weight: float = 1.0
    clip_loss: str = "cosine"  # cosine | contrastive
    clip_temperature: float = 0.07  # only for clip_loss=contrastive
    # Width of the CLIP image embedding the CLIP head predicts (ViT-L/14: 768); only read when no
    # CLIP encoder is loaded (clip_weight=0), else taken from the CLIP config.
    clip_dim: int = 768
    batch_size: int = 4  # per device (authors' released config: 4; their yaml: 25)
    epochs: int = 300  # paper
    lr: float = 5.3e-5
    weight_decay: float = 0.01  # torch's AdamW default, as in the authors' code
    grad_clip: float = 0.5
    gradient_checkpointing: bool = False
    val_every_n_epochs: int = 2
    sample_every_n_epochs: int = 10
    n_val_samples: int = 8  # EEG trials of the val split sampled for images / top-1
    val_sampler: str = "dpm++"
    val_inference_steps: int = 25
    classifier: str | None = None  # see Stage3Config.classifier; None skips the val top-1
    classifier_weights: str | None = None  # weights file for `classifier` (see Stage3Config)
    n_way: int = 50
    resume: bool = False
    # What `<output_dir>/model` holds: "best" = best.ckpt, chosen on the val split (the authors
    # picked theirs on test); "last" = the final epoch. Recorded in model/selection.json.
    export: str = "best"


# ---------------------------------------------------------------------------------------------
# Stage 3: generation and evaluation


@dataclass
class Stage3Config:
    output_dir: str = "outputs/stage3"
    seed: int = 2022
    # Our `save_pretrained` folder or an authors'-format generation checkpoint (.pth).
    model: str = "outputs/stage2/model"
    sd_config_dir: str = "configs/sd15"  # used for authors' checkpoints
    data: PairedDataConfig = field(default_factory=PairedDataConfig)
    split: str = "test"
    max_trials: int | None = None  # None = every trial of the split
    num_images_per_eeg: int = 5
    sampler: str = "plms"  # plms | ddim | dpm++
    num_inference_steps: int = 250
    eta: float = 0.0
    guidance_scale: float = 1.0  # 1 = no classifier-free guidance, as in the paper
    # guidance's null condition: "zero" context, or "learned" (the model's encoding of a zero EEG;
    # for the class oracle, the text states of the empty prompt)
    null_condition: str = "zero"
    batch_size: int = 5  # EEG trials per sampling batch
    device: str = "auto"
    precision: str = "auto"  # auto = fp16 on a GPU, fp32 on the CPU
    # The n-way classifier: "torchvision:vit_h_14" (the paper's), "timm:<name>", or a local folder
    # with a saved classifier; weights from `classifier_weights` when given.
    classifier: str = "torchvision:vit_h_14"
    classifier_weights: str | None = "pretrains/classifiers/vit_h_14_swag_e2e_v1.pth"
    n_way: int = 50
    top_k: int = 1
    n_way_trials: int | None = None  # None = exact expectation; 50 = the authors' sampled estimate
    bootstrap_samples: int = 1000
    metrics: list[str] = field(
        default_factory=lambda: ["n_way", "mse", "pcc", "ssim", "clip_similarity", "retrieval"]
    )
    clip_path: str | None = "pretrains/clip-vit-large-patch14"
    lpips_weights: str | None = None
    fid_feature_weights: str | None = None
    # Controls (REFERENCE section 5)
    shuffled_labels: bool = False  # pair each EEG trial with a random image of another class
    class_oracle: bool = False  # condition SD on "a photo of a <class>" instead of EEG
    class_names_path: str | None = None  # wnid -> readable name (json); default: the wnid itself
    oracle_prompt: str = "a photo of a {}"
    # The class oracle conditions the BASE SD1.5 UNet (not the fine-tuned one) on CLIP text states.
    oracle_sd_path: str = "pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt"
    # SD1.5's text encoder is the text tower of CLIP ViT-L/14: a transformers CLIP folder with a
    # tokenizer; None = clip_path.
    oracle_text_encoder_path: str | None = None
    save_images: bool = True
    n_grid_trials: int = 8  # trials (rows: ground truth + samples) per grid image
    kid_subset_size: int = 50  # torchmetrics' default subset size, capped at the number of images


STAGE_CONFIGS = {"stage1": Stage1Config, "stage2": Stage2Config, "stage3": Stage3Config}


# ---------------------------------------------------------------------------------------------
# Building a config


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        where = f" (key '{key}')" if key else ""
        # OmegaConf appends multi-line context (full_key, object_type); the first line says it all.
        detail = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ConfigError(f"invalid config in {source}{where}: {detail}") from err


def build_config(
    schema: type,
    config_files: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
    default_file: str | os.PathLike | None = None,
) -> DictConfig:
    """Defaults of `schema`, then `default_file`, then `config_files`, then `key=value` overrides."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    files = ([default_file] if default_file is not None else []) + list(config_files)
    for f in files:
        path = resolve_path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command-line override '{item}'")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config cannot be resolved: {err}") from err
    return cfg


def parse_args(
    schema: type,
    argv: Sequence[str] | None,
    default_file: str | os.PathLike | None,
    description: str = "",
    prog: str | None = None,
) -> DictConfig | None:
    """The stage scripts' command line: `[--config FILE]... [--print-config] [key=value]...`.

    Returns the config, or None after `--print-config` printed it (the caller then returns).
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides are dotted keys, e.g. `batch_size=8 encoder.depth=12`. "
        "Paths are relative to the repository root unless absolute.",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML merged over the stage defaults (repeatable, applied in order)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    cfg = build_config(schema, args.config, args.overrides, default_file=default_file)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return None
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python data (for checkpoints, JSON and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config to `<output_dir>/config.yaml` (atomically) and return that path."""
    out = Path(output_dir) / "config.yaml"
    atomic_write_text(out, OmegaConf.to_yaml(cfg, resolve=True))
    return out


def load_saved_config(schema: type, path: str | os.PathLike) -> DictConfig:
    """Reload a `config.yaml` written by `save_config`, validated against `schema`."""
    return build_config(schema, [path])
