"""ImageNet-EEG and unpaired EEG, loaded exactly as the authors' code does (docs/method.md, "Data").

`ImageNetEEGDataset` (stages 2 and 3) reads `eeg_5_95_std.pth` and a `block_splits_by_image_*.pth`
file (Spampinato et al. 2017). The authors' rules, in order:
  1. keep the trials of one subject (0 = all subjects), in file order;
  2. a split's indices are positions in that subject-filtered list; an index is kept only if it
     is a valid position and the trial has `min_trial_length <= T <= max_trial_length` samples,
     in the order the split file lists them (the authors wrote `i <= len(data)`, which crashes
     when an index equals the length; we use `i < len(data)`);
  3. EEG: samples `time_window` = [20, 460) of every channel (Python slice semantics, so a trial of
     450..459 samples gives a shorter window, as in the authors' code), then linear interpolation
     along time to `n_times` = 512 samples with the end points aligned (the authors use scipy
     `interp1d` from `linspace(0, 1, L)` to `linspace(0, 1, 512)`; `resample_linear` computes the
     same maths in float64);
  4. image: RGB, values in [-1, 1], resized to `image_size` x `image_size` (aspect ratio not kept);
     with `augment`, with probability `crop_probability` a random square crop of side
     `image_size - int(crop_ratio * image_size)` of the resized image, resized back (the authors'
     Resize -> random_crop -> Resize); `clip_pixel_values` is the un-augmented original image
     through the alignment target's own preprocessing (default: CLIP ViT-L/14's processor).
The content is checked when a dataset is built (`check_trial_content`: floating EEG, one channel
count, finite values in the window; every image decoded once with `check_images`).
A missing image is an error naming its path: never a substitute (the authors' HEAD silently used
random noise when no image folder was given).

`EEGPretrainDataset` (stage 1) reads every `*.npy` (channels x time) below a folder, as the
authors' stage-1 loader: random `n_times` crop (linear interpolation when shorter), channels tiled
up to `n_channels` or a random contiguous block of them, times `scale` (their `/10`).

`python -m dreamdiffusion.dataset check --eeg ... --splits ... --images ...` reports what the
rules keep and every missing image.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .errors import CheckpointError, ConfigError, DataError, run_cli
from .io import atomic_write_text, safe_torch_load

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation (the statistics CLIP ViT-L/14 was trained with); the demo's tiny CLIP
# is trained with them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DATA_README = "datasets/README.md"
EEG_FILE_KEYS = ("dataset", "labels", "images")
TRIAL_KEYS = ("eeg", "image", "label", "subject")


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path} ({DATA_README} explains where to get it)")
    return path


def _load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """A user-downloaded .pth, read without running pickled code (weights_only first)."""
    path = _require_file(path, what)
    try:
        return safe_torch_load(path, what)
    except CheckpointError as err:
        raise DataError(str(err)) from err


# ---------------------------------------------------------------------------------------------
# ImageNet-EEG files


@dataclass
class EEGFile:
    """The validated content of `eeg_5_95_std.pth`."""

    trials: list[dict]  # {"eeg": FloatTensor [C, T], "image": int, "label": int, "subject": int}
    wnids: list[str]  # the file's "labels": class index -> WordNet id
    image_names: list[str]  # the file's "images": image index -> "<wnid>_<number>"
    path: Path


def as_index(value: Any, what: str) -> int:
    """An integer field of a data file (a Python int, a numpy integer or a 0-d integer tensor), or a
    DataError naming `what`: a float, a string or a bool is not silently converted."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    shown = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}, {value.dtype}"
    raise DataError(f"{what} is {shown} ({type(value).__name__}), expected an integer")


def _check_trial(trial: Any, i: int, path: Any, n_labels: int, n_images: int) -> None:
    missing = [k for k in TRIAL_KEYS if not isinstance(trial, dict) or k not in trial]
    if missing:
        raise DataError(f"EEG file {path}: trial {i} of 'dataset' has no key '{missing[0]}' "
                        f"(each trial needs {list(TRIAL_KEYS)})")
    eeg = trial["eeg"]
    if not isinstance(eeg, torch.Tensor) or eeg.ndim != 2:
        raise DataError(f"EEG file {path}: trial {i} 'eeg' is not a 2-D tensor [channels, time] "
                        f"(got {getattr(eeg, 'shape', type(eeg).__name__)})")
    if not eeg.is_floating_point():
        raise DataError(f"EEG file {path}: trial {i} 'eeg' has dtype {eeg.dtype}, expected floating point "
                        "(the released file holds float32)")
    if min(eeg.shape) < 1:
        raise DataError(f"EEG file {path}: trial {i} 'eeg' is empty (shape {tuple(eeg.shape)})")
    label = as_index(trial["label"], f"EEG file {path}: trial {i}'s 'label'")
    image = as_index(trial["image"], f"EEG file {path}: trial {i}'s 'image'")
    as_index(trial["subject"], f"EEG file {path}: trial {i}'s 'subject'")
    if not 0 <= label < n_labels:
        raise DataError(f"EEG file {path}: trial {i} has label {label}, outside the {n_labels} entries of 'labels'")
    if not 0 <= image < n_images:
        raise DataError(f"EEG file {path}: trial {i} has image {image}, outside the {n_images} entries of 'images'")


