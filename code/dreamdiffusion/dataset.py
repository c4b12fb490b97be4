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
from .io import safe_torch_load

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


def load_eeg_file(path: str | os.PathLike) -> EEGFile:
    """Read and check `eeg_5_95_std.pth`; a missing key is a `DataError` naming it."""
    loaded = _load_torch_file(path, "EEG file")
    if not isinstance(loaded, dict):
        raise DataError(f"EEG file {path} holds a {type(loaded).__name__}, expected a dict with keys "
                        f"{list(EEG_FILE_KEYS)}")
    for key in EEG_FILE_KEYS:
        if key not in loaded:
            raise DataError(f"EEG file {path} has no key '{key}' (keys present: {sorted(map(str, loaded))}; "
                            f"expected {list(EEG_FILE_KEYS)})")
    trials = list(loaded["dataset"])
    wnids = [str(w) for w in loaded["labels"]]
    image_names = [str(n) for n in loaded["images"]]
    for i, trial in enumerate(trials):
        missing = [k for k in TRIAL_KEYS if not isinstance(trial, dict) or k not in trial]
        if missing:
            raise DataError(f"EEG file {path}: trial {i} of 'dataset' has no key '{missing[0]}' "
                            f"(each trial needs {list(TRIAL_KEYS)})")
        eeg = trial["eeg"]
        if not isinstance(eeg, torch.Tensor) or eeg.ndim != 2:
            raise DataError(f"EEG file {path}: trial {i} 'eeg' is not a 2-D tensor [channels, time] "
                            f"(got {getattr(eeg, 'shape', type(eeg).__name__)})")
        if not 0 <= int(trial["label"]) < len(wnids):
            raise DataError(f"EEG file {path}: trial {i} has label {int(trial['label'])}, outside the "
                            f"{len(wnids)} entries of 'labels'")
        if not 0 <= int(trial["image"]) < len(image_names):
            raise DataError(f"EEG file {path}: trial {i} has image {int(trial['image'])}, outside the "
                            f"{len(image_names)} entries of 'images'")
    return EEGFile(trials=trials, wnids=wnids, image_names=image_names, path=Path(path))


def load_splits_file(path: str | os.PathLike) -> list[dict[str, list[int]]]:
    """Read `block_splits_by_image_*.pth`: the list under its key 'splits'."""
    loaded = _load_torch_file(path, "splits file")
    if not isinstance(loaded, dict) or "splits" not in loaded:
        keys = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise DataError(f"splits file {path} has no key 'splits' (found: {keys})")
    splits = list(loaded["splits"])
    for n, split in enumerate(splits):
        if not isinstance(split, dict):
            raise DataError(f"splits file {path}: splits[{n}] is a {type(split).__name__}, expected a dict "
                            f"of index lists like {{'train': [...], 'val': [...], 'test': [...]}}")
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
    return [int(i) for i in entry[split]]


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
    except OSError as err:
        raise DataError(f"image {path} could not be read: {err}") from err


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
        bad = [n for n, e in enumerate(self.eeg) if e.shape[0] != self.n_channels]
        if bad:
            raise DataError(f"EEG file {self.eeg_path}: trials have different channel counts "
                            f"({self.n_channels} and {self.eeg[bad[0]].shape[0]})")
        if self.image_dir is not None:
            missing = self.missing_images()
            if missing:
                shown = "\n  ".join(map(str, missing[:10]))
                more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise DataError(f"{len(missing)} image(s) of split '{split}' not found under {self.image_dir} "
                                f"({DATA_README} explains where the ImageNet images go):\n  {shown}{more}")

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
            original = _open_rgb(self.image_path(i))
            image = _resize(_to_unit_range(original), self.image_size)
            if self.augment and float(torch.rand(1)) < self.crop_probability:
                image = random_crop_resize(image, self.crop_size)
            item["image"] = image
            item["clip_pixel_values"] = self.clip_transform(original)
        return item


# ---------------------------------------------------------------------------------------------
# Unpaired EEG for stage 1


