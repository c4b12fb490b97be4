"""The paper's evaluation: the n-way top-k accuracy (exact or sampled) and the image metrics around it.

n-way top-k (docs/method.md, "Evaluation"). For one generated image the classifier gives probabilities over
C classes; `ref_class` is the classifier's arg-max on the ground-truth image. The authors draw
`n_way - 1` other classes without replacement, and score a hit when the reference class is among the
`top_k` highest of these `n_way` probabilities; they repeat this 50 times per image. The expectation
of that hit rate has a closed form, so `n_way_top_k_accuracy(..., trials=None)` computes it exactly:

    let h = #other classes scoring >= the reference ("higher", ties included), r = C - 1 - h,
        d = n_way - 1 distractors drawn uniformly without replacement from the C - 1 others.
    hit  <=>  fewer than top_k of the drawn distractors are "higher"
    P(hit) = sum_{j < top_k} C(h, j) * C(r, d - j) / C(C - 1, d)        (hypergeometric)

For top_k = 1 this is C(r, d) / C(C - 1, d), e.g. C(r, 49) / C(999, 49) for the paper's setting.
Binomials are exact Python integers (C(999, 49) has 89 digits) and the ratio is one correctly
rounded division, so nothing overflows or cancels.

Ties: a distractor whose probability EQUALS the reference's counts as beating it (a hit needs the
reference strictly ahead). This is deterministic and pessimistic; the sampled estimate uses the
same rule, so both agree in expectation. (The authors' torchmetrics call breaks ties by index.)

Image metrics follow the authors' conventions: images as uint8 arrays [N, H, W, 3] (channel last);
MSE on values scaled to [0, 1]; PCC = Pearson correlation of the flattened pixels; SSIM from
scikit-image with `data_range=255`, `channel_axis=-1`. LPIPS (AlexNet, torchmetrics'
`LearnedPerceptualImagePatchSimilarity`), FID / IS / KID (Inception) come from torchmetrics with
feature networks loaded from LOCAL files: nothing here downloads.

Every per-image score is kept per trial and per sample slot ([n_trials, n_slots]); `summarize`
reports per-slot means, the mean over slots and the best slot (by the metric's direction: lowest
for the metrics in LOWER_IS_BETTER), each with a seeded bootstrap 95% interval over trials
(`scipy.stats.bootstrap`: percentile for the mean, BCa for the best slot).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import DegenerateDataWarning, bootstrap
from skimage.metrics import structural_similarity
from torch import nn

from dreamdiffusion.core.compat import SCIPY_RNG
from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.extras import require_extra
from dreamdiffusion.core.stats import pearson_r

# ---------------------------------------------------------------------------------------------
# n-way top-k accuracy


def _n_way_probabilities(n_classes: int, n_way: int, top_k: int, n_higher: Sequence[int]) -> list[float]:
    """Exact P(hit) for each entry of `n_higher` (other classes scoring >= the reference)."""
    others = n_classes - 1
    draws = n_way - 1
    total = math.comb(others, draws)
    cache: dict[int, float] = {}
    out = []
    for h in n_higher:
        if h not in cache:
            r = others - h
            hits = sum(math.comb(h, j) * math.comb(r, draws - j) for j in range(min(top_k, draws + 1)))
            cache[h] = hits / total  # int / int: one correctly rounded division
        out.append(cache[h])
    return out


def _check_n_way(probs: torch.Tensor, ref_class: torch.Tensor, n_way: int, top_k: int) -> None:
    if probs.ndim != 2:
        raise ConfigError(f"probs must be [n_images, n_classes], got shape {tuple(probs.shape)}")
    n_images, n_classes = probs.shape
    if ref_class.shape != (n_images,):
        raise ConfigError(f"ref_class must hold one class per image ({n_images}), got shape "
                          f"{tuple(ref_class.shape)}")
    if not 2 <= n_way <= n_classes:
        raise ConfigError(f"n_way must be between 2 and the number of classes ({n_classes}), got {n_way}")
    if not 1 <= top_k <= n_way:
        raise ConfigError(f"top_k must be between 1 and n_way ({n_way}), got {top_k}")
    if n_images and (ref_class.min() < 0 or ref_class.max() >= n_classes):
        raise ConfigError(f"ref_class values must lie in [0, {n_classes}), got "
                          f"{int(ref_class.min())}..{int(ref_class.max())}")


def n_way_top_k_accuracy(
    probs: torch.Tensor,
    ref_class: torch.Tensor | int | Sequence[int],
    n_way: int = 50,
    top_k: int = 1,
    trials: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image n-way top-k accuracy: float64 [n_images] in [0, 1].

    probs: [n_images, n_classes] (or [n_classes]) classifier scores of the generated images;
    ref_class: the reference class of each image (an int broadcasts to every image).
    trials=None gives the exact expectation (see the module docstring); trials=T draws T sets of
    `n_way - 1` distinct other classes per image from `generator` (the authors' estimate, T=50)
    and returns the hit rate.
    """
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if probs.ndim == 1:
        probs = probs[None]
    ref_class = torch.as_tensor(ref_class, dtype=torch.long).reshape(-1)
    if ref_class.numel() == 1 and probs.shape[0] != 1:
        ref_class = ref_class.expand(probs.shape[0])
    _check_n_way(probs, ref_class, n_way, top_k)
    n_images, n_classes = probs.shape
    ref_score = probs.gather(1, ref_class[:, None])  # [n_images, 1]
    # ">=" counts the reference itself once; ties with other classes count against the reference
    higher = probs >= ref_score
    if trials is None:
        n_higher = (higher.sum(dim=1) - 1).tolist()
        return torch.tensor(_n_way_probabilities(n_classes, n_way, top_k, n_higher), dtype=torch.float64)
    if trials < 1:
        raise ConfigError(f"trials must be a positive number of draws or None (exact), got {trials}")
    out = torch.empty(n_images, dtype=torch.float64)
    others_index = torch.arange(n_classes)
    for i in range(n_images):
        others = others_index[others_index != ref_class[i]]  # [C - 1]
        # a uniformly random (n_way - 1)-subset per trial: the first columns of a random permutation
        order = torch.rand(trials, n_classes - 1, generator=generator).argsort(dim=1)[:, : n_way - 1]
        drawn_higher = higher[i, others[order]].sum(dim=1)  # [trials]
        out[i] = (drawn_higher < top_k).double().mean()
    return out