def _string_list(value: Any, key: str, path: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"EEG file {path}: '{key}' must be a list of strings, got {type(value).__name__}"
                        + (f" holding {type(next(v for v in value if not isinstance(v, str))).__name__}"
                           if isinstance(value, (list, tuple)) else ""))
    return list(value)


def check_dict_file(loaded: Any, keys: Sequence[str], path: Any, what: str = "EEG file") -> None:
    """A data file that must hold a dict with `keys`: a DataError naming the file and the key otherwise."""
    if not isinstance(loaded, dict):
        raise DataError(f"{what} {path} holds a {type(loaded).__name__}, expected a dict with keys {list(keys)}")
    for key in keys:
        if key not in loaded:
            raise DataError(f"{what} {path} has no key '{key}' (keys present: {sorted(map(str, loaded))}; "
                            f"expected {list(keys)})")


def check_split_images(paths: Sequence[Path], split: str, image_dir: Any, where: str, decode: bool = True) -> None:
    """The images of a split: a DataError for any that is missing (how many, the first ten, `where`
    they go) or, with `decode`, that cannot be decoded."""
    paths = list(dict.fromkeys(paths))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n  ".join(map(str, missing[:10]))
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} image(s) of split '{split}' not found under {image_dir} ({where}):\n  "
                        f"{shown}{more}")
    broken = unreadable_images(paths) if decode else []
    if broken:
        path, why = broken[0]
        raise DataError(f"{len(broken)} image(s) of split '{split}' cannot be decoded, e.g. {path}: {why}")


def load_eeg_file(path: str | os.PathLike) -> EEGFile:
    """Read and check `eeg_5_95_std.pth`: its keys, and every trial's keys, types and indices; a
    problem is a `DataError` naming the trial and the field."""
    loaded = _load_torch_file(path, "EEG file")
    check_dict_file(loaded, EEG_FILE_KEYS, path)
    if not isinstance(loaded["dataset"], (list, tuple)):
        raise DataError(f"EEG file {path}: 'dataset' is a {type(loaded['dataset']).__name__}, expected a list of trials")
    trials = list(loaded["dataset"])
    wnids = _string_list(loaded["labels"], "labels", path)
    image_names = _string_list(loaded["images"], "images", path)
    if not trials:
        raise DataError(f"EEG file {path}: 'dataset' holds no trials")
    for i, trial in enumerate(trials):
        _check_trial(trial, i, path, len(wnids), len(image_names))
    return EEGFile(trials=trials, wnids=wnids, image_names=image_names, path=Path(path))


def load_splits_file(path: str | os.PathLike) -> list[dict[str, list[int]]]:
    """Read `block_splits_by_image_*.pth`: the list under its key 'splits' (each a dict of index lists)."""
    loaded = _load_torch_file(path, "splits file")
    if not isinstance(loaded, dict) or "splits" not in loaded:
        keys = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise DataError(f"splits file {path} has no key 'splits' (found: {keys})")
    if not isinstance(loaded["splits"], (list, tuple)) or not loaded["splits"]:
        raise DataError(f"splits file {path}: 'splits' must be a non-empty list of dicts, got "
                        f"{type(loaded['splits']).__name__}")
    splits = list(loaded["splits"])
    for n, split in enumerate(splits):
        if not isinstance(split, dict):
            raise DataError(f"splits file {path}: splits[{n}] is a {type(split).__name__}, expected a dict "
                            f"of index lists like {{'train': [...], 'val': [...], 'test': [...]}}")
        for name, indices in split.items():
            if not isinstance(indices, (list, tuple)):
                raise DataError(f"splits file {path}: splits[{n}]['{name}'] is a {type(indices).__name__}, "
                                "expected a list of trial positions")
            for k, i in enumerate(indices):
                as_index(i, f"splits file {path}: splits[{n}]['{name}'][{k}]")
    return splits


