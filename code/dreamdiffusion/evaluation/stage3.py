"""Stage 3: generate images from the EEG of one split and score them with the paper's protocol.

`run_stage3(cfg)` (cfg: a `Stage3Config`) runs `phase`:
  - generate (`dreamdiffusion.evaluation.generation`): the model (our `save_pretrained` folder, an authors'
    generation checkpoint, or base SD1.5 for the class-name oracle) writes `images/test{i}-{k}.png`
    (k = 0 the ground truth) and one record per finished trial; resumable, sharded over
    `devices` x `num_nodes` processes (Lightning Fabric) or torchrun's;
  - score (`dreamdiffusion.evaluation.scoring`): reads a folder of `test{i}-{k}.png` back from disk - ours, or any
    method's in the authors' naming (`images_dir=`) - and writes `metrics.json` (protocol, summaries
    with bootstrap intervals, per-trial scores, deviations) and `results.md` (the paper's table);
  - all: both, rank 0 scoring once every process has finished.
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

import numpy as np
import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from dreamdiffusion.config import STAGES, resolved, save_config, to_container
from dreamdiffusion.core import fidelity
from dreamdiffusion.core.errors import CheckpointError, ConfigError, DataError
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text, check_output_dir
from dreamdiffusion.core.memory import GIB, peak_rss_bytes, resolve_device
from dreamdiffusion.dataset import DATA_README, paired_dataset
from dreamdiffusion.evaluation import generation as G
from dreamdiffusion.evaluation import metrics as M
from dreamdiffusion.evaluation.generation import training_deviations
from dreamdiffusion.evaluation.recon import FEATURE_METRICS, LOWER_IS_BETTER, RECON_METRICS, FeatureNetwork
from dreamdiffusion.evaluation.scoring import (
    GENERATION_METRICS,
    KNOWN_METRICS,
    MetricNetworks,
    Scorer,
    load_rgb,
    read_image_folder,
)
from dreamdiffusion.models.classifier import check_n_way, load_classifier
from dreamdiffusion.models.clip_embedder import OPEN_CLIP_PREFIX, check_clip_path, load_clip_image_encoder
from dreamdiffusion.models.pipeline import DEFAULT_STEPS, NULL_CONDITIONS, SAMPLERS, DreamDiffusionPipeline

logger = logging.getLogger(__name__)

PHASES = ("generate", "score", "all")
# The recon feature metrics and the config field of each one's weights file.
FEATURE_WEIGHTS = {"alexnet2": "alexnet_weights", "alexnet5": "alexnet_weights", "inception": "inception_weights",
                   "effnet": "effnet_weights", "swav": "swav_weights"}
_runtime: dict[str, Any] = {}  # what runtime.json gets: generation speed, peak memory
# Stage-3 deviations that describe how images were generated (not listed for a foreign folder).
_GENERATION_KEYS = {"sampler", "num_inference_steps", "num_images_per_eeg", "guidance_scale", "split",
                    "data.image_size", "data.subject", "data.split_index", "data.time_window", "data.n_times"}


# ---------------------------------------------------------------------------------------------
# Checks


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


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "32": torch.float32, "fp16": torch.float16, "16": torch.float16,
             "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in table:
        raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got '{precision}'")
    return table[precision]


# ---------------------------------------------------------------------------------------------
# The generate phase


def _multi_process(cfg: DictConfig) -> bool:
    devices = cfg.devices
    many = (isinstance(devices, int) and devices > 1) or (not isinstance(devices, int)) or cfg.num_nodes > 1
    return many or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch(cfg: DictConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; several processes are started through Fabric."""
    if not _multi_process(cfg):
        return 0, 1, resolve_device(cfg.device, "device")


    accelerator = "cpu" if cfg.device == "cpu" else ("cuda" if str(cfg.device).startswith("cuda") else "auto")
    strategy = DDPStrategy(timeout=timedelta(seconds=cfg.rank_timeout_s)) if cfg.strategy == "ddp" else cfg.strategy
    fabric = Fabric(accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy)
    fabric.launch()
    return fabric.global_rank, fabric.world_size, fabric.device


