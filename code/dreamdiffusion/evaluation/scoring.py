"""Scoring generated images from disk: any folder in the authors' naming, our protocol's metrics.

A folder holds `test{i}-{k}.png` for trials i = 0..N-1, with k = 0 the ground truth and k = 1..K the
generated images (the authors' gen_eval_eeg.py writes this; so does our stage 3).
`read_image_folder` checks it (no test0-0.png, a trial with a missing k, images of different sizes
within a trial or across trials, a file that is not an image: each a `DataError` that names the file).
Images are decoded by their mode to 8-bit RGB (`data.common.to_rgb8`: 16-bit, palette, transparency).

`Scorer` scores only uint8 RGB images (what is on disk), never in-memory floats, so a run's own
images, a copy of its folder and another method's folder are scored the same way:
  - n-way top-k (`metrics.n_way_top_k_accuracy`; the reference class is the classifier's arg-max on
    the k = 0 image), classifier top-1 agreement;
  - MSE / PCC / SSIM against the k = 0 image; LPIPS (torchmetrics); CLIP image similarity (the
    embedder's own preprocessing; the ground truth's original file when the caller gives it);
  - FID / IS / KID over all generated vs all ground-truth images;
  - the brain-to-image literature's reconstruction metrics (`recon`: PixCorr, grey SSIM, two-way
    identification with AlexNet(2)/(5), Inception v3 and CLIP, EffNet-B1 / SwAV distances);
  - EEG->image retrieval when the caller adds the EEG-side embeddings (`add_retrieval`): top-k for
    each k of `retrieval_top_ks` at each n of `retrieval_ways` (exact expectations), the (n_way,
    top_k) cell also reported as "retrieval".
Each network goes through its library's preprocessing (`classifier.ImageClassifier.transform`,
`clip_embedder.ImageEmbedder.preprocess`).

Stage 3's score phase is `score_folder`: the folder, the records of the run that wrote it
(generation.json and generation.jsonl beside it, when there), the metric networks loaded from local
files; it returns a `FolderScores`, which `report.write_report` writes out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from dreamdiffusion.core.devices import resolve_device
from dreamdiffusion.core.errors import ConfigError, DataError
from dreamdiffusion.data.common import open_rgb
from dreamdiffusion.evaluation.metrics import (
    ALEXNET_FILE,
    LPIPS,
    DistributionMetrics,
    cosine_similarity,
    inception_feature_modules,
    mse,
    n_way_top_k_accuracy,
    pcc,
    retrieval_accuracy,
    ssim,
    summarize,
)
from dreamdiffusion.evaluation.metrics import LOWER_IS_BETTER as METRICS_LOWER_IS_BETTER
from dreamdiffusion.evaluation.recon import (
    DISTANCE_METRICS,
    FEATURE_METRICS,
    RECON_METRICS,
    FeatureNetwork,
    ReconstructionScores,
)
from dreamdiffusion.models.classifier import load_classifier
from dreamdiffusion.models.clip_embedder import load_clip_image_encoder

IMAGE_NAME = re.compile(r"test(\d+)-(\d+)\.png")
PAIRWISE_METRICS = ("mse", "pcc", "ssim", "lpips", "clip_similarity")
GENERATION_METRICS = ("n_way", *PAIRWISE_METRICS, "fid", *RECON_METRICS)
KNOWN_METRICS = (*GENERATION_METRICS, "retrieval")
# What each metric needs besides the images (the feature metrics: their entry of `features`;
# retrieval: the embeddings the caller adds).
METRIC_NETWORKS = {"n_way": "classifier", "clip_similarity": "clip", "lpips": "lpips",
                   "fid": "fid_features", "clip_2way": "clip"}
LOWER_IS_BETTER = METRICS_LOWER_IS_BETTER | DISTANCE_METRICS
# The recon feature metrics and the config field of each one's weights file.
FEATURE_WEIGHTS = {"alexnet2": "alexnet_weights", "alexnet5": "alexnet_weights", "inception": "inception_weights",
                   "effnet": "effnet_weights", "swav": "swav_weights"}


# ---------------------------------------------------------------------------------------------
# Image folders in the authors' naming


@dataclass(frozen=True)
class ImageFolder:
    """A checked folder of `test{i}-{k}.png`: trials 0..n_trials-1, each with k = 0..n_slots."""

    root: Path
    n_trials: int
    n_slots: int  # generated images per trial (k = 1..n_slots)
    image_size: tuple[int, int]  # (width, height) of trial 0's images
    n_ignored: int  # files that are not named test{i}-{k}.png

    def path(self, trial: int, slot: int) -> Path:
        return self.root / f"test{trial}-{slot}.png"


def read_image_folder(root: str | Path) -> ImageFolder:
    """Check a folder of `test{i}-{k}.png` (k = 0 the ground truth) and return its shape."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"images_dir {root} is not a folder (expected test{{i}}-{{k}}.png files, k = 0 the ground truth)")
    found: dict[int, set[int]] = {}
    ignored = 0
    for path in root.iterdir():
        match = IMAGE_NAME.fullmatch(path.name)
        if match is None:
            ignored += 1
            continue
        found.setdefault(int(match[1]), set()).add(int(match[2]))
    if 0 not in found or 0 not in found[0]:
        raise DataError(f"{root} has no test0-0.png: expected the authors' naming test{{i}}-{{k}}.png for trials "
                        "i = 0, 1, ... with k = 0 the ground truth and k = 1..K the generated images")
    n_trials, n_slots = max(found) + 1, max(max(slots) for slots in found.values())
    if n_slots < 1:
        raise DataError(f"{root} holds only ground-truth images (k = 0): no generated image test{{i}}-{{k}}.png, k >= 1")
    for trial in range(n_trials):
        missing = sorted(set(range(n_slots + 1)) - found.get(trial, set()))
        if missing:
            raise DataError(f"{root}: trial {trial} lacks test{trial}-{missing[0]}.png (every trial needs k = 0..{n_slots}, "
                            f"as trial(s) {sorted(t for t, s in found.items() if max(s) == n_slots)[:3]} have)")
    sizes = {}
    for trial in range(n_trials):
        trial_sizes = {k: _image_size(root / f"test{trial}-{k}.png") for k in range(n_slots + 1)}
        if len(set(trial_sizes.values())) > 1:
            raise DataError(f"{root}: the images of trial {trial} differ in size ({_sizes_text(trial, trial_sizes)}); "
                            "a trial's ground truth and generated images must have one size")
        sizes[trial] = trial_sizes[0]
    other = next((t for t in range(n_trials) if sizes[t] != sizes[0]), None)
    if other is not None:
        (w0, h0), (w, h) = sizes[0], sizes[other]
        raise DataError(f"{root}: the images of trial {other} are {w}x{h} but those of trial 0 are {w0}x{h0}; every "
                        "trial of a scored folder must have one size (the metrics compare images across trials)")
    return ImageFolder(root, n_trials, n_slots, sizes[0], ignored)


