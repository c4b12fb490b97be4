"""Work done once in stage 2: per-image results of frozen networks, computed once and kept on disk.

Stage 2 runs the frozen CLIP image tower on the same un-augmented image at every step of every
epoch (300 epochs: 300 times per image), and its output never changes. This module computes such
per-image features once, keeps them in a file whose name and contents carry a fingerprint of what
made them, and hands them to the training items:

    clip_embeds      [clip_dim]      the CLIP image embedding of the original image (the alignment target)
    latent_moments   [8, S/8, S/8]   the VAE posterior (mean | log-variance) of the un-cropped image at
                                     `image_size` (with cache_latents; each step still draws its own
                                     posterior sample, but the random crop is off: a deviation)

A cache file `<cache_dir>/<feature>-<key hash>.safetensors` holds one row per image and, in its
metadata, the key (the network's weights hash, its preprocessing, the precision and device type it
ran with, and every image's path, size and modification time) and the image paths. Another network,
a changed image or another precision gives another key, hence another file: a file is never reused
for inputs it was not made from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dreamdiffusion.core.files import atomic_path
from dreamdiffusion.data.check_record import fingerprint
from dreamdiffusion.data.common import open_rgb, resize_square, to_unit_range

logger = logging.getLogger(__name__)

FORMAT = "dreamdiffusion-stage2-cache/1"
FEATURES = ("clip_embeds", "latent_moments")


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of a network's state (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    return [[str(p), *fingerprint(p)] for p in paths]


def cache_file(cache_dir: Path, feature: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{feature}-{digest}.safetensors"


def _read(path: Path, key: dict[str, Any], names: list[str]) -> torch.Tensor | None:
    """The cached rows of `path` if it holds this key and these images, else None (logged)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            same = json.loads(metadata["key"]) == key and json.loads(metadata["names"]) == names
            rows = f.get_tensor("rows") if same else None
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring the stage-2 cache %s: it cannot be read (%s)", path, err)
        return None
    if rows is None:
        logger.warning("ignoring the stage-2 cache %s: it was made from other inputs", path)
    return rows


def _write(path: Path, rows: torch.Tensor, key: dict[str, Any], names: list[str]) -> None:
    try:
        with atomic_path(path) as tmp:
            save_file({"rows": rows.contiguous()}, str(tmp), metadata={
                "format": FORMAT, "key": json.dumps(key, sort_keys=True), "names": json.dumps(names)})
    except OSError as err:
        logger.warning("cannot write the stage-2 cache %s (%s): the next run computes it again", path, err)


class _ImageFiles(Dataset):
    """Each image once: the input a feature is computed from (`prepare(PIL image) -> tensor`)."""

    def __init__(self, paths: Sequence[Path], prepare: Callable[[Any], torch.Tensor]):
        self.paths, self.prepare = list(paths), prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.prepare(open_rgb(self.paths[i]))


class UnaugmentedImage:
    """A PIL image -> float32 [3, size, size] in [-1, 1]: the training image without its random crop
    (`data.common.image_fields`' first step). Picklable, for DataLoader workers."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: Any) -> torch.Tensor:
        return resize_square(to_unit_range(image), self.size)

    def __repr__(self) -> str:
        return f"UnaugmentedImage({self.size})"


def load_or_compute(feature: str, key: dict[str, Any], paths: Sequence[Path], prepare: Callable,
                    network: Callable[[torch.Tensor], torch.Tensor], cache_dir: Path | None, device: torch.device,
                    batch_size: int = 16, num_workers: int = 0, write: bool = True) -> torch.Tensor:
    """`network(prepare(image))` for every image of `paths`, as rows [N, ...] in fp32 on the CPU: read
    from the cache file of `key` when there is one, else computed (in batches, under no_grad) and, with
    `write`, saved there."""
    names = [str(p) for p in paths]
    path = None if cache_dir is None else cache_file(cache_dir, feature, key)
    rows = None if path is None else _read(path, key, names)
    if rows is not None:
        logger.info("stage 2: %s of %d images read from %s", feature, len(names), path)
        return rows
    started = time.perf_counter()
    loader = DataLoader(_ImageFiles(paths, prepare), batch_size=batch_size, num_workers=num_workers)
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append(network(batch.to(device)).float().cpu())
    rows = torch.cat(out)
    logger.info("stage 2: %s of %d images computed in %.1f s%s", feature, len(names), time.perf_counter() - started,
                f", kept in {path}" if path is not None and write else "")
    if path is not None and write:
        _write(path, rows, key, names)
    return rows


class WithImageFeatures(Dataset):
    """A paired dataset (ImageNet-EEG or THINGS-EEG2) whose items also carry per-image features
    computed once (`install`): `clip_embeds` replaces `clip_pixel_values`, `latent_moments` comes
    with the crop off. Until `install`, items are the dataset's own. Other attributes are the dataset's."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.features: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "features", "rows"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def image_paths(self) -> list[Path]:
        """Every image the dataset's items use, each once, in first-use order."""
        return list(dict.fromkeys(Path(self.dataset.image_path(i)) for i in range(len(self.dataset))))

    def install(self, paths: Sequence[Path], features: dict[str, torch.Tensor]) -> None:
        self.rows = {str(p): k for k, p in enumerate(paths)}
        self.features = dict(features)
        if "clip_embeds" in features:
            self.dataset.clip_transform = None  # the CLIP input is no longer prepared per item
        if "latent_moments" in features:
            self.dataset.crop_probability = 0.0  # the latents are of the un-cropped image

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if self.features:
            row = self.rows[str(Path(self.dataset.image_path(i)))]
            item.update({name: rows[row] for name, rows in self.features.items()})
            if "latent_moments" in self.features:
                item.pop("image", None)  # not needed by the step: no 512 px image through the loader's queue
        return item


def cache_key(network: nn.Module, paths: Sequence[Path], precision: str, device: torch.device,
              **what: Any) -> dict[str, Any]:
    """The key of a cache file: the network's weights, what prepared its input (`what`), the precision
    and device type it ran with, and the images (path, size, mtime)."""
    return {"format": FORMAT, "weights": module_fingerprint(network), **{k: str(v) for k, v in what.items()},
            "precision": precision, "device": device.type, "images": images_fingerprint(paths)}


def default_cache_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "cache"