def select_subject(trials: list[dict], subject: int, path: Path | str = "") -> list[dict]:
    """The trials of `subject` in file order (subject 0 = every trial)."""
    if subject == 0:
        selected = list(trials)
    else:
        selected = [t for t in trials if int(t["subject"]) == subject]
    if not selected:
        present = sorted({int(t["subject"]) for t in trials})
        raise DataError(f"subject {subject} has no trials in {path} (subjects present: {present}; "
                        "0 selects all of them)")
    return selected


def split_indices(
    splits: list[dict[str, list[int]]],
    split: str,
    split_index: int,
    path: Path | str = "",
) -> list[int]:
    """The index list `splits[split_index][split]`, with errors that list what the file has."""
    if not 0 <= split_index < len(splits):
        raise DataError(f"split_index {split_index} is out of range: {path} holds {len(splits)} splits "
                        f"(0..{len(splits) - 1})")
    entry = splits[split_index]
    if split not in entry:
        raise DataError(f"split '{split}' is not in {path} (splits[{split_index}] holds: "
                        f"{', '.join(map(str, entry))})")
    return [as_index(i, f"{path}: splits[{split_index}]['{split}']") for i in entry[split]]


@dataclass
class SplitSelection:
    """Which split positions the authors' rules keep, and why the others are dropped."""

    positions: list[int]  # kept positions in the subject-filtered trial list, in split-file order
    n_listed: int  # indices the split file lists
    n_out_of_range: int  # indices that are not a valid position in the filtered list
    n_length_dropped: int  # valid positions whose trial length is outside [min, max]


def apply_split(
    filtered: list[dict],
    indices: Sequence[int],
    min_trial_length: int,
    max_trial_length: int,
) -> SplitSelection:
    """Keep index `i` if `0 <= i < len(filtered)` and the trial length is in range, in order."""
    positions, out_of_range, length_dropped = [], 0, 0
    for i in indices:
        if not 0 <= i < len(filtered):
            out_of_range += 1
        elif min_trial_length <= filtered[i]["eeg"].shape[-1] <= max_trial_length:
            positions.append(i)
        else:
            length_dropped += 1
    return SplitSelection(positions, len(indices), out_of_range, length_dropped)


def resample_linear(x: torch.Tensor, n_times: int) -> torch.Tensor:
    """`x [..., L]` -> float32 `[..., n_times]` by linear interpolation with the end points aligned.

    Output sample j sits at input position j * (L - 1) / (n_times - 1) - the same maths as the
    authors' scipy `interp1d(linspace(0, 1, L), x)(linspace(0, 1, n_times))` and as
    `F.interpolate(mode="linear", align_corners=True)`, but computed in float64 (torch's float32
    source positions are off by up to ~1e-5 near the end of a window).
    """
    length = x.shape[-1]
    if length == n_times:
        return x.float()
    position = torch.linspace(0, length - 1, n_times, dtype=torch.float64)
    left = position.floor().long().clamp(max=length - 2)
    weight = position - left
    x = x.double()
    return (x[..., left] * (1 - weight) + x[..., left + 1] * weight).float()


def window_and_resample(eeg: torch.Tensor, time_window: Sequence[int], n_times: int) -> torch.Tensor:
    """`eeg [C, T]` -> samples `time_window[0]:time_window[1]` linearly interpolated to `[C, n_times]`."""
    start, stop = time_window
    window = eeg[:, start:stop]
    if window.shape[-1] < 2:
        raise DataError(f"time window {list(time_window)} leaves {window.shape[-1]} samples of a trial of "
                        f"{eeg.shape[-1]}; at least 2 are needed to interpolate")
    return resample_linear(window, n_times).contiguous()


# ---------------------------------------------------------------------------------------------
# Images


def image_path(image_dir: str | os.PathLike, image_name: str) -> Path:
    """`<image_dir>/<wnid>/<image_name>.JPEG`, the ImageNet layout (`wnid` = name before '_')."""
    return Path(image_dir) / image_name.split("_")[0] / f"{image_name}.JPEG"


def _open_rgb(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path} ({DATA_README} explains where the ImageNet images go)")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder error means the file is damaged (see unreadable_images)
        raise DataError(f"image {path} could not be read: {type(err).__name__}: {err}") from err


