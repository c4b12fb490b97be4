"""Strict, typed configuration for the three stages (OmegaConf structured configs).

One dataclass per stage. A stage script builds its config from, in order:
  1. the dataclass defaults (the paper's values),
  2. the stage's default file `configs/<stage>.yaml`,
  3. each `--config FILE` given (presets, the demo's configs), merged in order,
  4. `key=value` overrides on the command line (dotted keys: `encoder.depth=12`).
An unknown key or a value of the wrong type is a `ConfigError` that names the key and where it
came from. `--print-config` prints the resolved config and exits. The resolved config is saved as
`config.yaml` in every output folder (`save_config`) and, as plain data, inside checkpoints.

`fidelity=authors_code` (stages 1-3) swaps the paper's values for the authors' code's: the values of
the deviations manifest (`dreamdiffusion.core.fidelity`) are merged right after the stage's defaults
file, so the user's own files and overrides still win.

Paths in configs are relative to the repository root unless absolute. This module is the only one
that knows the repository: `resolved(cfg)` returns a copy whose path fields (declared with
`path_field`) are absolute, and the stage runners hand those to the library, which takes explicit
paths. The saved `config.yaml` keeps the paths as the user wrote them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamdiffusion.core import fidelity as fidelity_manifest
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.extras import check_extras
from dreamdiffusion.core.files import atomic_write_text
from dreamdiffusion.core.logs import configure_logging
from dreamdiffusion.core.values import check_values


def _find_repo_root() -> Path:
    env = os.environ.get("DREAMDIFFUSION_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]  # code/dreamdiffusion/config.py -> repo root
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd().resolve()


REPO_ROOT = _find_repo_root()


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """An absolute path as is; a relative one against the repository root; None stays None."""
    if path is None or str(path) == "":
        return None
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else REPO_ROOT / path


# How `resolved` treats a field: "path" is always a path; "path_or_hub" may be a hub id
# ("openai/clip-vit-large-patch14") when no such local path exists; "spec" may name a library model
# ("torchvision:vit_h_14", "timm:<name>") instead of a folder.
PATH_KINDS = ("path", "path_or_hub", "spec")


def path_field(default: str | None, kind: str = "path") -> Any:
    """A config field holding a path (relative to the repository root unless absolute)."""
    assert kind in PATH_KINDS
    return field(default=default, metadata={"path": kind})


def _resolve_value(value: str | None, kind: str) -> str | None:
    if value in (None, ""):
        return value
    text = str(value)
    if kind == "spec" and ":" in text and not Path(text).is_absolute():
        return text
    local = resolve_path(text)
    if kind == "path_or_hub" and not local.exists() and text.count("/") == 1 and not text.startswith((".", "~")):
        return text  # a hub id; clip_embedder decides whether it may be fetched
    return str(local)


def _path_fields(schema: type) -> dict[str, Any]:
    """{field name: path kind or a nested schema} for a dataclass schema."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if "path" in f.metadata:
            out[f.name] = f.metadata["path"]
        elif dataclasses.is_dataclass(hints.get(f.name)):
            out[f.name] = hints[f.name]
    return out


def resolved(cfg: DictConfig) -> DictConfig:
    """A copy of a stage config with every path field absolute (see `path_field`)."""
    schema = OmegaConf.get_type(cfg)
    out = OmegaConf.structured(schema)
    out = OmegaConf.merge(out, cfg)

    def walk(node: DictConfig, schema: type) -> None:
        for name, kind in _path_fields(schema).items():
            if isinstance(kind, str):
                node[name] = _resolve_value(node[name], kind)
            else:
                walk(node[name], kind)

    walk(out, schema)
    OmegaConf.set_readonly(out, True)
    return out


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
    # Patch-embedding initialisation: "xavier" (MAE's, as a Linear over channels x patch) or
    # "normal" (normal(0, 0.02), what the authors' _init_weights ends up doing). Not part of the
    # saved architecture: it only matters for an encoder trained from scratch.
    patch_embed_init: str = "xavier"


