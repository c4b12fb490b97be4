"""The reconstruction metrics of the brain-to-image literature (MindEye's set, used on THINGS-EEG2).

Low level: PixCorr (Pearson correlation of the flattened pixels after resizing both images to 425 px),
SSIM on grey-scale images at 425 px (scikit-image, Gaussian weights sigma 1.5, population
covariance). High level: two-way identification with the features of AlexNet layers 2 and 5,
Inception v3 and CLIP - for a generated image, the fraction of the OTHER ground-truth images whose
features correlate less with it than its own ground truth (chance 50%) - and the correlation
distance (1 - Pearson r) to its ground truth in EfficientNet-B1 and SwAV-ResNet50 features
(lower is better).

Each network is torchvision's architecture with weights from a LOCAL file (nothing downloads);
a metric whose file is not configured is skipped with the reason by the caller. The preprocessing
(resize of the shorter side, ImageNet normalisation) and the feature nodes are MindEye's. Two-way
identification is a set-level score: it compares every generated image with every ground truth
of the same sample slot, so the per-image value depends on the whole test set (like the n-way
accuracy, it is summarised per slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import CheckpointError, ConfigError

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
    "effnet": FeatureSpec("efficientnet_b1", "avgpool", 255, "distance", "efficientnet_b1_rwightman-bac287d4.pth"),
    "swav": FeatureSpec("resnet50", "avgpool", 224, "distance", "swav_800ep_pretrain.pth.tar"),
}
LOW_LEVEL_METRICS = ("pixcorr", "ssim_gray")
RECON_METRICS = (*LOW_LEVEL_METRICS, *FEATURE_METRICS, "clip_2way")
LOWER_IS_BETTER = frozenset({"effnet", "swav"})
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Low level


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float64 [N, size, size, 3] in [0, 1] (bilinear)."""
    out = [np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
           for img in images]
    return np.stack(out)


def pixcorr(generated: np.ndarray, reference: np.ndarray, size: int = RESIZE_LOW_LEVEL) -> np.ndarray:
    """Per-pair Pearson correlation of the flattened pixels at `size` px: [N]."""
    a = _resized(generated, size).reshape(len(generated), -1)
    b = _resized(reference, size).reshape(len(reference), -1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    denom = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    return np.divide((a * b).sum(1), denom, out=np.zeros(len(a)), where=denom > 0)


def ssim_gray(generated: np.ndarray, reference: np.ndarray, size: int = RESIZE_LOW_LEVEL) -> np.ndarray:
    """Per-pair SSIM of the grey-scale images at `size` px (MindEye's settings): [N]."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    gen, ref = rgb2gray(_resized(generated, size)), rgb2gray(_resized(reference, size))
    return np.array([structural_similarity(g, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0) for g, r in zip(gen, ref)])


# ---------------------------------------------------------------------------------------------
# Feature comparisons


def _standardised(features: np.ndarray) -> np.ndarray:
    x = features.astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def two_way_identification(reference: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """reference, generated: features [N, D] of the ground truths and of one generated image each.
    Per generated image j: the fraction of i != j with corr(ref_i, gen_j) < corr(ref_j, gen_j): [N]."""
    if len(reference) < 2:
        raise ConfigError("two-way identification needs at least 2 trials")
    r = _standardised(reference) @ _standardised(generated).T  # r[i, j] = corr(ref_i, gen_j)
    own = np.diag(r)
    return (r < own[None, :]).sum(0) / (len(reference) - 1)


def correlation_distance(reference: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Per pair 1 - Pearson r of the features: [N]."""
    return 1.0 - (_standardised(reference) * _standardised(generated)).sum(1)


def _swav_state(state: dict) -> dict:
    """The SwAV release's ResNet-50 keys -> torchvision's (drop `module.` and the SwAV heads)."""
    state = state.get("state_dict", state)
    out = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in out.items() if not k.startswith(("projection_head", "prototypes"))}


class FeatureNetwork(nn.Module):
    """A torchvision backbone from a local weights file, returning the flattened features of one node."""

    def __init__(self, metric: str, weights: str | Path):
        super().__init__()
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor

        from .io import safe_torch_load

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
    def forward(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 features [N, D]."""
        from torchvision.transforms.v2 import functional as TF

        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.mean.device)
        x = TF.resize(x, self.spec.resize, antialias=True).float().div(255)
        feats = self.extractor((x - self.mean) / self.std)["features"]
        return feats.flatten(1).float().cpu().numpy()


class ReconstructionScores:
    """Accumulates what the set-level metrics need (features per trial and slot), then scores them.

    networks: metric -> a callable uint8 [N, H, W, 3] -> features [N, D] (FeatureNetwork, or for
    "clip_2way" the CLIP image embedder)."""

    def __init__(self, metrics: Sequence[str], networks: dict[str, object]):
        self.metrics = list(metrics)
        self.networks = networks
        self.low: dict[str, list[np.ndarray]] = {m: [] for m in self.metrics if m in LOW_LEVEL_METRICS}
        self.ref_feats: dict[str, list[np.ndarray]] = {m: [] for m in self.metrics if m not in LOW_LEVEL_METRICS}
        self.gen_feats: dict[str, list[np.ndarray]] = {m: [] for m in self.ref_feats}

    def add(self, references: np.ndarray, generated: np.ndarray, n_slots: int) -> None:
        """references: uint8 [B, H, W, 3]; generated: uint8 [B * n_slots, H, W, 3] (trial-major)."""
        ref_rep = np.repeat(references, n_slots, axis=0)
        for name, fn in (("pixcorr", pixcorr), ("ssim_gray", ssim_gray)):
            if name in self.low:
                self.low[name].append(fn(generated, ref_rep).reshape(len(references), n_slots))
        for name in self.ref_feats:
            net = self.networks[name]
            ref, gen = net(references), net(generated)
            self.ref_feats[name].append(ref.astype(np.float16))  # halves the memory of a full test set
            self.gen_feats[name].append(gen.reshape(len(references), n_slots, -1).astype(np.float16))

    def per_image(self) -> dict[str, np.ndarray]:
        """metric -> [n_trials, n_slots]."""
        out = {name: np.concatenate(chunks) for name, chunks in self.low.items() if chunks}
        for name, chunks in self.ref_feats.items():
            if not chunks:
                continue
            ref, gen = np.concatenate(chunks), np.concatenate(self.gen_feats[name])
            kind = "two_way" if name == "clip_2way" else FEATURE_METRICS[name].kind
            fn = two_way_identification if kind == "two_way" else correlation_distance
            out[name] = np.stack([fn(ref, gen[:, k]) for k in range(gen.shape[1])], axis=1)
        return out
