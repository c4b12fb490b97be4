"""Stage 3: generate images from the EEG of one split and score them with the paper's protocol.

`run_stage3(cfg)` (cfg: a `Stage3Config`) reads as its steps:
  1. check the config and every input file, before anything is written or loaded;
  2. generate (phase generate or all; `dreamdiffusion.evaluation.generation`): the model (our
     `save_pretrained` folder, an authors' generation checkpoint, or base SD1.5 for the class-name
     oracle) writes `images/test{i}-{k}.png` (k = 0 the ground truth) and one record per finished
     trial; resumable, sharded over `devices` x `num_nodes` processes (Lightning Fabric) or torchrun's;
  3. score (phase score or all, rank 0 once every process has finished;
     `dreamdiffusion.evaluation.scoring`): a folder of `test{i}-{k}.png` read back from disk - ours, or
     any method's in the authors' naming (`images_dir=`);
  4. report (`dreamdiffusion.evaluation.report`): `metrics.json` (protocol, summaries with bootstrap
     intervals, per-trial scores, deviations), `results.md` (the paper's table) and `grids/`.
`runtime.json` records the generation speed, the scoring time and the peak memory.
Controls (docs/method.md, "Controls"): `shuffled_labels` pairs each trial with a random image of
another class as its ground truth (and reference class); `class_oracle` ignores the EEG and
conditions the base SD1.5 UNet on the CLIP text states of "a photo of a <class name>".
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from dreamdiffusion.config import STAGES, resolved, save_config
from dreamdiffusion.core.devices import resolve_device
from dreamdiffusion.core.errors import CheckpointError, ConfigError, DataError
from dreamdiffusion.core.files import atomic_write_json, check_output_dir
from dreamdiffusion.core.launch import detect_launcher, launcher_devices
from dreamdiffusion.core.memory import GIB, peak_rss_bytes
from dreamdiffusion.core.precision import GENERATION_DTYPES, generation_dtype, set_tf32
from dreamdiffusion.core.run_folder import FolderClaim, owns_output_folder
from dreamdiffusion.dataset import DATA_README, paired_dataset
from dreamdiffusion.evaluation.report import write_report
from dreamdiffusion.evaluation.scoring import FEATURE_WEIGHTS, GENERATION_METRICS, KNOWN_METRICS, score_folder
from dreamdiffusion.models.classifier import check_n_way
from dreamdiffusion.models.clip_embedder import OPEN_CLIP_PREFIX, check_clip_path
from dreamdiffusion.models.sampling import NULL_CONDITIONS, SAMPLERS

logger = logging.getLogger(__name__)

PHASES = ("generate", "score", "all")
PRECISIONS = ("auto", *GENERATION_DTYPES)


def folder_claim(cfg: DictConfig) -> FolderClaim:
    """The output folder and the generation settings that own its images (a score-only run compares none)."""
    check_config(cfg)
    paths = resolved(cfg)
    settings = None
    if paths.phase in ("generate", "all"):
        # diffusers: only the generate phase needs it
        from dreamdiffusion.evaluation.generation import generation_settings

        settings = generation_settings(paths)
    return FolderClaim(Path(paths.output_dir), settings, bool(cfg.overwrite))


@owns_output_folder("stage3", folder_claim)  # refuses another stage's folder, other settings, a second run
def run_stage3(cfg: DictConfig, extra_networks: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run `cfg.phase`; returns the metrics.json dict (score/all on rank 0), the generation header
    (generate), or None on the other processes.

    extra_networks: metric networks given directly (fields of `scoring.MetricNetworks`: classifier,
    clip, lpips, fid_features, fid_logits), e.g. tiny ones in tests; they take precedence.
    """
    # 1. Check the config and inputs
    check_config(cfg)
    paths = resolved(cfg)
    validate_inputs(paths)
    set_tf32(paths.tf32)  # TF32 for the fp32 work (generation at fp32, scoring); generation.json records it
    out_dir = open_output_dir(cfg, paths)
    runtime: dict[str, Any] = {}  # what runtime.json gets: generation speed, scoring time

    # 2. Generate
    if paths.phase in ("generate", "all"):
        rank, generation_runtime = generate(paths, out_dir)
        runtime.update(generation_runtime)
        if rank != 0:
            return None
    if paths.phase == "generate":
        write_runtime(out_dir, runtime)
        return json.loads((out_dir / "generation.json").read_text())

    # 3. Score
    started = time.perf_counter()
    scores = score_folder(paths, out_dir, extra_networks or {}, paths.progress_bar)

    # 4. Report
    report = write_report(paths, out_dir, scores)
    runtime["score_seconds"] = round(time.perf_counter() - started, 2)
    write_runtime(out_dir, runtime)
    return report


