"""The reconstruction metrics of the brain-to-image literature (MindEye's set, used on THINGS-EEG2).

As MindEye's `Reconstruction_Metrics` computes them (Scotti et al. 2023), from the PNGs: both images
are first brought to 256 x 256 (bilinear, float in [0, 1]), then
  - PixCorr: Pearson correlation of the flattened pixels at 425 px;
  - SSIM (`ssim_gray`): grey-scale images at 425 px, scikit-image with Gaussian weights (sigma 1.5),
    population covariance and MindEye's `multichannel=True` on a 2-D grey image - which treats its
    columns as channels (1-D SSIM down each column, averaged). That is what the published numbers
    measure, so it is kept for comparability; it is not the 2-D SSIM of `metrics.ssim`;
  - two-way identification with AlexNet layers 2 and 5 (`features.4`, `features.11`), Inception v3
    (`avgpool`) and CLIP: for a generated image, the fraction of the OTHER ground-truth images whose
    features correlate less with it than its own ground truth (chance 50%);
  - EfficientNet-B1 and SwAV-ResNet50 (`avgpool`): the correlation distance (1 - Pearson r) to its
    ground truth (lower is better).
Each network is torchvision's architecture with the weights MindEye uses, from a LOCAL file (nothing
downloads); a metric whose file is not configured is skipped with the reason by the caller.

Two-way identification is a set-level score: it compares every generated image with the ground
truths of the same sample slot. MindEye's test images are distinct; here several trials may show
the same image (all subjects pooled, repetitions not averaged), so the ground truths are the
DISTINCT images (by id) and a trial is never compared with a copy of its own image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms.v2 import functional as TF

from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.files import safe_torch_load
from dreamdiffusion.core.stats import pearson_r, pearson_r_all_pairs, unit_rows

BASE_SIZE = 256  # every image is first resized to 256 x 256, as MindEye's notebook does
RESIZE_LOW_LEVEL = 425  # PixCorr / SSIM resolution


@dataclass(frozen=True)
class FeatureSpec:
    architecture: str  # torchvision.models builder
    node: str  # torchvision feature-extraction node
    resize: int  # shorter side before normalisation
    kind: str  # "two_way" | "distance"
    weights_file: str  # the file torchvision (or the SwAV release) downloads


FEATURE_METRICS = {
    "alexnet2": FeatureSpec("alexnet", "features.4", 256, "two_way", "alexnet-owt-7be5be79.pth"),
    "alexnet5": FeatureSpec("alexnet", "features.11", 256, "two_way", "alexnet-owt-7be5be79.pth"),
    "inception": FeatureSpec("inception_v3", "avgpool", 342, "two_way", "inception_v3_google-0cc3c7bd.pth"),
    # EfficientNet_B1_Weights.DEFAULT (IMAGENET1K_V2), as MindEye loads it
    "effnet": FeatureSpec("efficientnet_b1", "avgpool", 255, "distance", "efficientnet_b1-c27df63c.pth"),
    "swav": FeatureSpec("resnet50", "avgpool", 224, "distance", "swav_800ep_pretrain.pth.tar"),
}
LOW_LEVEL_METRICS = ("pixcorr", "ssim_gray")
RECON_METRICS = (*LOW_LEVEL_METRICS, *FEATURE_METRICS, "clip_2way")
DISTANCE_METRICS = frozenset(m for m, spec in FEATURE_METRICS.items() if spec.kind == "distance")
LOWER_IS_BETTER = DISTANCE_METRICS
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Low level


def to_base(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, 256, 256] in [0, 1] (bilinear, as MindEye's first resize)."""

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
    return TF.resize(x, [BASE_SIZE, BASE_SIZE], antialias=True)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:

    return TF.resize(x, size, antialias=True)


def pixcorr(generated: torch.Tensor, reference: torch.Tensor, size: int = RESIZE_LOW_LEVEL) -> np.ndarray:
    """Per-pair Pearson correlation of the flattened pixels at `size` px (inputs from `to_base`): [N]."""
    a = _resize(generated, size).reshape(len(generated), -1).double().numpy()
    b = _resize(reference, size).reshape(len(reference), -1).double().numpy()
    return pearson_r(a, b)


def ssim_gray(generated: torch.Tensor, reference: torch.Tensor, size: int = RESIZE_LOW_LEVEL) -> np.ndarray:
    """Per-pair SSIM of the grey images at `size` px as MindEye computes it (see the module text): [N]."""

    gray = lambda x: rgb2gray(_resize(x, size).permute(0, 2, 3, 1).double().numpy())  # noqa: E731
    gen, ref = gray(generated), gray(reference)
    return np.array([structural_similarity(g, r, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=1.0) for g, r in zip(gen, ref)])


# ---------------------------------------------------------------------------------------------
# Feature comparisons


