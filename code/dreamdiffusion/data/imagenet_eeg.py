"""ImageNet-EEG, loaded exactly as the authors' code does (docs/method.md, "Data").

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

`check` (behind `python -m dreamdiffusion.dataset check`) reports what the rules keep and every
missing image.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from dreamdiffusion.core.errors import ConfigError, DataError
from dreamdiffusion.data.common import (
    DATA_README,
    as_index,
    check_dict_file,
    check_split_images,
    config_arguments,
    default_clip_transform,
    eeg_scale_problem,
    image_fields,
    load_torch_file,
    open_rgb,
    resample_linear,
    string_list,
    unreadable_images,
)
from dreamdiffusion.data.split_hygiene import check_repeated_stimuli, imagenet_eeg_hygiene

logger = logging.getLogger(__name__)


EEG_FILE_KEYS = ("dataset", "labels", "images")


TRIAL_KEYS = ("eeg", "image", "label", "subject")
WHERE = f"{DATA_README} explains where the ImageNet images go"


# ---------------------------------------------------------------------------------------------
# ImageNet-EEG files


@dataclass
class ImageNetEEGFile:
    """The validated content of `eeg_5_95_std.pth`."""

    trials: list[dict]  # {"eeg": FloatTensor [C, T], "image": int, "label": int, "subject": int}
    wnids: list[str]  # the file's "labels": class index -> WordNet id
    image_names: list[str]  # the file's "images": image index -> "<wnid>_<number>"
    path: Path


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


def load_imagenet_eeg_file(path: str | os.PathLike) -> ImageNetEEGFile:
    """Read and check `eeg_5_95_std.pth`: its keys, and every trial's keys, types and indices; a
    problem is a `DataError` naming the trial and the field."""
    loaded = load_torch_file(path, "EEG file")
    check_dict_file(loaded, EEG_FILE_KEYS, path)
    if not isinstance(loaded["dataset"], (list, tuple)):
        raise DataError(f"EEG file {path}: 'dataset' is a {type(loaded['dataset']).__name__}, expected a list of trials")
    trials = list(loaded["dataset"])
    wnids = string_list(loaded["labels"], "labels", path)
    image_names = string_list(loaded["images"], "images", path)
    if not trials:
        raise DataError(f"EEG file {path}: 'dataset' holds no trials")
    for i, trial in enumerate(trials):
        _check_trial(trial, i, path, len(wnids), len(image_names))
    return ImageNetEEGFile(trials=trials, wnids=wnids, image_names=image_names, path=Path(path))


def load_splits_file(path: str | os.PathLike) -> list[dict[str, list[int]]]:
    """Read `block_splits_by_image_*.pth`: the list under its key 'splits' (each a dict of index lists)."""
    loaded = load_torch_file(path, "splits file")
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
        elif (scale := eeg_scale_problem(float(window.abs().max()))) is not None:
            errors.append(f"EEG file {path}: {name}, inside the time window [{start}, {stop}), {scale}")
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
        allow_repeated_stimuli: bool = False,
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
            raise DataError(f"image folder not found: {self.image_dir} ({WHERE})")
        self.split, self.split_index, self.subject = split, split_index, subject
        self.time_window = (int(time_window[0]), int(time_window[1]))
        self.n_times = n_times
        self.image_size, self.clip_image_size = image_size, clip_image_size
        self.clip_transform = clip_transform or default_clip_transform(clip_image_size)
        self.augment, self.crop_probability = augment, crop_probability
        self.crop_size = image_size - int(crop_ratio * image_size)

        eeg_file = load_imagenet_eeg_file(self.eeg_path)
        splits = load_splits_file(self.splits_path)
        indices = split_indices(splits, split, split_index, self.splits_path)
        filtered = select_subject(eeg_file.trials, subject, self.eeg_path)
        self.selection = apply_split(filtered, indices, min_trial_length, max_trial_length)
        # Split hygiene before anything else is read: a split repeating images between train and test
        # is refused unless allowed (data/split_hygiene.py).
        kept = {name: apply_split(filtered, split_indices(splits, name, split_index, self.splits_path),
                                  min_trial_length, max_trial_length).positions for name in splits[split_index]}
        self.hygiene = imagenet_eeg_hygiene(filtered, kept, eeg_file.image_names,
                                            f"split {split_index} of {self.splits_path}, subject {subject}")
        check_repeated_stimuli(self.hygiene, allow_repeated_stimuli)
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
        check_split_images([image_path(self.image_dir, n) for n in self.image_names], split, self.image_dir, WHERE,
                           decode)

    @classmethod
    def from_config(cls, cfg: Any, split: str, augment: bool = False,
                    clip_transform: Callable[[Image.Image], torch.Tensor] | None = None,
                    load_images: bool = True) -> ImageNetEEGDataset:
        """From a `PairedDataConfig` whose paths are resolved (`config.resolved`): every field of the group
        that is an argument here, by name (`load_images=False`: the EEG alone, as image_dir=None)."""
        arguments = config_arguments(cfg, cls)
        if not load_images:
            arguments["image_dir"] = None
        return cls(**arguments, split=split, augment=augment, clip_transform=clip_transform)

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
            item.update(image_fields(open_rgb(self.image_path(i), WHERE), self.image_size, self.clip_transform,
                                     self.augment, self.crop_probability, self.crop_size))
        return item


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
    eeg_file = load_imagenet_eeg_file(eeg_path)
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
    errors, notes, kept_names, kept = [], [], [], {}
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
        kept[name] = sel.positions
    hygiene = imagenet_eeg_hygiene(filtered, kept, eeg_file.image_names,
                                   f"split {split_index} of {splits_path}, subject {subject}")
    print("\n".join(hygiene.lines()), file=out)
    errors += [f"split {split_index} repeats stimuli between train and test: {o.line()} (a stage refuses it unless "
               "data.allow_repeated_stimuli=true)" for o in hygiene.repeated("train", "test")]
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