@dataclass
class MAEDecoderConfig:
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


@dataclass
class TrainerConfig:
    """Lightning trainer settings shared by stages 1 and 2."""

    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, list of ids or "auto"; >1 runs DDP; under torchrun / srun 1 = the launcher's count
    num_nodes: int = 1
    strategy: str = "auto"  # auto picks DDP when devices * num_nodes > 1
    # auto = bf16-mixed on a GPU with native bf16 (compute capability >= 8.0), else 32; 16-mixed only by name
    precision: str = "auto"
    tf32: bool = True  # TF32 for the fp32 matrix products/convolutions on a GPU (core/precision.py)
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
class ThingsEEG2Config:
    """THINGS-EEG2 (Gifford et al. 2022; dreamdiffusion.data.things_eeg2), with data.kind=things_eeg2. The
    images are data.image_dir (the image set: image_metadata.npy, training_images/, test_images/)."""

    eeg_dir: str = path_field("datasets/things-eeg2/preprocessed_data")  # sub-XX/preprocessed_eeg_*.npy
    # Leave-one-subject-out: train (and validate) on every other subject of eeg_dir, test on this one.
    leave_out: int | None = None
    average_repetitions_train: bool = False  # one item per repetition (ATM); true: their mean (NICE)
    average_repetitions_test: bool = True  # the field's protocol: the 80 test repetitions averaged
    val_concepts: int = 100  # training concepts held out for validation (seeded)
    seed: int = 0
    n_channels: int | None = None  # adapt the EEG to the encoder (tile / crop channels); null = native
    n_times: int | None = None  # linear interpolation along time; null = native
    pick_channels: list[str] | None = None  # e.g. the 17 occipital/parietal channels of a 63-channel file


@dataclass
class PairedDataConfig:
    """ImageNet-EEG (Spampinato et al. 2017) as the authors load it (docs/method.md, "Data"), or
    THINGS-EEG2 with kind=things_eeg2 (then eeg_path, splits_path, the window and the length filter
    are not used)."""

    kind: str = "imagenet_eeg"  # imagenet_eeg | things_eeg2
    things_eeg2: ThingsEEG2Config = field(default_factory=ThingsEEG2Config)
    eeg_path: str = path_field("datasets/eeg_5_95_std.pth")
    splits_path: str = path_field("datasets/block_splits_by_image_single.pth")
    image_dir: str | None = path_field("datasets/imageNet_images")
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
    # Decode every image of the split once when the dataset is built, so a broken file stops the run
    # before training (seconds for ImageNet-EEG's 2,000 images); false: only check that they exist.
    check_images: bool = True
    # A split whose test stimuli (images; THINGS-EEG2: images or concepts) also occur in train is refused
    # (the repeated-stimulus confound, data/split_hygiene.py); true runs on it and lists it as a deviation.
    allow_repeated_stimuli: bool = False


@dataclass
class PretrainDataConfig:
    """Unpaired EEG for stage 1: a packed corpus (a folder with corpus.json, dreamdiffusion.data.packed_corpus)
    or every *.npy (channels x time) below `root`."""

    root: str = path_field("datasets/pretrain_eeg")
    n_channels: int = 128
    n_times: int = 512
    scale: float = 0.1  # the authors divide the raw signal by 10 before the MAE
    skip_bad_files: bool = False
    val_fraction: float = 0.0  # files held out for a validation loss (0 = none)
    # The content checks of a folder of *.npy, kept with each file's size and mtime so a start-up
    # re-checks only changed files (dreamdiffusion.data.check_record); null = <root>/eeg_checks.json.
    check_record: str | None = path_field(None)


@dataclass
class ProbeMonitorConfig:
    """The encoder probe as a stage-1 monitor (`probe.quick_probe`): every `every_n_epochs`, the val
    accuracy of a linear probe on the frozen encoder's features of paired data (one subject's
    train / val split), in metrics.csv and on the progress bar."""

    every_n_epochs: int = 0  # 0 = off
    data: PairedDataConfig = field(default_factory=lambda: PairedDataConfig(image_dir=None))