def main(argv: Sequence[str] | None = None) -> Any:
    """`code/stage3_generate_eval.py`: the command line, then `run_stage3`."""
    return STAGES["stage3"].main(argv, run_stage3)


# ---------------------------------------------------------------------------------------------
# 1. Checks, before anything is written or loaded


def check_config(cfg: DictConfig) -> None:
    """Reject inconsistent stage-3 settings with a sentence naming the field."""
    checks = [
        (cfg.phase in PHASES, f"phase must be one of {', '.join(PHASES)}, got '{cfg.phase}'"),
        (cfg.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'"),
        (cfg.split in ("train", "val", "test"), f"split must be train, val or test, got '{cfg.split}'"),
        (cfg.max_trials is None or cfg.max_trials >= 1, f"max_trials must be >= 1 or null (every trial), got {cfg.max_trials}"),
        (not sorted(set(cfg.metrics) - set(KNOWN_METRICS)),
         f"unknown metric(s) {sorted(set(cfg.metrics) - set(KNOWN_METRICS))} in `metrics`; known: {', '.join(KNOWN_METRICS)}"),
        (cfg.null_condition in NULL_CONDITIONS, f"null_condition must be one of {NULL_CONDITIONS}, got '{cfg.null_condition}'"),
        (not (cfg.class_oracle and cfg.shuffled_labels),
         "class_oracle and shuffled_labels are separate controls: run them one at a time"),
        (cfg.n_way_trials is None or cfg.n_way_trials >= 1, f"n_way_trials must be >= 1 or null (exact), got {cfg.n_way_trials}"),
        (1 <= cfg.top_k <= cfg.n_way, f"top_k must be in [1, n_way={cfg.n_way}], got {cfg.top_k}"),
        (cfg.num_nodes >= 1, f"num_nodes must be >= 1, got {cfg.num_nodes}"),
        (not isinstance(cfg.devices, int) or cfg.devices >= 1 or cfg.devices == -1,
         f"devices must be >= 1, -1 (all), a list of ids or \"auto\", got {cfg.devices}"),
        (cfg.rank_timeout_s > 0, f"rank_timeout_s must be > 0, got {cfg.rank_timeout_s}"),
        (cfg.bootstrap_samples >= 1, f"bootstrap_samples must be >= 1 (the resamples of each 95% interval), got "
                                     f"{cfg.bootstrap_samples}"),
        (cfg.kid_subset_size >= 1, f"kid_subset_size must be >= 1, got {cfg.kid_subset_size}"),
        (cfg.guidance_scale >= 0, f"guidance_scale must be >= 0 (1 = no guidance), got {cfg.guidance_scale}"),
        (0 <= cfg.eta <= 1, f"eta must lie in [0, 1], got {cfg.eta}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got '{cfg.precision}'"),
        (cfg.save_images or not set(cfg.metrics) & set(GENERATION_METRICS) or cfg.phase == "score",
         f"save_images=false writes no images, but metrics {sorted(set(cfg.metrics) & set(GENERATION_METRICS))} "
         "need them: keep save_images=true or use metrics=[retrieval]"),
    ]
    for name in ("retrieval_ways", "retrieval_top_ks"):
        checks.append((all(int(v) >= 1 for v in cfg[name]), f"{name} must hold integers >= 1, got {list(cfg[name])}"))
    for name in ("num_images_per_eeg", "batch_size", "n_grid_trials", "num_inference_steps"):
        checks.append((cfg[name] is None or cfg[name] >= 1, f"{name} must be >= 1, got {cfg[name]}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    launcher_devices(cfg.devices, cfg.num_nodes)  # a contradiction with torchrun's / SLURM's counts


def validate_inputs(cfg: DictConfig) -> None:
    """Every file and model the phases will read (cfg with resolved paths), before anything is
    written or loaded: a missing one is an error now, not after hours of generation."""
    check_output_dir(cfg.output_dir)
    if cfg.phase in ("generate", "all"):
        inputs = [("data.eeg_path", cfg.data.eeg_path), ("data.splits_path", cfg.data.splits_path)] \
            if cfg.data.kind == "imagenet_eeg" else [("data.things_eeg2.eeg_dir", cfg.data.things_eeg2.eeg_dir)]
        for key, path in inputs:
            if not Path(path).exists():
                raise DataError(f"{key}={path} not found ({DATA_README} explains where it goes)")
        if cfg.data.image_dir is None or not Path(cfg.data.image_dir).is_dir():
            raise DataError(f"stage 3 needs the ground-truth images: data.image_dir={cfg.data.image_dir} is not a folder")
        generator = ("oracle_sd_path", cfg.oracle_sd_path) if cfg.class_oracle else ("model", cfg.model)
        if not Path(generator[1]).exists():
            raise ConfigError(f"{generator[0]}={generator[1]} not found (expected a stage-2 model folder, the authors' "
                              "checkpoint.pth, or for the oracle an SD1.5 file or folder)")
        if cfg.class_oracle:
            check_clip_path(cfg.oracle_text_encoder_path or cfg.clip_path)
    elif cfg.images_dir is not None and not Path(cfg.images_dir).is_dir():
        raise DataError(f"images_dir={cfg.images_dir} is not a folder (expected test{{i}}-{{k}}.png files)")
    metrics = set(cfg.metrics)
    if "n_way" in metrics:
        check_n_way(cfg.classifier, cfg.classifier_weights, cfg.n_way, cfg.top_k)
    if metrics & {"clip_similarity", "retrieval", "clip_2way"} and cfg.clip_path and not str(cfg.clip_path).startswith(OPEN_CLIP_PREFIX):
        check_clip_path(cfg.clip_path)
    for metric, key in (("lpips", "lpips_weights"), ("fid", "fid_feature_weights"), *FEATURE_WEIGHTS.items()):
        if metric in metrics and cfg[key] is not None and not Path(cfg[key]).is_file():
            raise CheckpointError(f"{key}={cfg[key]} not found (see pretrains/README.md)")


def open_output_dir(cfg: DictConfig, paths: DictConfig) -> Path:
    """`output_dir` with the run's config.yaml (cfg as given, paths resolved). The launching process
    reads the split's data first (generate phases): a bad file stops the run before anything is
    written. Every process loads the data again when it generates."""
    out_dir = Path(paths.output_dir)
    if not is_launcher_rank_zero():
        return out_dir
    if paths.phase in ("generate", "all"):
        paired_dataset(paths.data, paths.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# 2. The generate phase: the processes, their device and precision


def generate(cfg: DictConfig, out_dir: Path) -> tuple[int, dict[str, Any]]:
    """The generate phase (cfg with resolved paths): the processes are launched and each generates its
    trials. Returns (this process's rank, its runtime figures)."""
    # diffusers: only the generate phase needs it
    from dreamdiffusion.evaluation.generation import generate_images, prepare_run

    if is_launcher_rank_zero():  # before the other processes start: they find the settings agreed
        prepare_run(cfg, out_dir)
    rank, world, device = launch(cfg)
    dtype = generation_dtype(cfg.precision, device)  # auto: bf16 where the GPU has it natively, else fp32
    return rank, generate_images(cfg, out_dir, rank, world, device, dtype, cfg.progress_bar)


def is_launcher_rank_zero() -> bool:
    """True in the process that launches the others (or runs alone), before any launch."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def launch(cfg: DictConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; several processes are started through Fabric, or
    by torchrun / SLURM, whose process counts are taken (core/launch.py). Fabric's refusal of a setting
    is a ConfigError naming the settings."""
    if not _multi_process(cfg):
        return 0, 1, resolve_device(cfg.device, "device")
    devices, num_nodes = launcher_devices(cfg.devices, cfg.num_nodes)
    accelerator = "cpu" if cfg.device == "cpu" else ("cuda" if str(cfg.device).startswith("cuda") else "auto")
    strategy = DDPStrategy(timeout=timedelta(seconds=cfg.rank_timeout_s)) if cfg.strategy == "ddp" else cfg.strategy
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:
        raise ConfigError(f"invalid launch settings (device={cfg.device}, devices={devices}, num_nodes={num_nodes}, "
                          f"strategy={cfg.strategy}): {str(err).splitlines()[0]}") from err
    fabric.launch()
    return fabric.global_rank, fabric.world_size, fabric.device


def _multi_process(cfg: DictConfig) -> bool:
    devices = cfg.devices
    many = (isinstance(devices, int) and devices > 1) or (not isinstance(devices, int)) or cfg.num_nodes > 1
    launcher = detect_launcher()  # torchrun or srun started several processes
    return many or (launcher is not None and launcher.devices * launcher.num_nodes > 1)


# ---------------------------------------------------------------------------------------------
# runtime.json


def write_runtime(out_dir: Path, runtime: dict[str, Any]) -> None:
    """runtime.json: this run's figures over an earlier run's (a score-only run keeps the generate
    phase's), and the peak memory over the phases."""
    path = out_dir / "runtime.json"
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        earlier = {}
    peak = max(round(peak_rss_bytes() / GIB, 3), earlier.get("peak_rss_gib", 0))  # over the phases run here
    atomic_write_json(path, {**earlier, **runtime, "peak_rss_gib": peak})