# ---------------------------------------------------------------------------------------------
# Pixel metrics (the authors' MSE / PCC / SSIM), images uint8 [N, H, W, 3]


def _check_pairs(generated: np.ndarray, reference: np.ndarray) -> None:
    if generated.shape != reference.shape or generated.ndim != 4 or generated.shape[-1] != 3:
        raise ConfigError(f"generated and reference images must both be [N, H, W, 3]; got "
                          f"{generated.shape} and {reference.shape}")


def mse(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pair mean squared error of pixel values scaled to [0, 1]: [N]."""
    _check_pairs(generated, reference)
    diff = generated.astype(np.float64) / 255.0 - reference.astype(np.float64) / 255.0
    return (diff**2).reshape(len(diff), -1).mean(axis=1)


def pcc(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pair Pearson correlation of all pixel values: [N] (0 where an image is constant)."""
    _check_pairs(generated, reference)
    return pearson_r(generated, reference)


def ssim(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pair SSIM (scikit-image, data_range 255, channel last, as the authors): [N]."""

    _check_pairs(generated, reference)
    return np.array([
        structural_similarity(g, r, data_range=255, channel_axis=-1) for g, r in zip(generated, reference)
    ])


# ---------------------------------------------------------------------------------------------
# LPIPS (AlexNet) from local weights


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # the file torchvision's AlexNet_Weights.DEFAULT downloads


class LPIPS(nn.Module):
    """LPIPS distance with AlexNet features: torchmetrics' `LearnedPerceptualImagePatchSimilarity`
    (its linear calibration layers ship with it), the backbone from a LOCAL copy of torchvision's
    `alexnet-owt-7be5be79.pth`.

    forward(generated, reference): float [N, 3, H, W] in [0, 1] each -> distances [N].
    """

    def __init__(self, alexnet_weights: str | Path):
        super().__init__()
        # imported here, not at the top - LPIPS pulls in its own network code; only runs that score LPIPS need it
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        path = Path(alexnet_weights)
        if not path.is_file():
            raise CheckpointError(f"LPIPS AlexNet weights not found: {path} (expected torchvision's "
                                  f"{ALEXNET_FILE}; see pretrains/README.md)")
        # torchvision looks for its weights in torch.hub's cache before downloading; pointing the
        # cache at a folder holding (a link to) the local file makes the public metric load it.
        with tempfile.TemporaryDirectory() as hub_dir:
            (Path(hub_dir) / "checkpoints").mkdir()
            (Path(hub_dir) / "checkpoints" / ALEXNET_FILE).symlink_to(path.resolve())
            previous = torch.hub.get_dir()
            torch.hub.set_dir(hub_dir)
            try:
                self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
            except RuntimeError as err:
                raise CheckpointError(f"{path} is not a torchvision AlexNet state dict: {err}") from err
            finally:
                torch.hub.set_dir(previous)
        self.metric.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        scores = self.metric(generated.float(), reference.float()).reshape(-1)  # reduction="none": per pair
        self.metric.reset()  # forward also accumulates every score; nothing here needs them
        return scores


# ---------------------------------------------------------------------------------------------
# FID / IS / KID


def inception_feature_modules(weights: str | Path) -> tuple[nn.Module, nn.Module]:
    """The standard FID Inception (torch-fidelity's `inception-v3-compat`) from a local weights file
    (`weights-inception-2015-12-05-6726825d.pth`): (pool features [N, 2048], logits [N, 1008]).
    Inputs are uint8 [N, 3, H, W]."""
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"FID Inception weights not found: {path} (see pretrains/README.md)")
    require_extra("fid", "fid_feature_weights (FID/IS/KID)")
    # imported here, not at the top - torch-fidelity's Inception (the FID extra), only with fid_feature_weights set
    from torchmetrics.image.fid import NoTrainInceptionV3

    pool = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    logits = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=str(path))
    return pool, logits


class SizedFeatures(nn.Module):
    """A feature network with its output size as `num_features`, found by one uint8 image passed
    through it on ITS device. torchmetrics' FID reads that attribute; without it, it pushes a dummy
    image made on the CPU through the network, which fails once the network is on a GPU."""

    PROBE_SIZE = 299  # the FID Inception's input side (it resizes any input to this)

    def __init__(self, network: nn.Module, device: torch.device):
        super().__init__()
        self.network = network
        known = getattr(network, "num_features", None)
        if isinstance(known, int):
            self.num_features = known
            return
        probe = torch.zeros(1, 3, self.PROBE_SIZE, self.PROBE_SIZE, dtype=torch.uint8, device=device)
        with torch.no_grad():
            self.num_features = int(network(probe).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


class DistributionMetrics:
    """FID, KID (mean, std) and IS of generated against reference images, accumulated batch by
    batch (only features are kept, never the images).

    `features` maps uint8 images [N, 3, H, W] to feature vectors (FID/KID), `logits` to class
    logits (IS; defaults to `features`). KID's subset size and IS's split count are capped at the
    image counts when computed.
    """

    def __init__(self, features: nn.Module, logits: nn.Module | None = None, kid_subset_size: int = 50,
                 is_splits: int = 10):
        # imported here, not at the top - the FID/IS/KID metrics need torch-fidelity (the FID extra)
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        # the metric states live where the feature network does (a GPU for the real Inception)
        self.device = next(iter(features.parameters()), torch.empty(0)).device
        self.fid = FrechetInceptionDistance(feature=SizedFeatures(features, self.device),
                                            reset_real_features=True).to(self.device)
        self.kid = KernelInceptionDistance(feature=features, subset_size=kid_subset_size).to(self.device)
        self.inception = InceptionScore(feature=logits if logits is not None else features,
                                        splits=is_splits).to(self.device)
        self.kid_subset_size, self.is_splits = kid_subset_size, is_splits
        self.n_real = self.n_fake = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """images: uint8 [N, 3, H, W]."""
        images = images.to(self.device)
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)
        if real:
            self.n_real += len(images)
        else:
            self.inception.update(images)
            self.n_fake += len(images)

    def compute(self) -> dict[str, float]:
        n = min(self.n_real, self.n_fake)
        if n < 2:
            raise ConfigError("FID / KID / IS need at least 2 generated and 2 reference images")
        self.kid.subset_size = min(self.kid_subset_size, n)
        self.inception.splits = max(1, min(self.is_splits, self.n_fake))
        kid_mean, kid_std = self.kid.compute()
        is_mean, is_std = self.inception.compute()
        return {"fid": float(self.fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
                "is_mean": float(is_mean), "is_std": float(is_std), "n_generated": self.n_fake,
                "n_reference": self.n_real}


def distribution_metrics(generated: torch.Tensor, reference: torch.Tensor, features: nn.Module,
                         logits: nn.Module | None = None, kid_subset_size: int = 50, is_splits: int = 10,
                         batch_size: int = 32) -> dict[str, float]:
    """`DistributionMetrics` over two uint8 image sets [N, 3, H, W] in one call."""
    metrics = DistributionMetrics(features, logits, kid_subset_size, is_splits)
    for images, real in ((reference, True), (generated, False)):
        for start in range(0, len(images), batch_size):
            metrics.update(images[start : start + batch_size], real=real)
    return metrics.compute()


# ---------------------------------------------------------------------------------------------
# CLIP: image-image similarity and the EEG-side retrieval accuracy


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] embedding sets: [N]."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).numpy().astype(np.float64)


def retrieval_accuracy(
    eeg_embeddings: torch.Tensor,
    image_embeddings: torch.Tensor,
    image_ids: Sequence[str],
    n_way: int = 50,
    top_k: int = 1,
) -> tuple[np.ndarray, int]:
    """EEG-side n-way retrieval: does a trial's CLIP-head embedding pick its own image's CLIP
    embedding among n_way - 1 other images? Exact expectation per trial (same formula and tie
    rule as `n_way_top_k_accuracy`, candidates = the distinct images of the set, by id).

    eeg_embeddings, image_embeddings: [N, D] per trial; image_ids: the image of each trial.
    Returns (accuracy [N], the n_way used = min(n_way, number of distinct images)).
    """
    unique = list(dict.fromkeys(image_ids))
    if len(unique) < 2:
        raise ConfigError("retrieval needs trials of at least 2 distinct images")
    position = {name: i for i, name in enumerate(unique)}
    first = [image_ids.index(name) for name in unique]
    candidates = F.normalize(image_embeddings[first].float(), dim=-1)  # [M, D]
    scores = F.normalize(eeg_embeddings.float(), dim=-1) @ candidates.T  # [N, M]
    used = min(n_way, len(unique))
    ref = torch.tensor([position[name] for name in image_ids])
    acc = n_way_top_k_accuracy(scores, ref, n_way=used, top_k=min(top_k, used))
    return acc.numpy(), used


# ---------------------------------------------------------------------------------------------
# Summaries with bootstrap intervals


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> tuple[tuple[float, float], str]:
    """Bootstrap interval of `statistic` over the rows (trials) of `values`, and the method that gave it.

    The resamples are `scipy.stats.bootstrap`'s (rows drawn with numpy's generator seeded by `seed`).
    "percentile": the (1 - level) / 2 and (1 + level) / 2 percentiles of the statistic over them (by
    np.percentile: scipy's own quantile differs from it in the last bit, and this keeps the intervals
    of earlier runs exactly). "BCa": scipy's bias-corrected and accelerated interval, the better one
    for a biased statistic such as the best slot; it is undefined when the resamples all give one
    value or the jackknife cannot estimate the acceleration (a few trials): then the percentile
    interval, with the method saying why. Fewer than 2 rows or no resamples: (point, point).
    """
    values = np.asarray(values)
    if len(values) < 2 or n_samples < 1:
        point = float(statistic(values))
        return (point, point), "none (fewer than 2 trials or no resamples: the point itself)"
    with warnings.catch_warnings():  # an undefined BCa interval is NaN (handled below), with warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap((np.arange(len(values)),), lambda rows: statistic(values[rows]), n_resamples=n_samples,
                           vectorized=False, confidence_level=level, method=method,
                           **{SCIPY_RNG: np.random.default_rng(seed)})
    low, high = result.confidence_interval
    if method == "percentile" or not (np.isfinite(low) and np.isfinite(high)):
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(result.bootstrap_distribution, [tail, 100 - tail])
        if method != "percentile":
            why = "the resamples all give one value" if np.ptp(result.bootstrap_distribution) == 0 else \
                "the jackknife cannot estimate its acceleration"
            method = f"percentile ({method} is undefined here: {why})"
    return (float(low), float(high)), method


# Metrics where a smaller value is better: their "best slot" is the lowest per-slot mean.
LOWER_IS_BETTER = frozenset({"mse", "lpips", "fid", "kid"})


def summarize(per_image: np.ndarray, n_bootstrap: int = 1000, seed: int = 0, lower_is_better: bool = False) -> dict:
    """Summary of one metric over [n_trials, n_slots] per-image values.

    per_slot: mean over trials of each sample slot; mean: over slots (the paper's "mean");
    best_slot: the best per-slot mean (the paper's "max" for accuracies; the lowest for a metric
    where lower is better) and worst_slot the other end; mean and best slot with a bootstrap 95% interval
    over trials: percentile for the mean, BCa for the best slot (the best of several slot means is
    biased upward, which BCa corrects for; `best_slot_ci95_method` says which interval was given).
    """
    per_image = np.asarray(per_image, dtype=np.float64)
    if per_image.ndim == 1:
        per_image = per_image[:, None]
    per_slot = per_image.mean(axis=0)
    pick, other = (np.argmin, np.argmax) if lower_is_better else (np.argmax, np.argmin)
    reduce = (lambda v: v.mean(axis=0).min()) if lower_is_better else (lambda v: v.mean(axis=0).max())
    best, worst = int(pick(per_slot)), int(other(per_slot))
    best_ci, best_method = bootstrap_ci(per_image, reduce, n_bootstrap, seed, method="BCa")
    return {
        "per_slot": per_slot.tolist(),
        "mean": float(per_slot.mean()),
        "mean_ci95": bootstrap_ci(per_image, lambda v: v.mean(), n_bootstrap, seed)[0],
        "best_slot": float(per_slot[best]),
        "best_slot_index": best,
        "best_slot_ci95": best_ci,
        "best_slot_ci95_method": best_method,
        "worst_slot": float(per_slot[worst]),
        "lower_is_better": bool(lower_is_better),
        "n_trials": int(per_image.shape[0]),
        "n_slots": int(per_image.shape[1]),
    }