def _is_launcher_rank_zero() -> bool:
    """True in the process that launches the others (or runs alone), before any launch."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def run_generation(cfg: DictConfig, out_dir: Path, progress: bool) -> int:
    """The generate phase (cfg with resolved paths); returns this process's rank."""

    settings = G.generation_settings(cfg)
    if _is_launcher_rank_zero():  # before the other processes start: they find the settings agreed
        G.prepare_output(out_dir, settings, cfg.overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "generation.json", {"settings": settings})
    rank, world, device = _launch(cfg)
    dtype = _dtype(cfg.precision, device)
    model, model_info, selection = G.load_generator(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    pipe = DreamDiffusionPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    dataset = paired_dataset(_data_at(cfg, model.image_size), cfg.split)
    if not cfg.class_oracle:
        _check_eeg_fits(model, cfg, dataset)
    n_trials = len(dataset) if cfg.max_trials is None else min(cfg.max_trials, len(dataset))
    references = G.shuffled_references(dataset.labels, cfg.seed) if cfg.shuffled_labels else list(range(len(dataset)))
    notes: list[str] = []
    contexts = G.oracle_contexts(cfg, model, dataset.wnids, device, notes) if cfg.class_oracle else None
    steps = cfg.num_inference_steps or DEFAULT_STEPS[cfg.sampler]
    sampling = dict(num_images_per_eeg=cfg.num_images_per_eeg, num_inference_steps=steps, sampler=cfg.sampler,
                    eta=cfg.eta, guidance_scale=cfg.guidance_scale, null_condition=cfg.null_condition)
    job = G.GenerationJob(cfg, out_dir, model, pipe, dataset, references, contexts, sampling)
    started = time.perf_counter()
    generated = job.run(G.batches_of_rank(n_trials, cfg.batch_size, rank, world), progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    calls = steps + 1 if cfg.sampler == "plms" else steps  # PLMS: one extra call in its first step
    images = generated * max(cfg.num_images_per_eeg, 1)
    _runtime.update({"generation_seconds": round(seconds, 2), "trials_generated": generated,
                     "unet_calls_per_image": calls, "device": str(device),
                     "seconds_per_step": round(seconds / (images * calls), 4) if generated else None})
    if device.type == "cuda":
        _runtime["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if rank == 0:
        if world > 1:
            G.wait_for_all(out_dir, n_trials, cfg.rank_timeout_s, progress=progress)
        header = G.generation_header(cfg, model, model_info, selection, n_trials, len(dataset), dtype, device)
        atomic_write_json(out_dir / "generation.json", {**header, "notes": notes, "world_size": world})
        G.write_jsonl(out_dir, n_trials)
    return rank


def _check_eeg_fits(model, cfg: DictConfig, dataset) -> None:
    expected = tuple(model.conditioner.encoder.config[k] for k in ("n_channels", "n_times"))
    if expected != (dataset.n_channels, dataset.n_times):
        fix = ("set data.n_times, or use the EEG file the model was trained on" if cfg.data.kind == "imagenet_eeg" else
               f"set data.things_eeg2.n_channels={expected[0]} data.things_eeg2.n_times={expected[1]} (null = the "
               "file's native size; configs/presets/things_eeg2_native.yaml)")
        raise ConfigError(f"the model's EEG encoder ({cfg.model}) expects [{expected[0]}, {expected[1]}] inputs but the "
                          f"{cfg.split} EEG is [{dataset.n_channels}, {dataset.n_times}]: {fix}")


def _data_at(cfg: DictConfig, image_size: int) -> DictConfig:

    data = OmegaConf.to_container(cfg.data)
    return OmegaConf.create({**data, "image_size": image_size})


# ---------------------------------------------------------------------------------------------
# The score phase


def load_metric_networks(cfg: DictConfig, device: torch.device, metrics: list[str], skipped: dict[str, str],
                         given: dict[str, Any]) -> MetricNetworks:
    """The networks of `metrics`: those `given`, the rest from local files (cfg with resolved paths).
    A metric whose optional weights are not configured is recorded in `skipped` with the reason."""

    nets = MetricNetworks(**{k: v for k, v in given.items() if k in MetricNetworks.__dataclass_fields__})
    wanted = [m for m in metrics if m not in skipped]
    if "n_way" in wanted and nets.classifier is None:
        nets.classifier = load_classifier(cfg.classifier, cfg.classifier_weights).to(device)
    if {"clip_similarity", "retrieval", "clip_2way"} & set(wanted) and nets.clip is None:
        if cfg.clip_path is None:
            skipped.update({m: "no clip_path given" for m in ("clip_similarity", "retrieval", "clip_2way") if m in wanted})
        else:
            nets.clip = load_clip_image_encoder(cfg.clip_path, cfg.clip_weights).to(device)
    if "lpips" in wanted and nets.lpips is None:
        if cfg.lpips_weights is None:
            skipped["lpips"] = f"no lpips_weights given (torchvision's {M.ALEXNET_FILE})"
        else:
            nets.lpips = M.LPIPS(cfg.lpips_weights).to(device)
    if "fid" in wanted and nets.fid_features is None:
        if cfg.fid_feature_weights is None:
            skipped["fid"] = "no fid_feature_weights given (weights-inception-2015-12-05-6726825d.pth)"
        else:
            pool, logits = M.inception_feature_modules(cfg.fid_feature_weights)
            nets.fid_features, nets.fid_logits = pool.to(device), logits.to(device)
    _load_feature_networks(cfg, device, wanted, skipped, nets)
    return nets


def _load_feature_networks(cfg: DictConfig, device: torch.device, wanted: list[str], skipped: dict[str, str],
                           nets: MetricNetworks) -> None:

    nets.features = dict(nets.features or {})
    for metric in [m for m in wanted if m in FEATURE_METRICS and m not in nets.features]:
        key = FEATURE_WEIGHTS[metric]
        if cfg[key] is None:
            skipped[metric] = f"no {key} given ({FEATURE_METRICS[metric].weights_file})"
        else:
            nets.features[metric] = FeatureNetwork(metric, cfg[key]).to(device)


def _read_generation(folder: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """(generation.json, the trials' records) of the run that wrote `folder`, or (None, None)."""
    root = folder.parent
    header_file, jsonl = root / "generation.json", root / "generation.jsonl"
    if not header_file.is_file() or not jsonl.is_file():
        return None, None
    try:
        header = json.loads(header_file.read_text())
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"{root}: generation.json / generation.jsonl are damaged ({err})") from err
    return header, records


def _check_classifier(cfg: DictConfig, nets: MetricNetworks) -> None:
    n_classes = getattr(nets.classifier, "n_classes", None)
    if nets.classifier is not None and n_classes is not None and not cfg.top_k <= cfg.n_way <= n_classes:
        raise ConfigError(f"n_way={cfg.n_way}, top_k={cfg.top_k}: need top_k <= n_way <= the classifier's "
                          f"{n_classes} classes")


def _retrieval_inputs(cfg: DictConfig, records, root: Path, skipped: dict[str, str], nets: MetricNetworks):
    """Per trial (EEG embedding, reference image path, id) for the retrieval score, or None (skipped)."""
    if "retrieval" not in cfg.metrics or "retrieval" in skipped:
        return None
    if records is None or any(r.get("eeg_embedding") is None for r in records):
        skipped["retrieval"] = ("needs the model's EEG embeddings: this folder has no generation records "
                                "with them (a folder of images only, or the class-name oracle)")
        return None
    n_images = len({r["reference_image"] for r in records})
    if n_images < 2:
        skipped["retrieval"] = f"needs trials of at least 2 distinct images; this run has {n_images}"
        return None
    clip_dim = nets.clip.projection_dim
    eeg = np.stack([np.load(root / "records" / r["eeg_embedding"]) for r in records])
    if eeg.shape[1] != clip_dim:
        raise ConfigError(
            f"metric 'retrieval' compares the model's CLIP head ({eeg.shape[1]} values) with the image "
            f"embeddings of the CLIP at clip_path={cfg.clip_path} ({clip_dim} values): use the CLIP the "
            "model was trained against, or drop 'retrieval' from metrics")
    return torch.from_numpy(eeg), [r["reference_path"] for r in records], [r["reference_image"] for r in records]


def score_folder(cfg: DictConfig, out_dir: Path, extra_networks: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The score phase (cfg with resolved paths): metrics.json and results.md in `out_dir`."""
    images_dir = Path(cfg.images_dir) if cfg.images_dir else out_dir / "images"
    header, records = _read_generation(images_dir)
    image_metrics = [m for m in cfg.metrics if m in GENERATION_METRICS]
    folder = read_image_folder(images_dir) if image_metrics else None
    if folder is not None and records is not None and len(records) != folder.n_trials:
        raise DataError(f"{images_dir} holds {folder.n_trials} trials but {images_dir.parent / 'generation.jsonl'} "
                        f"records {len(records)}: was the folder changed after generation?")
    skipped: dict[str, str] = {}
    device = resolve_device(cfg.device, "device")
    nets = load_metric_networks(cfg, device, list(cfg.metrics), skipped, extra_networks)
    _check_classifier(cfg, nets)
    retrieval = _retrieval_inputs(cfg, records, images_dir.parent, skipped, nets)
    scorer = Scorer(cfg.metrics, nets, n_way=cfg.n_way, top_k=cfg.top_k, n_way_trials=cfg.n_way_trials,
                    seed=cfg.seed, kid_subset_size=cfg.kid_subset_size, skipped=skipped,
                    retrieval_ways=cfg.retrieval_ways, retrieval_top_ks=cfg.retrieval_top_ks)
    clip_from_originals = _score_images(scorer, folder, records, cfg, progress)
    if retrieval is not None:
        eeg, paths, ids = retrieval
        # clip_similarity already embedded the same original files, trial by trial
        reused = clip_from_originals and len(scorer.reference_embeddings) > 0
        images = torch.cat(scorer.reference_embeddings) if reused else nets.clip.embed([load_rgb(p) for p in paths])
        scorer.add_retrieval(eeg, images, ids)
    results = scorer.compute(cfg.bootstrap_samples, cfg.seed)
    skipped.update(scorer.late_skipped)
    n_trials = folder.n_trials if folder is not None else len(records)
    report = _report(cfg, header, records, folder, scorer, results, skipped, n_trials, clip_from_originals)
    atomic_write_json(out_dir / "metrics.json", report)
    atomic_write_text(out_dir / "results.md", results_markdown(report))
    if folder is not None:
        write_grids(folder, out_dir / "grids", cfg.n_grid_trials)
    logger.info("stage 3: wrote %s and %s", out_dir / "metrics.json", out_dir / "results.md")
    return report


def _score_images(scorer: Scorer, folder, records, cfg: DictConfig, progress: bool) -> bool:
    """Feed the folder's images to the scorer in batches of trials; True when CLIP compared with the
    original image files (our own records), False when with the k = 0 PNGs."""
    if folder is None:
        return False
    originals = records is not None and all(Path(r["reference_path"]).is_file() for r in records)
    bar = tqdm(total=folder.n_trials, desc="stage 3: score", unit="trial", disable=not progress)
    for start in range(0, folder.n_trials, cfg.batch_size):
        trials = range(start, min(start + cfg.batch_size, folder.n_trials))
        refs = [load_rgb(folder.path(i, 0)) for i in trials]
        gens = [[load_rgb(folder.path(i, k)) for k in range(1, folder.n_slots + 1)] for i in trials]
        clip_refs = [load_rgb(records[i]["reference_path"]) for i in trials] if originals else None
        ids = [records[i]["reference_image"] for i in trials] if records is not None else None
        scorer.add_trials(refs, gens, clip_refs, ids)
        bar.update(len(trials))
    bar.close()
    return originals


def write_grids(folder, out_dir: Path, rows_per_grid: int) -> None:
    """`grids/grid-NNN.png`: `rows_per_grid` trials each, one row per trial (ground truth, then the samples)."""

    for n, start in enumerate(range(0, folder.n_trials, rows_per_grid)):
        tiles = [np.asarray(load_rgb(folder.path(i, k)))
                 for i in range(start, min(start + rows_per_grid, folder.n_trials)) for k in range(folder.n_slots + 1)]
        grid = make_grid(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2), nrow=folder.n_slots + 1,
                         padding=2, pad_value=255)
        with atomic_path(out_dir / f"grid-{n:03d}.png") as tmp:
            Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------
# The report


def _deviations(cfg: DictConfig, generated_here: bool) -> list[dict[str, Any]]:
    out = []
    for d in fidelity.applicable("stage3", cfg):
        if generated_here or d.key not in _GENERATION_KEYS:
            out.append(d.record(cfg))
    return out


def _protocol(cfg: DictConfig, header: dict | None, folder, n_trials: int, clip_from_originals: bool,
              scorer: Scorer) -> dict[str, Any]:
    settings = (header or {}).get("settings", {})
    method = ("class-name oracle: base SD1.5 on \"" + cfg.oracle_prompt.format("<class>") + "\""
              if settings.get("class_oracle") else "DreamDiffusion" if header else f"images of {cfg.images_dir}")
    if settings.get("shuffled_labels"):
        method += " + shuffled-labels control"
    n_way_mode = ("exact expectation (closed form)" if cfg.n_way_trials is None else
                  f"sampled: {cfg.n_way_trials} draws of {cfg.n_way - 1} distractors per image, seed {cfg.seed}")
    protocol = {"method": method, "images": str(folder.root) if folder is not None else None, "n_trials": n_trials,
                "num_images_per_eeg": folder.n_slots if folder is not None else 0,
                "n_generated_images": n_trials * folder.n_slots if folder is not None else 0}
    if header:
        protocol.update({k: header[k] for k in ("model", "checkpoint_selection", "latent_scale", "image_size",
                                                "precision", "device", "versions") if k in header})
        things = settings.get("data.kind") == "things_eeg2"
        split = (f"{settings.get('split')} of THINGS-EEG2 ({settings['data.things_eeg2']['eeg_dir']})" if things else
                 f"{settings.get('split')} (split_index {settings.get('data.split_index')} of "
                 f"{settings.get('data.splits_path')})")
        protocol.update({"split": split, "subject": settings.get("data.subject"),
                         "eeg_path": None if things else settings.get("data.eeg_path"), "sampler": settings.get("sampler"),
                         "num_inference_steps": settings.get("num_inference_steps"), "eta": settings.get("eta"),
                         "guidance_scale": settings.get("guidance_scale"), "seed": settings.get("seed"),
                         "seeding": "trial i: torch.Generator().manual_seed(seed + i) -> one CPU seed per sample slot"})
    else:
        protocol["generation"] = "unknown: a folder scored without its generation records (generation.json)"
    protocol.update({
        "scored_from": "the uint8 PNG files on disk",
        "classifier": f"{cfg.classifier} (weights: {cfg.classifier_weights})" if "n_way" in scorer.metrics else None,
        "n_classes": getattr(scorer.nets.classifier, "n_classes", None),
        "reference_class": "the classifier's arg-max on the ground-truth image (k = 0)",
        "n_way": cfg.n_way, "top_k": cfg.top_k, "n_way_estimate": n_way_mode,
        "ties": "a distractor scoring exactly the reference's probability counts as beating it",
        "clip_reference": ("the original image files (the view stage 2 aligns to)" if clip_from_originals
                           else "the k = 0 PNGs"),
        "bootstrap_samples": cfg.bootstrap_samples, "bootstrap_seed": cfg.seed,
    })
    return protocol


def _trial_rows(records, folder, scorer: Scorer, n_trials: int) -> list[dict[str, Any]]:
    rows = [dict(records[i]) if records is not None else {"index": i} for i in range(n_trials)]
    names = getattr(scorer.nets.classifier, "class_names", None)
    for row, ref in zip(rows, scorer.reference_class):
        row["reference_class"] = ref
        if names:
            row["reference_class_name"] = names[ref]
    for name, values in scorer.per_image().items():
        for t, row in enumerate(rows):
            row[name] = values[t].tolist()
    if scorer.retrieval_scores is not None:
        for row, value in zip(rows, scorer.retrieval_scores):
            row["retrieval"] = float(value)
    return rows


def _report(cfg, header, records, folder, scorer, results, skipped, n_trials, clip_from_originals) -> dict[str, Any]:

    model = (header or {}).get("settings", {}).get("model")
    return {
        "protocol": _protocol(cfg, header, folder, n_trials, clip_from_originals, scorer),
        "metrics": results,
        "skipped": skipped,
        "notes": (header or {}).get("notes", []) + ([f"{folder.n_ignored} file(s) of {folder.root} not named "
                                                      "test{i}-{k}.png were ignored"] if folder and folder.n_ignored else []),
        "deviations": _deviations(cfg, header is not None),
        "training_deviations": training_deviations(Path(model)) if model and not header["settings"].get("class_oracle")
        else None,
        "config": to_container(cfg),
        "trials": _trial_rows(records, folder, scorer, n_trials),
    }


def _fmt(summary: dict | None, key: str = "mean", percent: bool = False, digits: int = 3) -> str:
    if summary is None:
        return "–"
    value, ci = summary[key], summary.get(f"{key}_ci95")
    scale, unit = (100, "%") if percent else (1, "")
    d = 1 if percent else digits
    text = f"{value * scale:.{d}f}{unit}"
    if ci is not None and ci[0] != ci[1]:
        text += f" [{ci[0] * scale:.{d}f}, {ci[1] * scale:.{d}f}]"
    return text


# Published zero-shot 200-way retrieval on THINGS-EEG2 (intra-subject, mean of the 10 subjects, the
# 80 test repetitions averaged): (method, top-1, top-5).
THINGS_PUBLISHED = (("NICE (Song et al., ICLR 2024)", 0.156, 0.428), ("UBP (CVPR 2025)", 0.509, 0.797))
THINGS_NOT_TRANSCRIBED = "ATM (Li et al., NeurIPS 2024): not transcribed here (see its paper's table)"


def _things_protocol(config: dict) -> str | None:
    data = config.get("data", {})
    if data.get("kind") != "things_eeg2":
        return None
    t = data["things_eeg2"]
    if t.get("leave_out") is not None:
        who = f"inter-subject: trained on the other subjects, tested on subject {t['leave_out']}"
    elif data.get("subject") == 0:
        who = "all subjects pooled (train and test)"
    else:
        who = f"intra-subject (subject {data.get('subject')})"
    reps = "averaged" if t.get("average_repetitions_test") else "one trial per repetition"
    return (f"THINGS-EEG2 zero-shot: {who}; test repetitions {reps}; candidates = the test split's distinct images "
            f"(unseen concepts); image encoder: {config.get('clip_path')}")


def _retrieval_section(report: dict) -> list[str]:
    table = report["metrics"].get("retrieval_table")
    if not table:
        return []
    ks = sorted({int(k[3:]) for row in table.values() for k in row})
    lines = ["", "## EEG→image retrieval", "", "| n-way | " + " | ".join(f"top-{k}" for k in ks) + " | chance (top-1) |",
             "|---|" + "---|" * (len(ks) + 1)]
    for way, row in sorted(table.items(), key=lambda kv: int(kv[0].split("-")[0])):
        cells = [_fmt(row.get(f"top{k}"), percent=True) for k in ks]
        lines.append(f"| {way} | " + " | ".join(cells) + f" | {row['top1']['chance'] * 100:.1f}% |")
    protocol = _things_protocol(report["config"])
    if protocol:
        lines += ["", protocol + ".", "", "Published 200-way zero-shot figures (top-1 / top-5, intra-subject, mean of "
                  "10 subjects; real data - ours above are for this run's data):", ""]
        lines += [f"- {name}: {t1 * 100:.1f}% / {t5 * 100:.1f}%" for name, t1, t5 in THINGS_PUBLISHED]
        lines.append(f"- {THINGS_NOT_TRANSCRIBED}")
    return lines


def _recon_section(r: dict) -> list[str]:

    names = [m for m in RECON_METRICS if m in r]
    if not names:
        return []
    lines = ["", "## Reconstruction metrics (the brain-to-image literature's)", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join(_fmt(r[m], percent=m.startswith(("alexnet", "inception", "clip_2way"))) for m in names) + " |",
             "", "Two-way identification (alexnet2/5, inception, clip_2way; chance 50%) compares each generated image "
             "with every ground truth of its sample slot; " + ", ".join(sorted(LOWER_IS_BETTER & set(names)) or ["–"])
             + ": correlation distance, lower is better."]
    return lines


def results_markdown(report: dict) -> str:
    """The paper-style table, the protocol and the deviations, from a metrics.json dict."""
    p, r = report["protocol"], report["metrics"]
    n_way, k, slots = p["n_way"], p["top_k"], p["num_images_per_eeg"]
    fid = r.get("fid")
    head = (f"| Method | {n_way}-way top-{k} (mean over {slots} slots) | {n_way}-way top-{k} (best slot) | IS | FID | "
            "SSIM | PCC | MSE | LPIPS | CLIP sim. | EEG→image retrieval |")
    row = (f"| {p['method']} | {_fmt(r.get('n_way'), percent=True)} | {_fmt(r.get('n_way'), 'best_slot', percent=True)} | "
           f"{'–' if fid is None else format(fid['is_mean'], '.2f')} | {'–' if fid is None else format(fid['fid'], '.1f')} | "
           f"{_fmt(r.get('ssim'))} | {_fmt(r.get('pcc'))} | {_fmt(r.get('mse'), digits=4)} | {_fmt(r.get('lpips'))} | "
           f"{_fmt(r.get('clip_similarity'))} | {_fmt(r.get('retrieval'), percent=True)} |")
    lines = [f"# Stage 3 results: {p['method']}", "", head, "|" + "---|" * 11, row]
    if n_way == 50 and k == 1:
        lines.append("| DreamDiffusion, as reported in the paper (subject 4) | 45.8% | – | – | – | – | – | – | – | – | – |")
    lines += ["", "Means over trials; brackets: bootstrap 95% interval over trials "
              f"({p['bootstrap_samples']} resamples, seed {p['bootstrap_seed']}). \"Best slot\" is the best of the "
              f"{slots} per-slot means (the paper's \"max\"; the lowest for MSE, LPIPS), an optimistic selection.", ""]
    if "n_way" in r:
        per_slot = ", ".join(f"{v * 100:.1f}%" for v in r["n_way"]["per_slot"])
        lines.append(f"Per-slot {n_way}-way top-{k}: {per_slot}. Chance: {k / n_way * 100:.1f}%. Classifier top-1 "
                     f"agreement with the reference class (1 of {p.get('n_classes', '?')}): "
                     f"{_fmt(r.get('top1_agreement'), percent=True)}.")
    if "retrieval" in r:
        lines.append(f"EEG→image retrieval: {r['retrieval']['n_way']}-way among the split's distinct images, chance "
                     f"{r['retrieval']['chance'] * 100:.1f}% (the CLIP head's embedding vs CLIP image embeddings).")
    lines += _retrieval_section(report) + _recon_section(r)
    if fid is not None:
        lines.append(f"FID/IS/KID over {fid['n_generated']} generated vs {fid['n_reference']} ground-truth images "
                     f"(KID {fid['kid_mean']:.4f} ± {fid['kid_std']:.4f}); with few images these are strongly biased "
                     "and only comparable at equal counts.")
    lines += ["", "## Protocol", ""] + [f"- **{key}**: {value}" for key, value in p.items() if key != "method"]
    if report.get("skipped"):
        lines += ["", "## Skipped metrics", ""] + [f"- **{n}**: {why}" for n, why in report["skipped"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", fidelity.markdown_section([d["line"] for d in report["deviations"]]).rstrip()]
    if report.get("training_deviations"):
        lines += ["", fidelity.markdown_section([d["line"] for d in report["training_deviations"]],
                                                "Deviations of the model's training (stage 2)").rstrip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The stage


def run_stage3(cfg: DictConfig, extra_networks: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run `cfg.phase`; returns the metrics.json dict (score/all on rank 0), the generation header
    (generate), or None on the other processes.

    extra_networks: metric networks given directly (fields of `scoring.MetricNetworks`: classifier,
    clip, lpips, fid_features, fid_logits), e.g. tiny ones in tests; they take precedence.
    """
    check_config(cfg)
    paths = resolved(cfg)
    out_dir = Path(paths.output_dir)
    validate_inputs(paths)
    if paths.phase in ("generate", "all") and _is_launcher_rank_zero():

        # the data's content is checked here, before anything is written (each process loads it again)
        paired_dataset(paths.data, paths.split)
    if _is_launcher_rank_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir)
    _runtime.clear()
    if paths.phase in ("generate", "all"):
        rank = run_generation(paths, out_dir, paths.progress_bar)
        if rank != 0:
            return None
    if paths.phase == "generate":
        _write_runtime(out_dir)
        return json.loads((out_dir / "generation.json").read_text())
    started = time.perf_counter()
    report = score_folder(paths, out_dir, extra_networks or {}, paths.progress_bar)
    _runtime["score_seconds"] = round(time.perf_counter() - started, 2)
    _write_runtime(out_dir)
    return report


def _write_runtime(out_dir: Path) -> None:

    path = out_dir / "runtime.json"
    try:  # a score-only run keeps the generate phase's figures
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        earlier = {}
    peak = max(round(peak_rss_bytes() / GIB, 3), earlier.get("peak_rss_gib", 0))  # over the phases run here
    atomic_write_json(path, {**earlier, **_runtime, "peak_rss_gib": peak})


def main(argv: Sequence[str] | None = None) -> Any:
    """`code/stage3_generate_eval.py`: the command line, then `run_stage3`."""
    return STAGES["stage3"].main(argv, run_stage3)
