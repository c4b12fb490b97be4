"""The image classifier behind the n-way accuracy: images in [-1, 1] at any size in, probabilities out.

Specs accepted by `load_classifier(spec, weights=None)`:
  - "torchvision:vit_h_14" - the paper's classifier, `ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1` with
    its own preprocessing (bicubic resize to 518, centre crop 518, ImageNet mean/std). Weights from
    the local file `weights` (torchvision's `vit_h_14_swag-80465313.pth`); with no file given,
    torchvision downloads them, which is refused when HF_HUB_OFFLINE=1 (the project's offline mode).
    Any other torchvision classification model name works the same way with its DEFAULT weights.
  - "timm:<name>" - a timm ImageNet model; weights from `weights` (.safetensors / .pth / .bin), or
    timm's pretrained download when online and no file is given. Preprocessing from timm's data config.
  - a local folder with `classifier.json` ({"library": "timm", "name", "kwargs", "image_size",
    "mean", "std", "class_names"}) and `model.safetensors` (see `save_local_classifier`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .io import atomic_path, atomic_write_json


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class ImageClassifier(nn.Module):
    """A classifier with its own preprocessing.

    forward(images [B, 3, H, W] in [-1, 1], any H, W) -> probabilities [B, n_classes] (softmax).
    Preprocessing: resize the shortest side to `resize_size` (`interpolation`, antialiased), centre
    crop `crop_size`, normalise with `mean` / `std`.
    """

    def __init__(self, model: nn.Module, crop_size: int, resize_size: int, mean: Sequence[float],
                 std: Sequence[float], interpolation: str = "bicubic",
                 class_names: Sequence[str] | None = None, name: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.crop_size = int(crop_size)
        self.resize_size = int(resize_size)
        self.interpolation = interpolation
        self.class_names = list(class_names) if class_names is not None else None
        # known without a forward pass: from the class names, else timm's `num_classes`
        self.n_classes = len(self.class_names) if self.class_names else getattr(model, "num_classes", None)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.float().clamp(-1, 1) + 1) / 2
        h, w = images.shape[-2:]
        scale = self.resize_size / min(h, w)
        new_h, new_w = max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale))
        if (new_h, new_w) != (h, w):
            images = F.interpolate(images, size=(new_h, new_w), mode=self.interpolation,
                                   align_corners=False if self.interpolation != "nearest" else None,
                                   antialias=self.interpolation in ("bilinear", "bicubic")).clamp(0, 1)
        top, left = (new_h - self.crop_size) // 2, (new_w - self.crop_size) // 2
        images = images[..., top : top + self.crop_size, left : left + self.crop_size]
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        logits = self.model(self.preprocess(images.to(param.device)).to(param.dtype))
        return logits.float().softmax(dim=-1)


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"classifier weights not found: {path} "
                              "(run code/download_weights.py or see pretrains/README.md)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"classifier weights {path} could not be read as a state dict: {err}") from err
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_strict(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"classifier weights {path} do not match the model: {err}") from err


def _torchvision_classifier(name: str, weights: Path | None) -> ImageClassifier:
    import torchvision
    from torchvision.models import get_model_weights

    try:
        weight_enum = get_model_weights(name)
    except ValueError as err:
        raise ConfigError(f"unknown torchvision model '{name}' in classifier spec") from err
    # The paper's ViT-H/14 is the SWAG end-to-end fine-tune at 518 px (its DEFAULT).
    chosen = weight_enum.IMAGENET1K_SWAG_E2E_V1 if name == "vit_h_14" else weight_enum.DEFAULT
    transform = chosen.transforms()
    kwargs = {"image_size": chosen.meta["min_size"][0]} if name.startswith("vit_") else {}
    if weights is not None:
        state = _load_state_dict_file(weights)  # before building: a missing file fails fast
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        _load_strict(model, state, weights)
    elif _offline():
        raise CheckpointError(f"classifier 'torchvision:{name}' needs its weights file in offline mode "
                              f"(torchvision's {Path(chosen.url).name}; set classifier_weights, "
                              "see pretrains/README.md)")
    else:
        model = torchvision.models.get_model(name, weights=chosen)
    return ImageClassifier(model, crop_size=transform.crop_size[0], resize_size=transform.resize_size[0],
                           mean=transform.mean, std=transform.std,
                           interpolation=transform.interpolation.value,
                           class_names=chosen.meta["categories"], name=f"torchvision:{name}")


def _timm_classifier(name: str, weights: Path | None, kwargs: dict | None = None,
                     image_size: int | None = None, mean=None, std=None,
                     class_names: Sequence[str] | None = None, spec: str = "") -> ImageClassifier:
    import timm

    if weights is None and _offline():
        raise CheckpointError(f"classifier '{spec}' needs a local weights file in offline mode")
    state = _load_state_dict_file(weights) if weights is not None else None
    try:
        model = timm.create_model(name, pretrained=weights is None, **(kwargs or {}))
    except RuntimeError as err:
        raise ConfigError(f"timm cannot build classifier '{name}': {err}") from err
    if state is not None:
        _load_strict(model, state, weights)
    if image_size is not None:
        crop, resize, interpolation = image_size, image_size, "bicubic"
    else:
        data = timm.data.resolve_data_config({}, model=model)
        crop = data["input_size"][-1]
        resize = math.floor(crop / data.get("crop_pct", 1.0))
        interpolation = data.get("interpolation", "bicubic")
        mean, std = data["mean"], data["std"]
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"
    return ImageClassifier(model, crop_size=crop, resize_size=resize, mean=mean or (0.485, 0.456, 0.406),
                           std=std or (0.229, 0.224, 0.225), interpolation=interpolation,
                           class_names=class_names, name=spec)


def load_classifier(spec: str, weights: str | os.PathLike | None = None) -> ImageClassifier:
    """The classifier named by `spec` (see the module docstring), in eval mode, frozen."""
    weights_path = Path(weights) if weights not in (None, "") else None
    if spec.startswith("torchvision:"):
        return _torchvision_classifier(spec.split(":", 1)[1], weights_path)
    if spec.startswith("timm:"):
        return _timm_classifier(spec.split(":", 1)[1], weights_path, spec=spec)
    folder = Path(spec)
    meta_path = folder / "classifier.json"
    if not meta_path.is_file():
        raise ConfigError(f"classifier '{spec}' is neither 'torchvision:<name>', 'timm:<name>' nor a folder "
                          "holding classifier.json + model.safetensors")
    meta = json.loads(meta_path.read_text())
    if meta.get("library") != "timm" or "name" not in meta:
        raise ConfigError(f"{meta_path} must say {{\"library\": \"timm\", \"name\": ...}}, got {meta}")
    return _timm_classifier(meta["name"], weights_path or folder / "model.safetensors", meta.get("kwargs"),
                            meta.get("image_size"), meta.get("mean"), meta.get("std"),
                            meta.get("class_names"), spec=str(folder))


def save_local_classifier(model: nn.Module, out_dir: str | os.PathLike, name: str, kwargs: dict,
                          image_size: int, mean: Sequence[float], std: Sequence[float],
                          class_names: Sequence[str] | None = None) -> Path:
    """Write a timm model in the local-folder format that `load_classifier(out_dir)` reads back."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_json(out / "classifier.json", {
        "library": "timm", "name": name, "kwargs": dict(kwargs), "image_size": int(image_size),
        "mean": list(mean), "std": list(std), "class_names": list(class_names) if class_names else None,
    })
    return out