# ---------------------------------------------------------------------------------------------
# Stage 1: masked signal modelling


@dataclass
class Stage1Config:
    stage: ClassVar[str] = "stage1"
    output_dir: str = path_field("outputs/stage1")
    # paper | authors_code: the authors' code values of the deviations manifest (dreamdiffusion.core.fidelity)
    fidelity: str = "paper"
    seed: int = 2022
    encoder: EEGEncoderConfig = field(default_factory=EEGEncoderConfig)
    decoder: MAEDecoderConfig = field(default_factory=MAEDecoderConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    probe: ProbeMonitorConfig = field(default_factory=ProbeMonitorConfig)
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
    # Claim an output_dir whose results were made with other settings: without resume, its earlier
    # outputs are cleared first; with resume=true, training continues from last.ckpt with these settings.
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------
# Stage 2: fine-tuning Stable Diffusion 1.5 with CLIP alignment


@dataclass
class Stage2Config:
    stage: ClassVar[str] = "stage2"
    output_dir: str = path_field("outputs/stage2")
    fidelity: str = "paper"  # paper | authors_code (see Stage1Config.fidelity)
    seed: int = 2022
    data: PairedDataConfig = field(default_factory=PairedDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # A stage-1 export folder or an authors'-format stage-1 checkpoint; None trains the encoder
    # from scratch with the sizes in `encoder` (the "no pretraining" ablation).
    eeg_encoder_path: str | None = path_field("outputs/stage1/eeg_encoder")
    encoder: EEGEncoderConfig = field(default_factory=EEGEncoderConfig)
    # SD1.5: a CompVis single file (.ckpt/.safetensors) or a diffusers-layout folder.
    sd_path: str = path_field("pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt")
    # The UNet/VAE/scheduler configs for a single file; null = SD1.5's, shipped with the package.
    sd_config_dir: str | None = path_field(None)
    # The alignment target: a transformers CLIP folder (or hub id online), or "open_clip:<model name>"
    # with its weights file in clip_weights (dreamdiffusion.models.clip_embedder).
    clip_path: str = path_field("pretrains/clip-vit-large-patch14", "path_or_hub")
    clip_weights: str | None = path_field(None)
    context_tokens: int = 77  # the UNet's cross-attention sees 77 EEG tokens, like SD's text
    global_pool: bool = False
    # With global_pool: average the tokens before the encoder's final LayerNorm (the authors' order)
    # instead of after it.
    pool_before_norm: bool = False
    use_time_cond: bool = True
    # What trains (dreamdiffusion.models.dreamdiffusion.select_trainable): "paper" = the EEG conditioner and the UNet's
    # cross-attention; "authors_code" adds what their code trains besides: the encoder's pos_embed and
    # CLIP's layer_norm2, with gradients through the CLIP forward (the alignment target drifts).
    trainable: str = "paper"
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
    # Work done once (dreamdiffusion.data.stage2_cache): the frozen CLIP target's embeddings of the un-augmented
    # images are computed when the fit starts (or read from cache_dir) instead of at every step - the same
    # numbers. Only with a frozen target: trainable=authors_code trains CLIP's layer_norm2, so they change.
    cache_clip_embeddings: bool = True
    # The VAE posteriors of the un-cropped images, computed once (each step still draws its own sample):
    # the random crop is then off - a deviation (core/fidelity.py).
    cache_latents: bool = False
    cache_dir: str | None = path_field(None)  # null = <output_dir>/cache; one folder for several runs reuses it
    # At start-up, one extra forward/backward on one sample measures the activations and prints the
    # computed peak memory next to the device's, with the settings to change when it will not fit.
    memory_check: bool = True
    val_every_n_epochs: int = 2
    sample_every_n_epochs: int = 10
    n_val_samples: int = 8  # EEG trials of the val split sampled for images / top-1
    val_sampler: str = "dpm++"
    val_inference_steps: int = 25
    classifier: str | None = path_field(None, "spec")  # see Stage3Config.classifier; None skips the val top-1
    classifier_weights: str | None = path_field(None)  # weights file for `classifier` (see Stage3Config)
    n_way: int = 50
    resume: bool = False
    # Claim an output_dir whose results were made with other settings: without resume, its earlier
    # outputs are cleared first; with resume=true, training continues from last.ckpt with these settings.
    overwrite: bool = False
    # What `<output_dir>/model` holds: "best" = best.ckpt, chosen on the val split (the authors
    # picked theirs on test); "last" = the final epoch. Recorded in model/selection.json.
    export: str = "best"
    # The selection audit (train/selection_audit.py): at every validation also sample the first
    # `audit_trials` test trials (`audit_slots` images each; needs `classifier`) and keep their n-way
    # figures aside in selection_audit.json - never used to choose - to report which epoch the authors'
    # rule (the best slot of the first 25 test trials) would have picked and how much higher its figure is.
    selection_audit: bool = False
    audit_trials: int = 25  # the authors' rule looks at the first 25 test trials
    audit_slots: int = 5  # ... with 5 images each, keeping the best slot


# ---------------------------------------------------------------------------------------------
# Stage 3: generation and evaluation


@dataclass
class Stage3Config:
    stage: ClassVar[str] = "stage3"
    output_dir: str = path_field("outputs/stage3")
    fidelity: str = "paper"  # paper | authors_code (see Stage1Config.fidelity)
    # generate: write images/ + records/; score: score a folder of test{i}-{k}.png; all: both
    phase: str = "all"
    # The folder `score` reads; null = <output_dir>/images. Any folder in the authors' naming
    # (k = 0 the ground truth) can be scored, e.g. the output of their gen_eval_eeg.py.
    images_dir: str | None = path_field(None)
    overwrite: bool = False  # start again when output_dir holds images made with other settings
    seed: int = 2022
    # Our `save_pretrained` folder or an authors'-format generation checkpoint (.pth).
    model: str = path_field("outputs/stage2/model")
    sd_config_dir: str | None = path_field(None)  # for authors' checkpoints; null = SD1.5's (package data)
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
    batch_size: int = 5  # EEG trials per sampling batch (part of the images' identity: see generation.py)
    device: str = "auto"  # one process: auto | cpu | cuda | cuda:N
    # Several processes (Lightning Fabric; or started by torchrun / srun, whose process counts are taken
    # when devices / num_nodes are left at 1): trials are sharded by batch across the processes.
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "ddp"
    rank_timeout_s: float = 3600.0  # how long rank 0 waits for the other processes' trials
    progress_bar: bool = True
    # Generation dtype: auto = bf16 on a GPU with native bf16 (compute capability >= 8.0), else fp32;
    # fp16 only by name (its range ends at 65504). The EEG encoder stays fp32 whatever this says.
    precision: str = "auto"
    tf32: bool = True  # TF32 for the fp32 matrix products/convolutions on a GPU (generation at fp32, scoring)
    # The n-way classifier: "torchvision:vit_h_14" (the paper's), "timm:<name>", or a local folder
    # with a saved classifier; weights from `classifier_weights` when given.
    classifier: str = path_field("torchvision:vit_h_14", "spec")
    classifier_weights: str | None = path_field("pretrains/classifiers/vit_h_14_swag_e2e_v1.pth")
    n_way: int = 50
    top_k: int = 1
    n_way_trials: int | None = None  # None = exact expectation; 50 = the authors' sampled estimate
    bootstrap_samples: int = 1000
    metrics: list[str] = field(
        default_factory=lambda: ["n_way", "mse", "pcc", "ssim", "clip_similarity", "retrieval"]
    )
    clip_path: str | None = path_field("pretrains/clip-vit-large-patch14", "path_or_hub")
    clip_weights: str | None = path_field(None)  # for clip_path="open_clip:<model name>"
    lpips_weights: str | None = path_field(None)
    fid_feature_weights: str | None = path_field(None)
    # EEG->image retrieval: top-k for each k here at each n-way here (exact expectations, n up to the
    # number of distinct images); the (n_way, top_k) cell is also the headline "retrieval".
    retrieval_ways: list[int] = field(default_factory=lambda: [2, 4, 10, 50, 100, 200])
    retrieval_top_ks: list[int] = field(default_factory=lambda: [1, 5])
    # The reconstruction metrics of the brain-to-image literature (dreamdiffusion.evaluation.recon), each from
    # torchvision's weights file: alexnet2/alexnet5 (alexnet-owt-7be5be79.pth, the LPIPS file too),
    # inception (inception_v3_google-0cc3c7bd.pth), effnet (efficientnet_b1-c27df63c.pth),
    # swav (the SwAV release's swav_800ep_pretrain.pth.tar). Unset = that metric is skipped.
    alexnet_weights: str | None = path_field(None)
    inception_weights: str | None = path_field(None)
    effnet_weights: str | None = path_field(None)
    swav_weights: str | None = path_field(None)
    # The controls of docs/method.md, "Controls"
    shuffled_labels: bool = False  # pair each EEG trial with a random image of another class
    class_oracle: bool = False  # condition SD on "a photo of a <class>" instead of EEG
    class_names_path: str | None = path_field(None)  # wnid -> readable name (json); default: the wnid itself
    oracle_prompt: str = "a photo of a {}"
    # The class oracle conditions the BASE SD1.5 UNet (not the fine-tuned one) on CLIP text states.
    oracle_sd_path: str = path_field("pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt")
    # SD1.5's text encoder is the text tower of CLIP ViT-L/14: a transformers CLIP folder with a
    # tokenizer; None = clip_path.
    oracle_text_encoder_path: str | None = path_field(None, "path_or_hub")
    save_images: bool = True
    n_grid_trials: int = 8  # trials (rows: ground truth + samples) per grid image
    kid_subset_size: int = 50  # torchmetrics' default subset size, capped at the number of images


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


def _load_yaml(f: str | os.PathLike) -> tuple[Any, str]:
    path = resolve_path(f)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(loaded).__name__.removesuffix('Config').lower()}, "
                          "expected a mapping of config keys (key: value)")
    return loaded, str(path)