def _to_unit_range(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size], bilinear with antialiasing (torchvision's Resize on tensors).

    The filter weights are non-negative, so values stay in [-1, 1].
    """
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """An image file -> float32 [3, image_size, image_size] in [-1, 1] (aspect ratio not kept)."""
    return _resize(_to_unit_range(_open_rgb(path)), image_size)


def default_clip_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP ViT-L/14's own preprocessing at `size` (transformers' classic CLIPImageProcessor):
    a PIL RGB image -> float32 [3, size, size]."""
    from .clip_embedder import ProcessorTransform

    return ProcessorTransform(size)


def random_crop_resize(image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """A random `crop_size` square of `image [3, S, S]`, resized back to S (torch's global RNG)."""
    size = image.shape[-1]
    top = int(torch.randint(0, image.shape[-2] - crop_size + 1, (1,)))
    left = int(torch.randint(0, size - crop_size + 1, (1,)))
    return _resize(image[:, top:top + crop_size, left:left + crop_size], size)


def trial_problems(eeg: Sequence[torch.Tensor], time_window: Sequence[int], path: Any, what: str,
                   names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(errors, notes) of the trials a run uses: one channel count, at least 2 samples in the time
    window, finite values inside it (errors, each naming the trial: `names[k]`, by default "trial k
    of <what>"); NaN/Inf outside the window (notes: those samples are not used)."""
    start, stop = time_window
    names = names or [f"trial {k} of {what}" for k in range(len(eeg))]
    errors, notes = [], []
    counts = Counter(int(e.shape[0]) for e in eeg)
    if len(counts) > 1:
        errors.append(f"EEG file {path}: the trials of {what} have different channel counts "
                      f"({', '.join(f'{n} trials of {c}' for c, n in sorted(counts.items()))})")
    for name, e in zip(names, eeg):
        window = e[:, start:stop]
        if window.shape[-1] < 2:
            errors.append(f"EEG file {path}: {name} has {e.shape[-1]} samples: the time window [{start}, {stop}) "
                          f"leaves {window.shape[-1]} (at least 2 are needed)")
        elif not torch.isfinite(window).all():
            errors.append(f"EEG file {path}: {name} holds NaN or Inf inside the time window [{start}, {stop}) "
                          f"({int((~torch.isfinite(window)).sum())} values)")
        elif not torch.isfinite(e).all():
            notes.append(f"{name} holds NaN/Inf outside the time window [{start}, {stop}) (those samples are not used)")
    return errors, notes


def check_trial_content(eeg: Sequence[torch.Tensor], time_window: Sequence[int], path: Any, what: str,
                        names: Sequence[str] | None = None) -> None:
    """`trial_problems`, raising the first error as a DataError."""
    errors, _ = trial_problems(eeg, time_window, path, what, names)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s): `python -m dreamdiffusion.dataset check` lists them)" \
            if len(errors) > 1 else ""
        raise DataError(errors[0] + more)


def unreadable_images(paths: Sequence[Path] | dict) -> list[tuple[Path, str]]:
    """(path, why) for every image that cannot be decoded (zero bytes, truncated, not an image)."""
    broken = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        # A damaged file can make PIL's decoders raise almost anything (OSError, SyntaxError,
        # struct.error, zlib.error, DecompressionBombError): all of them mean "cannot be decoded".
        except Exception as err:  # noqa: BLE001
            broken.append((Path(path), f"{type(err).__name__}: {err}" if str(err) else type(err).__name__))
    return broken


# ---------------------------------------------------------------------------------------------
# The paired dataset


class ImageNetEEGDataset(Dataset):
    """One split of ImageNet-EEG for one subject, as the authors' `EEGDataset` + `Splitter`.

    Item: `eeg` float32 [n_channels, n_times]; `label` int; `image_name`, `wnid` str; `index` (the
    item's position in this split); `subject` int; with `image_dir`: `image` float32
    [3, image_size, image_size] in [-1, 1] and `clip_pixel_values` float32
    [3, clip_image_size, clip_image_size] (`clip_transform` of the original image file; default
    CLIP ViT-L/14's processor at `clip_image_size`).
    """

    def __init__(
        self,
        eeg_path: str | os.PathLike,
        splits_path: str | os.PathLike,
        image_dir: str | os.PathLike | None = None,
        split: str = "train",
        split_index: int = 0,
        subject: int = 4,
        time_window: Sequence[int] = (20, 460),
        n_times: int = 512,
        min_trial_length: int = 450,
        max_trial_length: int = 600,
        image_size: int = 512,
        augment: bool = False,
        crop_probability: float = 0.5,
        crop_ratio: float = 0.2,
        clip_image_size: int = 224,
        clip_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        check_images: bool = True,
    ):
        if len(time_window) != 2 or not 0 <= time_window[0] < time_window[1]:
            raise ConfigError(f"time_window must be [start, stop) with 0 <= start < stop, got {list(time_window)}")
        if not 0.0 <= crop_probability <= 1.0:
            raise ConfigError(f"crop_probability must be in [0, 1], got {crop_probability}")
        if not 0.0 <= crop_ratio < 1.0:
            raise ConfigError(f"crop_ratio must be in [0, 1), got {crop_ratio}")
        self.eeg_path, self.splits_path = Path(eeg_path), Path(splits_path)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        if self.image_dir is not None and not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir} ({DATA_README} explains where the "
                            "ImageNet images go)")
        self.split, self.split_index, self.subject = split, split_index, subject
        self.time_window = (int(time_window[0]), int(time_window[1]))
        self.n_times = n_times
        self.image_size, self.clip_image_size = image_size, clip_image_size
        self.clip_transform = clip_transform or default_clip_transform(clip_image_size)
        self.augment, self.crop_probability = augment, crop_probability
        self.crop_size = image_size - int(crop_ratio * image_size)

        eeg_file = load_eeg_file(self.eeg_path)
        splits = load_splits_file(self.splits_path)
        indices = split_indices(splits, split, split_index, self.splits_path)
        filtered = select_subject(eeg_file.trials, subject, self.eeg_path)
        self.selection = apply_split(filtered, indices, min_trial_length, max_trial_length)
        # Keep only this split's trials, so the rest of the (multi-GB) file can be freed.
        trials = [filtered[i] for i in self.selection.positions]
        if not trials:
            raise DataError(f"split '{split}' (split_index {split_index}) of {self.splits_path} keeps no trial "
                            f"of subject {subject} after the length filter "
                            f"[{min_trial_length}, {max_trial_length}]")
        self.eeg = [t["eeg"] for t in trials]
        self.wnids = eeg_file.wnids
        self.labels = [int(t["label"]) for t in trials]
        self.image_names = [eeg_file.image_names[int(t["image"])] for t in trials]
        self.subjects = [int(t["subject"]) for t in trials]
        self.n_channels = int(self.eeg[0].shape[0])
        # The checks of `python -m dreamdiffusion.dataset check`, on this split's trials: a stage never
        # starts on data the check would reject.
        file_index = {id(t): i for i, t in enumerate(eeg_file.trials)}
        names = [f"dataset[{file_index[id(t)]}] (item {k} of split '{split}', subject {t['subject']})"
                 for k, t in enumerate(trials)]
        check_trial_content(self.eeg, self.time_window, self.eeg_path, f"split '{split}' of subject {subject}", names)
        if self.image_dir is not None:
            self._check_images(split, check_images)

    def _check_images(self, split: str, decode: bool) -> None:
        check_split_images([image_path(self.image_dir, n) for n in self.image_names], split, self.image_dir,
                           f"{DATA_README} explains where the ImageNet images go", decode)

    @classmethod
    def from_config(cls, cfg: Any, split: str, augment: bool = False,
                    clip_transform: Callable[[Image.Image], torch.Tensor] | None = None) -> ImageNetEEGDataset:
        """From a `PairedDataConfig` whose paths are resolved (`config.resolved`)."""
        return cls(
            eeg_path=cfg.eeg_path,
            splits_path=cfg.splits_path,
            image_dir=cfg.image_dir,
            split=split,
            split_index=cfg.split_index,
            subject=cfg.subject,
            time_window=tuple(cfg.time_window),
            n_times=cfg.n_times,
            min_trial_length=cfg.min_trial_length,
            max_trial_length=cfg.max_trial_length,
            image_size=cfg.image_size,
            augment=augment,
            crop_probability=cfg.crop_probability,
            crop_ratio=cfg.crop_ratio,
            clip_image_size=cfg.clip_image_size,
            clip_transform=clip_transform,
            check_images=cfg.check_images,
        )

    def image_path(self, i: int) -> Path:
        if self.image_dir is None:
            raise DataError("no image folder was given (image_dir is None)")
        return image_path(self.image_dir, self.image_names[i])

    def missing_images(self) -> list[Path]:
        """Expected image paths of this split that do not exist (each image once, in order)."""
        if self.image_dir is None:
            return []
        paths = dict.fromkeys(image_path(self.image_dir, name) for name in self.image_names)
        return [p for p in paths if not p.is_file()]

    def __len__(self) -> int:
        return len(self.eeg)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        item = {
            "eeg": window_and_resample(self.eeg[i], self.time_window, self.n_times),
            "label": label,
            "image_name": self.image_names[i],
            "wnid": self.wnids[label],
            "index": i,
            "subject": self.subjects[i],
        }
        if self.image_dir is not None:
            item.update(image_fields(_open_rgb(self.image_path(i)), self.image_size, self.clip_transform,
                                     self.augment, self.crop_probability, self.crop_size))
        return item


def image_fields(original: Image.Image, image_size: int, clip_transform: Callable, augment: bool,
                 crop_probability: float, crop_size: int) -> dict[str, torch.Tensor]:
    """`image` (RGB in [-1, 1] at image_size, the train-time random crop when `augment`) and
    `clip_pixel_values` (CLIP's input from the un-augmented original) of a paired item."""
    image = _resize(_to_unit_range(original), image_size)
    if augment and float(torch.rand(1)) < crop_probability:
        image = random_crop_resize(image, crop_size)
    return {"image": image, "clip_pixel_values": clip_transform(original)}


DATA_KINDS = ("imagenet_eeg", "things_eeg2")


def __getattr__(name: str) -> Any:
    # ThingsEEG2Dataset lives in things_eeg2.py, which imports this module: `dataset.ThingsEEG2Dataset`
    # resolves lazily so both datasets are reachable from here.
    if name == "ThingsEEG2Dataset":
        from .things_eeg2 import ThingsEEG2Dataset

        return ThingsEEG2Dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def paired_dataset(cfg: Any, split: str, augment: bool = False, load_images: bool = True) -> Dataset:
    """The paired dataset a `PairedDataConfig` (paths resolved) names: ImageNet-EEG or THINGS-EEG2.

    THINGS-EEG2: subject 0 = every subject of eeg_dir; with `things_eeg2.leave_out` = k, train and
    val use the other subjects and test uses subject k alone (leave-one-subject-out).
    """
    if cfg.kind == "imagenet_eeg":
        if not load_images:
            cfg = {**dict(cfg), "image_dir": None}
            from omegaconf import OmegaConf

            cfg = OmegaConf.create(cfg)
        return ImageNetEEGDataset.from_config(cfg, split, augment=augment)
    if cfg.kind != "things_eeg2":
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got '{cfg.kind}'")
    from .things_eeg2 import ThingsEEG2Dataset, subjects_except

    t = cfg.things_eeg2
    if t.leave_out is not None:
        subject = [t.leave_out] if split == "test" else subjects_except(t.leave_out)
    else:
        subject = "all" if cfg.subject == 0 else cfg.subject
    return ThingsEEG2Dataset(
        t.eeg_dir, cfg.image_dir, subject=subject, split=split,
        average_repetitions=t.average_repetitions_test if split == "test" else t.average_repetitions_train,
        n_channels=t.n_channels, n_times=t.n_times, pick_channels=list(t.pick_channels) if t.pick_channels else None,
        val_concepts=t.val_concepts, seed=t.seed, image_size=cfg.image_size, load_images=load_images,
        clip_image_size=cfg.clip_image_size, augment=augment, crop_probability=cfg.crop_probability,
        crop_ratio=cfg.crop_ratio, check_images=cfg.check_images)


# ---------------------------------------------------------------------------------------------
# Unpaired EEG for stage 1


def _check_npy(path: Path, n_times: int) -> str | None:
    """Why `path` is not a usable (channels x time) float EEG array, or None if it is."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    # np.load raises OSError, ValueError or EOFError on a damaged or truncated file, and refuses a
    # pickled object (ValueError): each means "not an EEG array".
    except Exception as err:  # noqa: BLE001
        return f"cannot be read as a .npy array ({type(err).__name__}: {err})"
    if array.ndim != 2:
        return f"has shape {tuple(array.shape)}, expected 2-D (channels x time)"
    if not np.issubdtype(array.dtype, np.floating):
        return f"has dtype {array.dtype}, expected floating point EEG"
    if array.shape[0] < 1 or array.shape[1] < 2:
        return f"has shape {tuple(array.shape)}: too short to crop or interpolate to {n_times} samples (at least 1 " \
               "channel and 2 samples are needed)"
    try:
        finite = bool(np.isfinite(array).all())
    except (OSError, ValueError) as err:  # a file truncated after its header fails when the data is read
        return f"cannot be read to its end ({type(err).__name__}: {err})"
    return None if finite else "contains NaN or Inf values"


class EEGPretrainDataset(Dataset):
    """Every `*.npy` (channels x time) below `root`, one item per file: `{"eeg": float32 [n_channels, n_times]}`.

    As the authors' stage-1 loader: a random `n_times` crop of a longer recording, linear
    interpolation (end points aligned) of a shorter one; fewer channels are tiled up to
    `n_channels` (row j = channel j mod C), more give a random contiguous block; the result is
    multiplied by `scale` (0.1 = the authors' `/10`). Randomness comes from torch's global RNG,
    which DataLoader seeds per worker.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        n_channels: int = 128,
        n_times: int = 512,
        scale: float = 0.1,
        skip_bad_files: bool = False,
        files: Sequence[str | os.PathLike] | None = None,
    ):
        self.root = Path(root) if root is not None else None
        self.n_channels, self.n_times, self.scale = n_channels, n_times, scale
        if files is None:
            if self.root is None or not self.root.is_dir():
                raise DataError(f"pretraining EEG folder not found: {self.root} ({DATA_README} explains how "
                                "to build it)")
            candidates = sorted(p for p in self.root.rglob("*.npy") if p.is_file())
            if not candidates:
                raise DataError(f"no *.npy files below {self.root} ({DATA_README} explains how to build it)")
        else:
            candidates = [Path(f) for f in files]
            for f in candidates:
                _require_file(f, "EEG .npy file")
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in candidates:
            problem = _check_npy(path, n_times)
            if problem is None:
                self.files.append(path)
            elif skip_bad_files:
                self.skipped.append((path, problem))
                logger.warning("skipping %s: it %s", path, problem)
            else:
                raise DataError(f"EEG file {path} {problem} (data.skip_bad_files=true skips such files)")
        if not self.files:
            raise DataError(f"all {len(candidates)} .npy files below {self.root} are unusable, e.g. "
                            f"{self.skipped[0][0]} {self.skipped[0][1]}")

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def subset(self, files: Sequence[Path]) -> EEGPretrainDataset:
        """The same dataset over some of its (already checked) files; `skipped` stays the whole scan's."""
        out = copy.copy(self)
        out.files = list(files)
        return out

    def write_skipped(self, path: str | os.PathLike) -> None:
        """`skipped_files.txt`: one line per file skipped by skip_bad_files, with the reason."""
        atomic_write_text(path, "".join(f"{p}\t{why}\n" for p, why in self.skipped))

    @classmethod
    def from_config(cls, cfg: Any, files: Sequence[str | os.PathLike] | None = None) -> EEGPretrainDataset:
        """From a `PretrainDataConfig` whose paths are resolved (`config.resolved`)."""
        return cls(
            root=cfg.root,
            n_channels=cfg.n_channels,
            n_times=cfg.n_times,
            scale=cfg.scale,
            skip_bad_files=cfg.skip_bad_files,
            files=files,
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        array = np.load(self.files[i], mmap_mode="r")
        n_chans, length = array.shape
        if length > self.n_times:
            start = int(torch.randint(0, length - self.n_times + 1, (1,)))
            eeg = torch.from_numpy(np.array(array[:, start:start + self.n_times], dtype=np.float32))
        else:
            eeg = resample_linear(torch.from_numpy(np.array(array, dtype=np.float32)), self.n_times)
        if n_chans < self.n_channels:
            eeg = eeg[torch.arange(self.n_channels) % n_chans]
        elif n_chans > self.n_channels:
            first = int(torch.randint(0, n_chans - self.n_channels + 1, (1,)))
            eeg = eeg[first:first + self.n_channels]
        return {"eeg": (eeg * self.scale).contiguous()}


# ---------------------------------------------------------------------------------------------
# `python -m dreamdiffusion.dataset check`


def _subject_summary(trials: list[dict]) -> list[str]:
    """Per subject, what the file holds: trial count, channel counts found, trial lengths."""
    lines = []
    for subject in sorted({int(t["subject"]) for t in trials}):
        mine = [t["eeg"] for t in trials if int(t["subject"]) == subject]
        channels = Counter(int(e.shape[0]) for e in mine)
        found = ", ".join(f"{c}" if len(channels) == 1 else f"{c} (x {n})" for c, n in sorted(channels.items()))
        lengths = [int(e.shape[-1]) for e in mine]
        lines.append(f"  subject {subject}: {len(mine)} trials, {found} channels, {min(lengths)}..{max(lengths)} "
                     f"samples, dtype {', '.join(sorted({str(e.dtype) for e in mine}))}")
    return lines


def check(
    eeg_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    subject: int = 4,
    split_index: int = 0,
    time_window: Sequence[int] = (20, 460),
    min_trial_length: int = 450,
    max_trial_length: int = 600,
    used_splits: Sequence[str] = ("train", "val", "test"),
    out=None,
) -> list[str]:
    """Print what the loading rules keep and what the files hold; return the problems (also printed).

    Structure and types (keys, integer indices, floating EEG) are checked when the files are read;
    then, for the trials each split keeps: channel counts, finite values in the time window (NaN/Inf
    outside it is a note), a split of `used_splits` that keeps no trial, and every image decoded once.
    """
    out = out or sys.stdout
    eeg_file = load_eeg_file(eeg_path)
    splits = load_splits_file(splits_path)
    print(f"{eeg_path}: {len(eeg_file.trials)} trials, {len(eeg_file.wnids)} classes, "
          f"{len(eeg_file.image_names)} images", file=out)
    print("\n".join(_subject_summary(eeg_file.trials)), file=out)
    filtered = select_subject(eeg_file.trials, subject, eeg_path)
    print(f"{splits_path}: {len(splits)} splits; split_index {split_index}, subject {subject}"
          f"{' (all subjects)' if subject == 0 else ''}, length filter {min_trial_length} <= T <= "
          f"{max_trial_length}:", file=out)
    if not 0 <= split_index < len(splits):
        split_indices(splits, "train", split_index, splits_path)  # raises the out-of-range error
    errors, notes, kept_names = [], [], []
    present = [str(n) for n in splits[split_index]]
    errors += [f"split '{name}' is not in {splits_path} (splits[{split_index}] holds {', '.join(present)}; a stage "
               "uses it)" for name in used_splits if name not in present]
    for name in present:
        sel = apply_split(filtered, split_indices(splits, name, split_index, splits_path),
                          min_trial_length, max_trial_length)
        print(f"  {name:>5}: {sel.n_listed} listed, {sel.n_out_of_range} not a position of subject "
              f"{subject}'s trials, {sel.n_length_dropped} dropped by the length filter, "
              f"{len(sel.positions)} kept", file=out)
        if not sel.positions and name in used_splits:
            errors.append(f"split '{name}' of {splits_path} keeps no trial of subject {subject} (a stage uses it)")
        file_index = {id(t): i for i, t in enumerate(eeg_file.trials)}
        labels = [f"dataset[{file_index[id(filtered[i])]}] (item {k} of split '{name}')"
                  for k, i in enumerate(sel.positions)]
        trial_errors, trial_notes = trial_problems([filtered[i]["eeg"] for i in sel.positions], time_window,
                                                   eeg_path, f"split '{name}'", labels)
        errors += trial_errors
        notes += trial_notes
        kept_names += [eeg_file.image_names[int(filtered[i]["image"])] for i in sel.positions]
    errors += _image_problems(image_dir, kept_names, out)
    for note in notes:
        print(f"note: {note}", file=out)
    for problem in errors:
        print(f"problem: {problem}", file=out)
    return errors


def _image_problems(image_dir, names: Sequence[str], out) -> list[str]:
    if image_dir is None:
        print("images: not checked (no --images folder given)", file=out)
        return []
    paths = list(dict.fromkeys(image_path(image_dir, n) for n in names))
    missing = [p for p in paths if not p.is_file()]
    broken = unreadable_images([p for p in paths if p.is_file()])
    print(f"images: {len(paths)} needed under {image_dir}, {len(missing)} missing, {len(broken)} that cannot be "
          "decoded (each decoded once)", file=out)
    return [f"missing image {p}" for p in missing] + [f"image {p} cannot be decoded: {why}" for p, why in broken]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamdiffusion.dataset",
                                     description="Check the ImageNet-EEG files against the loading rules.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="trials per subject and split, length-filter drops, missing images")
    p.add_argument("--eeg", required=True, help="eeg_5_95_std.pth")
    p.add_argument("--splits", required=True, help="block_splits_by_image_single.pth or _all.pth")
    p.add_argument("--images", default=None, help="the imageNet_images folder (<wnid>/<name>.JPEG)")
    p.add_argument("--subject", type=int, default=4, help="1..6, or 0 for all subjects (default 4)")
    p.add_argument("--split-index", type=int, default=0)
    p.add_argument("--min-trial-length", type=int, default=450)
    p.add_argument("--max-trial-length", type=int, default=600)
    args = parser.parse_args(argv)
    problems = check(args.eeg, args.splits, args.images, subject=args.subject, split_index=args.split_index,
                     min_trial_length=args.min_trial_length, max_trial_length=args.max_trial_length)
    if problems:
        raise DataError(f"{len(problems)} problem(s) found (listed above), e.g. {problems[0]} "
                        f"({DATA_README} describes each check)")
    print("ok")


if __name__ == "__main__":
    sys.exit(run_cli(main))
