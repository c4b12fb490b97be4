"""The image classifier behind the n-way accuracy: PIL images in, probabilities out, through its library's
own preprocessing.

Specs accepted by `load_classifier(spec, weights=None)`:
  - "torchvision:vit_h_14" - the paper's classifier, `ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1`, with
    `weights.transforms()` (bicubic resize to 518, centre crop 518, ImageNet mean/std). Weights from
    the local file `weights` (torchvision's `vit_h_14_swag-80465313.pth`); with no file given,
    torchvision downloads them, which is refused in offline mode. Any other torchvision
    classification model name works the same way with its DEFAULT weights' transforms.
  - "timm:<name>" - a timm ImageNet model; weights from `weights` (.safetensors / .pth / .bin), or
    timm's pretrained download when online and no file is given. Preprocessing:
    `timm.data.resolve_data_config` + `timm.data.create_transform`.
  - a local folder with `classifier.json` ({"library": "timm", "name", "kwargs", "image_size",
    "mean", "std", "class_names"}) and `model.safetensors` (see `save_local_classifier`); its
    preprocessing is timm's `create_transform` at `image_size` with the saved mean/std.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision.models import get_model_weights

from dreamdiffusion.core.compat import is_offline_mode
from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.files import atomic_path, atomic_write_json


class ImageClassifier(nn.Module):
    """A frozen classifier with its library's preprocessing.

    `transform(image)`: a PIL RGB image -> float [3, S, S]; `forward(pixel_values)` -> softmax
    probabilities [B, n_classes]; `classify(images)`: PIL images -> probabilities [N, n_classes]
    (CPU, float32), in chunks (ViT-H at 518 px is memory-hungry).
    """

    def __init__(self, model: nn.Module, transform: Callable[[Image.Image], torch.Tensor],
                 class_names: Sequence[str] | None = None, name: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.transform = transform
        self.class_names = list(class_names) if class_names is not None else None
        n_outputs = getattr(model, "num_classes", None)
        if self.class_names and n_outputs is not None and n_outputs != len(self.class_names):
            raise CheckpointError(f"classifier {name or type(model).__name__}: {len(self.class_names)} class names for a "
                                  f"model of {n_outputs} classes - its class_names (classifier.json) must list one name "
                                  "per class (save it again with save_local_classifier)")
        # known without a forward pass: from the class names, else timm's `num_classes`
        self.n_classes = len(self.class_names) if self.class_names else n_outputs
        self.name = name
        self.eval()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        return self.model(pixel_values.to(param.device, param.dtype)).float().softmax(dim=-1)

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image], chunk: int = 8) -> torch.Tensor:
        out = []
        for start in range(0, len(images), chunk):
            pixels = torch.stack([self.transform(img.convert("RGB")) for img in images[start:start + chunk]])
            out.append(self(pixels).cpu())
        return torch.cat(out)

    def train(self, mode: bool = True) -> ImageClassifier:
        return super().train(False)  # frozen: never leaves eval mode


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"classifier weights not found: {path} "
                              "(run code/download_weights.py or see pretrains/README.md)")
    if path.suffix == ".safetensors":

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"classifier weights {path} could not be read as safetensors: {err}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"classifier weights {path} could not be read as a state dict: {err}") from err
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"classifier weights {path} hold a {type(state).__name__}, expected a state dict")
    return state


def _load_strict(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"classifier weights {path} do not match the model: {err}") from err


def torchvision_weights(name: str):
    """The torchvision weights enum entry the n-way protocol uses for model `name` (the paper's ViT-H/14
    is the SWAG end-to-end fine-tune at 518 px, its DEFAULT)."""

    try:
        weight_enum = get_model_weights(name)
    except ValueError as err:
        raise ConfigError(f"unknown torchvision model '{name}' in classifier spec") from err
    return weight_enum.IMAGENET1K_SWAG_E2E_V1 if name == "vit_h_14" else weight_enum.DEFAULT


def _torchvision_classifier(name: str, weights: Path | None) -> ImageClassifier:

    chosen = torchvision_weights(name)
    kwargs = {"image_size": chosen.meta["min_size"][0]} if name.startswith("vit_") else {}
    if weights is not None:
        state = _load_state_dict_file(weights)  # before building: a missing file fails fast
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        _load_strict(model, state, weights)
    elif is_offline_mode():
        raise CheckpointError(f"classifier 'torchvision:{name}' needs its weights file in offline mode "
                              f"(torchvision's {Path(chosen.url).name}; set classifier_weights, "
                              "see pretrains/README.md)")
    else:
        model = torchvision.models.get_model(name, weights=chosen)
    return ImageClassifier(model, chosen.transforms(), class_names=chosen.meta["categories"],
                           name=f"torchvision:{name}")


def _timm_classifier(name: str, weights: Path | None, kwargs: dict | None = None,
                     image_size: int | None = None, mean=None, std=None,
                     class_names: Sequence[str] | None = None, spec: str = "") -> ImageClassifier:

    if weights is None and is_offline_mode():
        raise CheckpointError(f"classifier '{spec}' needs a local weights file in offline mode")
    state = _load_state_dict_file(weights) if weights is not None else None
    try:
        model = timm.create_model(name, pretrained=weights is None, **(kwargs or {}))
    except (RuntimeError, ValueError, TypeError) as err:
        raise ConfigError(f"timm cannot build classifier '{name}': {err}") from err
    if state is not None:
        _load_strict(model, state, weights)
    if image_size is not None:  # the local-folder format says how its model sees images
        data = {"input_size": (3, image_size, image_size), "interpolation": "bicubic", "crop_pct": 1.0,
                "mean": tuple(mean), "std": tuple(std)}
    else:
        data = resolve_data_config({}, model=model)
    return ImageClassifier(model, create_transform(**data, is_training=False), class_names=class_names, name=spec)


def classifier_classes(spec: str, weights: str | os.PathLike | None = None) -> int | None:
    """How many classes `spec` predicts, known without building it (None when only the weights say),
    and a CheckpointError / ConfigError now, not after hours of generation, for a missing file or an
    unknown name."""
    weights_path = Path(weights) if weights not in (None, "") else None
    if weights_path is not None and not weights_path.is_file():
        raise CheckpointError(f"classifier weights not found: {weights_path} (see pretrains/README.md)")
    if spec.startswith("torchvision:"):
        chosen = torchvision_weights(spec.split(":", 1)[1])
        if weights_path is None and is_offline_mode():
            raise CheckpointError(f"classifier '{spec}' needs its weights file in offline mode (torchvision's "
                                  f"{Path(chosen.url).name}; set classifier_weights, see pretrains/README.md)")
        return len(chosen.meta["categories"])
    if spec.startswith("timm:"):

        name = spec.split(":", 1)[1]
        if not timm.is_model(name):
            raise ConfigError(f"timm has no model '{name}' (classifier={spec})")
        if weights_path is None and is_offline_mode():
            raise CheckpointError(f"classifier '{spec}' needs a local weights file in offline mode")
        return None
    meta = _folder_meta(spec)
    names, declared = meta.get("class_names"), (meta.get("kwargs") or {}).get("num_classes")
    if names and declared is not None and len(names) != declared:
        raise CheckpointError(f"{Path(spec) / 'classifier.json'} lists {len(names)} class names for a model of "
                              f"{declared} classes (kwargs.num_classes): one name per class is needed (save the "
                              "classifier again with save_local_classifier)")
    return len(names) if names else declared


def _folder_meta(spec: str) -> dict[str, Any]:
    """classifier.json of a local classifier folder, checked to be a JSON object."""
    meta_path = Path(spec) / "classifier.json"
    if not meta_path.is_file():
        raise ConfigError(f"classifier '{spec}' is neither 'torchvision:<name>', 'timm:<name>' nor a folder "
                          "holding classifier.json + model.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ConfigError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def check_n_way(spec: str, weights: str | os.PathLike | None, n_way: int, top_k: int = 1, where: str = "") -> None:
    """`top_k <= n_way <= the classifier's classes`, or a ConfigError naming both - before any work."""
    n_classes = classifier_classes(spec, weights)
    if n_classes is not None and not top_k <= n_way <= n_classes:
        raise ConfigError(f"{where}n_way={n_way}, top_k={top_k}: need top_k <= n_way <= the classifier's {n_classes} "
                          f"classes (classifier={spec})")


def load_classifier(spec: str, weights: str | os.PathLike | None = None) -> ImageClassifier:
    """The classifier named by `spec` (see the module docstring), in eval mode, frozen."""
    weights_path = Path(weights) if weights not in (None, "") else None
    if spec.startswith("torchvision:"):
        return _torchvision_classifier(spec.split(":", 1)[1], weights_path)
    if spec.startswith("timm:"):
        return _timm_classifier(spec.split(":", 1)[1], weights_path, spec=spec)
    folder = Path(spec)
    meta = _folder_meta(spec)
    if meta.get("library") != "timm" or "name" not in meta:
        raise ConfigError(f"{folder / 'classifier.json'} must say {{\"library\": \"timm\", \"name\": ...}}, got {meta}")
    return _timm_classifier(meta["name"], weights_path or folder / "model.safetensors", meta.get("kwargs"),
                            meta.get("image_size"), meta.get("mean"), meta.get("std"),
                            meta.get("class_names"), spec=str(folder))


def save_local_classifier(model: nn.Module, out_dir: str | os.PathLike, name: str, kwargs: dict,
                          image_size: int, mean: Sequence[float], std: Sequence[float],
                          class_names: Sequence[str] | None = None) -> Path:
    """Write a timm model in the local-folder format that `load_classifier(out_dir)` reads back."""

    out = Path(out_dir)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_json(out / "classifier.json", {
        "library": "timm", "name": name, "kwargs": dict(kwargs), "image_size": int(image_size),
        "mean": list(mean), "std": list(std), "class_names": list(class_names) if class_names else None,
    })
    return out