def _check_npy(path: Path) -> str | None:
    """Why `path` is not a usable (channels x time) EEG array, or None if it is."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        return f"cannot be read as a .npy array ({err})"
    if array.ndim != 2:
        return f"has shape {tuple(array.shape)}, expected 2-D (channels x time)"
    if min(array.shape) < 1 or array.shape[1] < 2:
        return f"has shape {tuple(array.shape)}, expected at least 1 channel and 2 time samples"
    if not np.issubdtype(array.dtype, np.number):
        return f"has dtype {array.dtype}, expected a numeric array"
    if not np.isfinite(array).all():
        return "contains NaN or Inf values"
    return None


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
            problem = _check_npy(path)
            if problem is None:
                self.files.append(path)
            elif skip_bad_files:
                self.skipped.append((path, problem))
            else:
                raise DataError(f"EEG file {path} {problem} (skip_bad_files=true skips such files)")
        if not self.files:
            raise DataError(f"all {len(candidates)} .npy files below {self.root} are unusable, e.g. "
                            f"{self.skipped[0][0]} {self.skipped[0][1]}")

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

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


def check(
    eeg_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    subject: int = 4,
    split_index: int = 0,
    time_window: Sequence[int] = (20, 460),
    min_trial_length: int = 450,
    max_trial_length: int = 600,
    out=None,
) -> list[Path]:
    """Print what the loading rules keep; return the missing image paths (also printed)."""
    out = out or sys.stdout
    eeg_file = load_eeg_file(eeg_path)
    splits = load_splits_file(splits_path)
    lengths = [t["eeg"].shape[-1] for t in eeg_file.trials]
    per_subject = Counter(int(t["subject"]) for t in eeg_file.trials)
    print(f"{eeg_path}: {len(eeg_file.trials)} trials, {len(eeg_file.wnids)} classes, "
          f"{len(eeg_file.image_names)} images, {eeg_file.trials[0]['eeg'].shape[0]} channels, "
          f"trial length {min(lengths)}..{max(lengths)} samples", file=out)
    print("trials per subject: " + ", ".join(f"{s}: {n}" for s, n in sorted(per_subject.items())), file=out)
    filtered = select_subject(eeg_file.trials, subject, eeg_path)
    n_short = sum(t["eeg"].shape[-1] < time_window[1] for t in filtered)
    print(f"subject {subject} ({'all subjects' if subject == 0 else 'one subject'}): {len(filtered)} trials; "
          f"{n_short} shorter than the window end {time_window[1]}", file=out)
    print(f"{splits_path}: {len(splits)} splits; split_index {split_index}, "
          f"length filter {min_trial_length} <= T <= {max_trial_length}:", file=out)
    if not 0 <= split_index < len(splits):
        split_indices(splits, "train", split_index, splits_path)  # raises the out-of-range error
    names = [str(name) for name in splits[split_index]]
    kept_names: list[str] = []
    for name in names:
        sel = apply_split(filtered, split_indices(splits, name, split_index, splits_path),
                          min_trial_length, max_trial_length)
        print(f"  {name:>5}: {sel.n_listed} listed, {sel.n_out_of_range} not a position of subject "
              f"{subject}'s trials, {sel.n_length_dropped} dropped by the length filter, "
              f"{len(sel.positions)} kept", file=out)
        kept_names += [eeg_file.image_names[int(filtered[i]["image"])] for i in sel.positions]
    missing: list[Path] = []
    if image_dir is not None:
        paths = dict.fromkeys(image_path(image_dir, n) for n in kept_names)
        missing = [p for p in paths if not p.is_file()]
        print(f"images: {len(paths)} needed under {image_dir}, {len(missing)} missing", file=out)
        for p in missing:
            print(f"  missing: {p}", file=out)
    else:
        print("images: not checked (no --images folder given)", file=out)
    return missing


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
    missing = check(args.eeg, args.splits, args.images, subject=args.subject, split_index=args.split_index,
                    min_trial_length=args.min_trial_length, max_trial_length=args.max_trial_length)
    if missing:
        raise DataError(f"{len(missing)} image(s) missing under {args.images} (listed above; "
                        f"{DATA_README} explains where the ImageNet images go)")
    print("ok")


if __name__ == "__main__":
    sys.exit(run_cli(main))