def _dotlist(item: str) -> tuple[Any, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    return OmegaConf.from_dotlist([item]), f"command-line override '{item}'"


def _merged(schema: type, layers: Sequence[tuple[Any, str]]) -> DictConfig:
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    for layer, source in layers:
        cfg = _merge(cfg, layer, source)
    return cfg


def build_config(
    schema: type,
    config_files: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
    default_file: str | os.PathLike | None = None,
) -> DictConfig:
    """Defaults of `schema`, then `default_file`, [the fidelity values], `config_files`, overrides.

    When the result says `fidelity: authors_code`, it is built again with the authors' code values
    of the deviations manifest inserted after `default_file`.
    """
    files = [_load_yaml(f) for f in ([default_file] if default_file is not None else [])]
    extra = [_load_yaml(f) for f in config_files] + [_dotlist(item) for item in overrides]
    cfg = _merged(schema, files + extra)
    fidelity = cfg.get("fidelity")
    if fidelity is not None:
        if fidelity not in fidelity_manifest.FIDELITIES:
            raise ConfigError(f"fidelity must be one of {', '.join(fidelity_manifest.FIDELITIES)}, got '{fidelity}'")
        if fidelity == "authors_code":
            values = OmegaConf.from_dotlist(fidelity_manifest.authors_code_values(schema.stage))
            cfg = _merged(schema, files + [(values, "fidelity=authors_code (dreamdiffusion.core.fidelity)")] + extra)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config cannot be resolved: {err}") from err
    check_values(plain)  # finite floats, seeds in range, device strings (dreamdiffusion.core.values)
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
        "--verbose shows third-party output (loading reports, Lightning's set-up lines); --debug shows tracebacks. "
        "Paths are relative to the repository root unless absolute.",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML merged over the stage defaults (repeatable, applied in order)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(list(argv) if argv is not None else sys.argv[1:])
    cfg = build_config(schema, args.config, args.overrides, default_file=default_file)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return None
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python data (for checkpoints, JSON and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def deviations(cfg: DictConfig) -> list[dict[str, Any]]:
    """The deviations manifest's entries that apply to a stage config (`fidelity.deviation_records`)."""
    return fidelity_manifest.deviation_records(OmegaConf.get_type(cfg).stage, cfg)


def save_config(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config to `<output_dir>/config.yaml` (atomically) and return that path.

    The deviations that apply to it head the file as comments, so the file still loads as a config.
    """
    out = Path(output_dir) / "config.yaml"
    lines = [d["line"] for d in deviations(cfg)] if hasattr(OmegaConf.get_type(cfg), "stage") else []
    header = ["# Deviations of this run from the paper and the authors' code (dreamdiffusion.core.fidelity):"]
    header += [f"#   - {line}" for line in lines] or ["#   - none"]
    atomic_write_text(out, "\n".join(header) + "\n" + OmegaConf.to_yaml(cfg, resolve=True))
    return out


def load_saved_config(schema: type, path: str | os.PathLike) -> DictConfig:
    """Reload a `config.yaml` written by `save_config`, validated against `schema`."""
    return build_config(schema, [path])


# ---------------------------------------------------------------------------------------------------
# The three stages: each one's schema, defaults file and entry script. Torch-free, so the grid runner
# and the demo can plan runs (and validate every row's settings) without importing a model. Each
# stage's runner lives with its layer (`train/stage1.py`, `train/stage2.py`, `evaluation/stage3.py`)
# and has `main(argv)`; the scripts in `code/` import those directly.


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    schema: type
    defaults: str  # the stage's defaults file, relative to the repository root
    script: str  # the entry script, relative to the repository root

    @property
    def defaults_path(self) -> Path:
        return REPO_ROOT / self.defaults

    @property
    def script_path(self) -> Path:
        return REPO_ROOT / self.script

    def build_config(self, config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
        """The config the script would run with these `--config` files and `key=value` overrides."""
        return build_config(self.schema, config_files, overrides, default_file=self.defaults_path)

    def parse_args(self, argv: Sequence[str] | None = None) -> DictConfig | None:
        """The command line `[--config FILE]... [--print-config] [key=value]...`; None after --print-config."""
        return parse_args(self.schema, argv, default_file=self.defaults_path, description=self.title,
                          prog=Path(self.script).name)

    def main(self, argv: Sequence[str] | None, runner: Callable[[DictConfig], Any]) -> Any:
        """The stage's command line: parse `argv`, set up logging, then `runner(cfg)` (the stage's run)."""
        cfg = self.parse_args(argv)
        if cfg is None:  # --print-config
            return None
        check_extras(cfg)  # an optional feature without its extra stops here, before any work
        configure_logging()
        return runner(cfg)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("stage1", "Stage 1: pretrain the EEG masked autoencoder on unpaired EEG", Stage1Config,
              "configs/stage1_pretrain.yaml", "code/stage1_pretrain_eeg.py"),
        Stage("stage2", "Stage 2: fine-tune Stable Diffusion 1.5 on EEG with CLIP alignment", Stage2Config,
              "configs/stage2_finetune.yaml", "code/stage2_finetune_sd.py"),
        Stage("stage3", "Stage 3: generate images from EEG and score them with the paper's protocol", Stage3Config,
              "configs/stage3_eval.yaml", "code/stage3_generate_eval.py"),
    )
}