def _sizes_text(trial: int, sizes: dict[int, tuple[int, int]]) -> str:
    return ", ".join(f"test{trial}-{k}.png {w}x{h}" for k, (w, h) in sizes.items())


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path} is not a readable image: {err}") from err


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class MetricNetworks:
    """The networks of the metrics; a metric whose network is None is skipped (with a reason)."""

    classifier: nn.Module | None = None  # classifier.ImageClassifier
    clip: nn.Module | None = None  # clip_embedder.ImageEmbedder
    lpips: nn.Module | None = None  # metrics.LPIPS
    fid_features: nn.Module | None = None  # uint8 [N, 3, H, W] -> features (FID / KID)
    fid_logits: nn.Module | None = None  # uint8 [N, 3, H, W] -> logits (IS); default fid_features
    features: dict[str, nn.Module] | None = None  # recon.FEATURE_METRICS name -> recon.FeatureNetwork


def _uint8(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])


class Scorer:
    """Accumulates per-image scores over batches of trials; `compute` summarises them.

    metrics: names from KNOWN_METRICS; those in `skipped` (name -> reason) are not computed. Asking
    for a metric whose network was not given (and is not skipped) is a ConfigError.
    """

    def __init__(self, metrics: Sequence[str], nets: MetricNetworks, n_way: int = 50, top_k: int = 1,
                 n_way_trials: int | None = None, seed: int = 0, kid_subset_size: int = 50,
                 skipped: dict[str, str] | None = None, retrieval_ways: Sequence[int] = (),
                 retrieval_top_ks: Sequence[int] = ()):
        unknown = sorted(set(metrics) - set(KNOWN_METRICS))
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}; known: {', '.join(KNOWN_METRICS)}")
        self.skipped = dict(skipped or {})
        for name in metrics:
            if name in METRIC_NETWORKS and getattr(nets, METRIC_NETWORKS[name]) is None and name not in self.skipped:
                raise ConfigError(f"metric '{name}' was asked for but its network was not given")
            if name in FEATURE_METRICS and name not in (nets.features or {}) and name not in self.skipped:
                raise ConfigError(f"metric '{name}' was asked for but its network was not given")
        self.metrics = [m for m in metrics if m not in self.skipped]
        self.nets = nets
        self.n_way, self.top_k, self.n_way_trials = n_way, top_k, n_way_trials
        self.generator = torch.Generator().manual_seed(seed)  # only used by the sampled n-way estimate
        self.retrieval_ways = sorted(set(retrieval_ways) | {n_way})
        self.retrieval_top_ks = sorted(set(retrieval_top_ks) | {top_k, 1})  # top-1 always: the table's chance column
        recon = [m for m in self.metrics if m in RECON_METRICS]
        self.recon = ReconstructionScores(recon, self._recon_networks(recon)) if recon else None
        self.scores: dict[str, list[np.ndarray]] = {m: [] for m in self.metrics
                                                    if m in GENERATION_METRICS and m != "fid" and m not in recon}
        if "n_way" in self.metrics:
            self.scores["top1_agreement"] = []
        self.reference_class: list[int] = []
        self.distribution = (DistributionMetrics(nets.fid_features, nets.fid_logits, kid_subset_size)
                             if "fid" in self.metrics else None)
        self.retrieval: dict[str, list] = {"eeg": [], "images": [], "ids": []}
        self.retrieval_scores: np.ndarray | None = None
        self.late_skipped: dict[str, str] = {}  # metrics found impossible only when computed (too few images)
        self._recon_scores: dict[str, np.ndarray] | None = None  # the set-level scores, once computed
        # CLIP embeddings of the trials' reference views, kept from clip_similarity for retrieval
        self.reference_embeddings: list[torch.Tensor] = []

    def _recon_networks(self, recon: list[str]) -> dict[str, Any]:
        networks: dict[str, Any] = {m: self.nets.features[m] for m in recon if m in FEATURE_METRICS}
        if "clip_2way" in recon:
            clip = self.nets.clip
            def clip_features(x: torch.Tensor) -> np.ndarray:  # the 256 px float view, through CLIP's own preprocessing
                u8 = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
                return clip.embed([Image.fromarray(a) for a in u8]).float().cpu().numpy()

            networks["clip_2way"] = clip_features
        return networks

    @torch.no_grad()
    def add_trials(self, references: Sequence[Image.Image], generated: Sequence[Sequence[Image.Image]],
                   clip_references: Sequence[Image.Image] | None = None, ids: Sequence[str] | None = None) -> None:
        """references: the k = 0 image of each trial; generated: each trial's K images (same size as
        its reference); clip_references: what CLIP compares with (default: `references`); ids: the
        image of each trial, for the set-level recon metrics (default: every trial its own image)."""
        n_slots = len(generated[0])
        if any(len(g) != n_slots for g in generated) or len(generated) != len(references):
            raise ConfigError("every trial needs the same number of generated images and one reference")
        flat = [img for trial in generated for img in trial]
        for name, values in self._pairwise(references, flat, n_slots, clip_references).items():
            self.scores[name].append(values.reshape(len(references), n_slots))
        if self.recon is not None:
            self._recon_scores = None
            start = len(self.recon.own)
            ids = list(ids) if ids is not None else [f"trial {start + i}" for i in range(len(references))]
            self.recon.add(_uint8(references), _uint8(flat), n_slots, ids)
        if self.distribution is not None:
            self.distribution.update(torch.from_numpy(_uint8(flat)).permute(0, 3, 1, 2).contiguous(), real=False)
            self.distribution.update(torch.from_numpy(_uint8(references)).permute(0, 3, 1, 2).contiguous(), real=True)

    def _pairwise(self, references, flat, n_slots, clip_references) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "n_way" in self.metrics:
            ref_class = self.nets.classifier.classify(references).argmax(dim=1)  # [B]
            probs = self.nets.classifier.classify(flat)  # [B*K, n_classes]
            ref_flat = ref_class.repeat_interleave(n_slots)
            out["n_way"] = n_way_top_k_accuracy(probs, ref_flat, self.n_way, self.top_k, self.n_way_trials,
                                                  self.generator).numpy()
            out["top1_agreement"] = (probs.argmax(dim=1) == ref_flat).numpy().astype(np.float64)
            self.reference_class.extend(ref_class.tolist())
        gen_u8 = _uint8(flat)
        ref_u8 = np.repeat(_uint8(references), n_slots, axis=0)
        for name, fn in (("mse", mse), ("pcc", pcc), ("ssim", ssim)):
            if name in self.metrics:
                out[name] = fn(gen_u8, ref_u8)
        if "lpips" in self.metrics:
            device = next(self.nets.lpips.parameters()).device
            as_unit = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255).to(device)  # noqa: E731
            out["lpips"] = self.nets.lpips(as_unit(gen_u8), as_unit(ref_u8)).cpu().numpy()
        if "clip_similarity" in self.metrics:
            ref_emb = self.nets.clip.embed(list(clip_references or references))
            self.reference_embeddings.append(ref_emb)
            out["clip_similarity"] = cosine_similarity(self.nets.clip.embed(flat), ref_emb.repeat_interleave(n_slots, 0))
        return out

    def add_retrieval(self, eeg_embeddings: torch.Tensor, image_embeddings: torch.Tensor,
                      image_ids: Sequence[str]) -> None:
        """eeg_embeddings: the CLIP head's output [B, D]; image_embeddings: the trial images' [B, D]."""
        self.retrieval["eeg"].append(torch.as_tensor(eeg_embeddings).detach().float().cpu())
        self.retrieval["images"].append(torch.as_tensor(image_embeddings).detach().float().cpu())
        self.retrieval["ids"].extend(image_ids)

    def per_image(self) -> dict[str, np.ndarray]:
        out = {name: np.concatenate(chunks) for name, chunks in self.scores.items() if chunks}
        if self.recon is not None:
            if self._recon_scores is None:  # the two-way comparisons are computed once, not per call
                self._recon_scores, self.late_skipped = self.recon.per_image()
            out.update(self._recon_scores)
        return out

    def compute(self, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, values in self.per_image().items():
            results[name] = summarize(values, n_bootstrap, seed, lower_is_better=name in LOWER_IS_BETTER)
        if self.distribution is not None and self.distribution.n_fake:
            results["fid"] = self.distribution.compute()
        if "retrieval" in self.metrics and self.retrieval["ids"]:
            results.update(self._retrieval(n_bootstrap, seed))
        return results

    def _retrieval(self, n_bootstrap: int, seed: int) -> dict[str, Any]:
        """"retrieval" (the n_way / top_k cell, per trial kept for metrics.json) and "retrieval_table"
        ("<n>-way" -> "top<k>" -> summary) for each n up to the number of distinct images."""
        eeg, images, ids = torch.cat(self.retrieval["eeg"]), torch.cat(self.retrieval["images"]), self.retrieval["ids"]
        n_images = len(dict.fromkeys(ids))
        table: dict[str, dict[str, Any]] = {}
        # every asked-for n that this many images allow, and the headline's n (all candidates when fewer)
        ways = sorted({w for w in self.retrieval_ways if w <= n_images} | {min(self.n_way, n_images)})
        for n in ways:
            for k in [k for k in self.retrieval_top_ks if k < n]:
                acc, used = retrieval_accuracy(eeg, images, ids, n, k)
                summary = summarize(acc, n_bootstrap, seed)
                table.setdefault(f"{used}-way", {})[f"top{k}"] = {
                    "mean": summary["mean"], "mean_ci95": summary["mean_ci95"], "chance": k / used}
        acc, used = retrieval_accuracy(eeg, images, ids, self.n_way, self.top_k)
        self.retrieval_scores = acc
        return {"retrieval": {**summarize(acc, n_bootstrap, seed), "n_way": used,
                              "chance": min(self.top_k, used) / used, "n_images": n_images},
                "retrieval_table": table}


# ---------------------------------------------------------------------------------------------
# The score phase of stage 3: a folder, its generation records, the metric networks


@dataclass
class FolderScores:
    """What the score phase found and computed: everything stage 3's report is written from."""

    header: dict[str, Any] | None  # generation.json of the run that wrote the folder (None: a foreign folder)
    records: list[dict[str, Any]] | None  # generation.jsonl: one record per trial, in order
    folder: ImageFolder | None  # None when only retrieval was asked for (no image is read)
    scorer: Scorer
    results: dict[str, Any]  # the summaries (`Scorer.compute`)
    skipped: dict[str, str]  # metric -> why it was not computed
    n_trials: int
    clip_from_originals: bool  # CLIP compared with the original image files (else the k = 0 PNGs)


def score_folder(cfg: DictConfig, out_dir: Path, extra_networks: dict[str, Any], progress: bool) -> FolderScores:
    """The score phase (cfg with resolved paths): `images_dir` (default `out_dir/images`) scored
    with `cfg.metrics`; `extra_networks` (fields of MetricNetworks) take precedence over files."""
    images_dir = Path(cfg.images_dir) if cfg.images_dir else out_dir / "images"
    header, records = read_generation(images_dir)
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
    clip_from_originals = _score_images(scorer, folder, records, cfg.batch_size, progress)
    if retrieval is not None:
        eeg, paths, ids = retrieval
        # clip_similarity already embedded the same original files, trial by trial
        reused = clip_from_originals and len(scorer.reference_embeddings) > 0
        images = torch.cat(scorer.reference_embeddings) if reused else nets.clip.embed([open_rgb(p) for p in paths])
        scorer.add_retrieval(eeg, images, ids)
    results = scorer.compute(cfg.bootstrap_samples, cfg.seed)
    skipped.update(scorer.late_skipped)
    n_trials = folder.n_trials if folder is not None else len(records)
    return FolderScores(header, records, folder, scorer, results, skipped, n_trials, clip_from_originals)


def read_generation(folder: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """(generation.json, the trials' records) of the run that wrote `folder`, or (None, None)."""
    root = folder.parent
    header_file, jsonl = root / "generation.json", root / "generation.jsonl"
    if not header_file.is_file() or not jsonl.is_file():
        return None, None
    remedy = f"run stage 3 again with phase=generate and the same settings (output_dir={root}) to rewrite them"
    try:
        header = json.loads(header_file.read_text())
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{root}: generation.json / generation.jsonl are damaged ({err}): {remedy}") from err
    if not isinstance(header, dict) or not all(isinstance(r, dict) and {"reference_image", "reference_path"} <= r.keys()
                                               for r in records):
        raise DataError(f"{root}: generation.json / generation.jsonl do not hold the generation's header and "
                        f"records: {remedy}")
    return header, records


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
            skipped["lpips"] = f"no lpips_weights given (torchvision's {ALEXNET_FILE})"
        else:
            nets.lpips = LPIPS(cfg.lpips_weights).to(device)
    if "fid" in wanted and nets.fid_features is None:
        if cfg.fid_feature_weights is None:
            skipped["fid"] = "no fid_feature_weights given (weights-inception-2015-12-05-6726825d.pth)"
        else:
            pool, logits = inception_feature_modules(cfg.fid_feature_weights)
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


def _score_images(scorer: Scorer, folder: ImageFolder | None, records, batch_size: int, progress: bool) -> bool:
    """Feed the folder's images to the scorer in batches of trials; True when CLIP compared with the
    original image files (our own records), False when with the k = 0 PNGs."""
    if folder is None:
        return False
    originals = records is not None and all(Path(r["reference_path"]).is_file() for r in records)
    bar = tqdm(total=folder.n_trials, desc="stage 3: score", unit="trial", disable=not progress)
    for start in range(0, folder.n_trials, batch_size):
        trials = range(start, min(start + batch_size, folder.n_trials))
        refs = [open_rgb(folder.path(i, 0)) for i in trials]
        gens = [[open_rgb(folder.path(i, k)) for k in range(1, folder.n_slots + 1)] for i in trials]
        clip_refs = [open_rgb(records[i]["reference_path"]) for i in trials] if originals else None
        ids = [records[i]["reference_image"] for i in trials] if records is not None else None
        scorer.add_trials(refs, gens, clip_refs, ids)
        bar.update(len(trials))
    bar.close()
    return originals