def two_way_identification(reference: np.ndarray, generated: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """reference: features [M, D] of the distinct ground-truth images; generated: [N, D], one per trial;
    own: [N] the row of each trial's ground truth in `reference` (default: trial j <-> row j, M = N).
    Per trial j: the fraction of the M - 1 other images i with corr(ref_i, gen_j) < corr(ref_own, gen_j): [N]."""
    if len(reference) < 2:
        raise ConfigError("two-way identification needs at least 2 distinct ground-truth images")
    own = np.arange(len(generated)) if own is None else np.asarray(own)
    r = pearson_r_all_pairs(reference, generated)  # r[i, j] = corr(ref_i, gen_j)
    congruent = r[own, np.arange(len(generated))]
    return (r < congruent[None, :]).sum(0) / (len(reference) - 1)


def correlation_distance(reference: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Per pair 1 - Pearson r of the features: [N]."""
    return 1.0 - (unit_rows(reference) * unit_rows(generated)).sum(1)  # each pair's r, as two-way computes it


def _swav_state(state: dict) -> dict:
    """The SwAV release's ResNet-50 keys -> torchvision's (drop `module.` and the SwAV heads)."""
    state = state.get("state_dict", state)
    out = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in out.items() if not k.startswith(("projection_head", "prototypes"))}


class FeatureNetwork(nn.Module):
    """A torchvision backbone from a local weights file, returning the flattened features of one node."""

    def __init__(self, metric: str, weights: str | Path):
        super().__init__()


        self.spec = FEATURE_METRICS[metric]
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"metric '{metric}': weights not found: {path} (expected {self.spec.weights_file}; "
                                  "see pretrains/README.md)")
        # torchvision's pretrained Inception v3 re-normalises its ImageNet-normalised input
        # (transform_input) and carries the auxiliary head in its state dict.
        kwargs = ({"aux_logits": True, "init_weights": False, "transform_input": True}
                  if self.spec.architecture == "inception_v3" else {})
        model = getattr(torchvision.models, self.spec.architecture)(weights=None, **kwargs)
        state = safe_torch_load(path, f"{metric} weights")
        if metric == "swav":
            state = _swav_state(state)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("fc.") for k in missing):  # SwAV ships no classifier head
                raise CheckpointError(f"{path} is not a SwAV ResNet-50: missing {missing[:5]}, unexpected {unexpected[:5]}")
        else:
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"{path} is not a torchvision {self.spec.architecture} state dict: "
                                      f"{str(err).splitlines()[0]}") from err
        self.extractor = create_feature_extractor(model.eval(), {self.spec.node: "features"}).requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> np.ndarray:
        """float [N, 3, 256, 256] in [0, 1] (`to_base`) -> float32 features [N, D]."""
        x = _resize(images.to(self.mean.device), self.spec.resize)
        feats = self.extractor((x - self.mean) / self.std)["features"]
        return feats.flatten(1).float().cpu().numpy()


class ReconstructionScores:
    """Accumulates what the metrics need (features per distinct ground truth and per trial and slot),
    then scores them.

    networks: metric -> a callable float [N, 3, 256, 256] -> features [N, D] (FeatureNetwork, or for
    "clip_2way" the CLIP image embedder wrapped by the caller)."""

    def __init__(self, metrics: Sequence[str], networks: dict[str, object]):
        self.metrics = list(metrics)
        self.networks = networks
        self.low: dict[str, list[np.ndarray]] = {m: [] for m in self.metrics if m in LOW_LEVEL_METRICS}
        featured = [m for m in self.metrics if m not in LOW_LEVEL_METRICS]
        # two-way: one reference row per distinct image; distances: one per trial (pairwise)
        self.ref_feats: dict[str, list[np.ndarray]] = {m: [] for m in featured}
        self.gen_feats: dict[str, list[np.ndarray]] = {m: [] for m in featured}
        self.position: dict[str, int] = {}  # image id -> row of ref_feats
        self.own: list[int] = []  # per trial: its ground truth's row

    def add(self, references: np.ndarray, generated: np.ndarray, n_slots: int, ids: Sequence[str]) -> None:
        """references: uint8 [B, H, W, 3]; generated: uint8 [B * n_slots, H, W, 3] (trial-major); ids: the
        image of each trial (equal ids = the same ground truth)."""
        refs, gens = to_base(references), to_base(generated)
        ref_rep = refs.repeat_interleave(n_slots, dim=0)
        for name, fn in (("pixcorr", pixcorr), ("ssim_gray", ssim_gray)):
            if name in self.low:
                self.low[name].append(fn(gens, ref_rep).reshape(len(references), n_slots))
        new = []  # trials of this batch whose image is seen for the first time
        for i, image in enumerate(ids):
            if image not in self.position:
                self.position[image] = len(self.position)
                new.append(i)
        self.own.extend(self.position[image] for image in ids)
        for name in self.gen_feats:
            net = self.networks[name]
            wanted = refs if name in DISTANCE_METRICS else refs[new]
            if len(wanted):
                self.ref_feats[name].append(net(wanted).astype(np.float32))
            self.gen_feats[name].append(net(gens).reshape(len(references), n_slots, -1).astype(np.float32))

    def per_image(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(metric -> [n_trials, n_slots], metric -> why it could not be computed)."""
        out = {name: np.concatenate(chunks) for name, chunks in self.low.items() if chunks}
        skipped = {}
        for name, chunks in self.gen_feats.items():
            if not chunks:
                continue
            gen = np.concatenate(chunks)
            if name in DISTANCE_METRICS:
                ref = np.concatenate(self.ref_feats[name])
                out[name] = np.stack([correlation_distance(ref, gen[:, k]) for k in range(gen.shape[1])], axis=1)
            elif len(self.position) < 2:
                skipped[name] = f"two-way identification needs at least 2 distinct images; this run has {len(self.position)}"
            else:
                ref, own = np.concatenate(self.ref_feats[name]), np.array(self.own)
                out[name] = np.stack([two_way_identification(ref, gen[:, k], own) for k in range(gen.shape[1])],
                                     axis=1)
        return out, skipped
