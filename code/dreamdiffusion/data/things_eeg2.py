"""THINGS-EEG2 (Gifford et al., NeuroImage 2022): its preprocessed EEG files, its image set, and a loader
that stands in for ImageNet-EEG (its synthetic copy: `data/synthetic_things_eeg2.py`) (docs/method.md, "THINGS-EEG2").

Files, per subject `sub-XX` (XX = 01..10) below an EEG folder:
    preprocessed_eeg_training.npy  {"preprocessed_eeg_data": [16540, 4, C, T], "ch_names", "times"}
    preprocessed_eeg_test.npy      {"preprocessed_eeg_data": [200, 80, C, T], "ch_names", "times"}
axes: image conditions x repetitions x channels x times. Two releases share these names and keys:
  - "official" (the dataset's own preprocessing): 17 occipital/parietal channels, epochs -0.2..0.8 s
    at 100 Hz (T = 100), written with `np.save` of a dict (a .npy file holding a pickle);
  - "nice" (the re-preprocessing of NICE-EEG, also used by ATM): all 63 channels, 0..1 s at 250 Hz
    (T = 250), written with `pickle.dump` (protocol 4) under the same .npy names. Its `times` keeps
    the un-cropped -0.2..1.0 s axis (T + 50 entries); the stored samples are its last T.
The image folder holds `image_metadata.npy` (`np.save` of a dict of lists: `train_img_concepts`,
`train_img_files`, `test_img_concepts`, `test_img_files`, plus `*_THINGS` concept ids that we do not
need) beside `training_images/<concept>/<file>` and `test_images/<concept>/<file>`. EEG row i is the
image of metadata entry i: training concepts sorted, 10 sorted images each (concept-major); one
image for each of the 200 test concepts, which never occur in training (zero-shot).

Loading rules of `ThingsEEG2Dataset`:
  1. the files are unpickled by `load_pickled_npy`, which rebuilds numpy arrays and plain
     containers only and refuses any other pickled global (so a downloaded file runs no code);
  2. split "train"/"val": the training partition; "val" = `val_concepts` training concepts drawn
     with `seed` (every image and repetition of a held-out concept, so val concepts are unseen
     in train, like the test concepts); "test": the test partition;
  3. `average_repetitions` (the peers' test protocol): one item per image, the mean over its
     repetitions; otherwise one item per (image, repetition), image-major;
  4. EEG adaptation, deterministic so evaluation is repeatable: `pick_channels` by name first; then
     `n_times` by linear interpolation with end points aligned (`data.common.resample_linear`); then
     `n_channels`: fewer channels are tiled (row j = channel j mod C, as the stage-1 loader), more
     give the contiguous block of the first n_channels (stage 1 draws that block at random);
  5. images: RGB in [-1, 1] at `image_size` and `clip_pixel_values` = `clip_transform` of the
     original image; a missing image is an error naming its path, never a substitute.

`python -m dreamdiffusion.data.things_eeg2 check --eeg-dir ... --images ... --subject 1` prints what the
files hold and what each split gets, and every missing image; exit code 2 on any problem.
"""

from __future__ import annotations

import argparse
import codecs
import os
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dreamdiffusion.core.errors import ConfigError, DataError, run_cli
from dreamdiffusion.data.common import (
    DATA_README,
    check_dict_file,
    check_split_images,
    config_arguments,
    eeg_scale_problem,
    image_fields,
    open_rgb,
    resample_linear,
)
from dreamdiffusion.data.split_hygiene import SplitHygiene, check_repeated_stimuli, things_eeg2_hygiene
from dreamdiffusion.models.clip_embedder import ProcessorTransform

WHERE = f"{DATA_README}, section THINGS-EEG2, explains where to get it"
PARTITIONS = ("training", "test")
SPLITS = ("train", "val", "test")
EEG_FILES = {"training": "preprocessed_eeg_training.npy", "test": "preprocessed_eeg_test.npy"}
EEG_KEYS = ("preprocessed_eeg_data", "ch_names", "times")
METADATA_FILE = "image_metadata.npy"
IMAGE_FOLDERS = {"training": "training_images", "test": "test_images"}
METADATA_PREFIX = {"training": "train", "test": "test"}

# The 63 channels in the order NICE-EEG's re-preprocessing writes them; the official release keeps
# the occipital and parietal ones (names starting with O or P). The official files list those 17 in
# the recording's own order, which need not be this one: read `ch_names` from the file.
NICE_CH_NAMES = (
    "Fp1", "Fp2", "AF7", "AF3", "AFz", "AF4", "AF8", "F7", "F5", "F3", "F1", "F2", "F4", "F6", "F8",
    "FT9", "FT7", "FC5", "FC3", "FC1", "FCz", "FC2", "FC4", "FC6", "FT8", "FT10", "T7", "C5", "C3", "C1",
    "Cz", "C2", "C4", "C6", "T8", "TP9", "TP7", "CP5", "CP3", "CP1", "CPz", "CP2", "CP4", "CP6", "TP8",
    "TP10", "P7", "P5", "P3", "P1", "Pz", "P2", "P4", "P6", "P8", "PO7", "PO3", "POz", "PO4", "PO8",
    "O1", "Oz", "O2",
)
OFFICIAL_CH_NAMES = tuple(name for name in NICE_CH_NAMES if name[0] in "OP")


@dataclass(frozen=True)
class EEGLayout:
    """How one release stores its epochs."""

    ch_names: tuple[str, ...]
    sfreq: float  # Hz
    n_times: int  # samples per epoch
    tmin: float  # s, time of the first stored sample (stimulus onset = 0)
    times_start: float  # s, first entry of the file's `times` (NICE keeps the un-cropped axis)
    writer: str  # "np.save" (a pickled dict inside a .npy) or "pickle.dump"


LAYOUTS = {
    "official": EEGLayout(OFFICIAL_CH_NAMES, 100.0, 100, -0.2, -0.2, "np.save"),
    "nice": EEGLayout(NICE_CH_NAMES, 250.0, 250, 0.0, -0.2, "pickle.dump"),
}


# ---------------------------------------------------------------------------------------------
# Reading pickled .npy files without running code


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The callables numpy's own pickles use to rebuild arrays, dtypes and scalars - nothing else.

    numpy 2 renamed `numpy.core` to `numpy._core`; files name either, depending on who wrote them.
    """
    core = getattr(np, "_core", None) or np.core
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer  # pickle protocol 5
    # Protocol-2 pickles spell a bytes object as `_codecs.encode(text, "latin1")`.
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays/dtypes/scalars, dicts, lists, tuples, strings and numbers.

    Every callable a pickle can invoke reaches it through `find_class`, so refusing all other
    globals here means the file cannot run code (no `os.system`, no constructors of other classes).
    """

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise _RefusedGlobal(f"{module}.{name}")


def _unpickle(f, path: Path, what: str) -> Any:
    try:
        return _NumpyOnlyUnpickler(f).load()
    except _RefusedGlobal as err:
        raise DataError(f"{what} {path} was refused: its pickle asks for the Python global '{err.name}'; "
                        "only numpy arrays, dtypes and scalars and plain dicts, lists, tuples, strings and "
                        "numbers are read from a data file (nothing in it is run)") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{what} {path} could not be unpickled: {err}") from err


NPY_MAGIC = b"\x93NUMPY"


def storage_format(path: str | os.PathLike) -> str:
    """How a file was written: "np.save of a pickled object", "plain .npy array" or "pickle.dump"."""
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            return "pickle.dump"
        f.seek(0)
        _, dtype = _read_npy_header(f, Path(path), "file")
    return "np.save of a pickled object" if dtype.hasobject else "plain .npy array"


def _read_npy_header(f, path: Path, what: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise DataError(f"{what} {path} is a .npy file of format version {version}, expected 1.0 or 2.0")
    shape, _, dtype = readers[version](f)
    return shape, dtype


def load_pickled_npy(path: str | os.PathLike, what: str) -> Any:
    """Load a `.npy` file - an array, an object pickled by `np.save`, or a plain `pickle.dump` file.

    A plain array loads with `allow_pickle=False`; pickles go through an unpickler that admits only
    numpy's array/dtype/scalar constructors and plain containers, so a file asking for any other
    global (e.g. `os.system`) raises `DataError` naming the file and the global, and nothing runs.
    `np.save` wraps a dict in a 0-d object array; that wrapper is removed (as `.item()` would).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path} ({WHERE})")
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
        f.seek(0)
        if magic == NPY_MAGIC:
            _, dtype = _read_npy_header(f, path, what)
            if not dtype.hasobject:
                return np.load(path, allow_pickle=False)
            loaded = _unpickle(f, path, what)
        elif magic[:1] == b"\x80":  # the PROTO opcode that starts every pickle of protocol >= 2
            loaded = _unpickle(f, path, what)
        else:
            raise DataError(f"{what} {path} is neither a .npy file nor a pickle (it starts with {magic!r})")
    if isinstance(loaded, np.ndarray) and loaded.dtype.hasobject and loaded.shape == ():
        return loaded[()]
    return loaded


# ---------------------------------------------------------------------------------------------
# Image metadata


@dataclass
class ImageMetadata:
    """The validated content of `image_metadata.npy`: per partition, one (concept, file) per EEG row."""

    concepts: dict[str, list[str]]  # partition -> concept folder of each image, e.g. "00001_aardvark"
    files: dict[str, list[str]]  # partition -> file name of each image, e.g. "aardvark_01b.jpg"
    path: Path

    def concept_names(self, partition: str) -> list[str]:
        """The partition's distinct concepts in order of first appearance (sorted, in the real file)."""
        return list(dict.fromkeys(self.concepts[partition]))

    def image_path(self, image_dir: str | os.PathLike, partition: str, row: int) -> Path:
        """`<image_dir>/training_images/<concept>/<file>` (or `test_images/...`) of EEG row `row`."""
        folder = Path(image_dir) / IMAGE_FOLDERS[partition]
        return folder / self.concepts[partition][row] / self.files[partition][row]


def load_image_metadata(image_dir: str | os.PathLike) -> ImageMetadata:
    """Read and check `<image_dir>/image_metadata.npy`; a missing key or a length mismatch is a `DataError`."""
    path = Path(image_dir) / METADATA_FILE
    loaded = load_pickled_npy(path, "THINGS-EEG2 image metadata")
    if not isinstance(loaded, dict):
        raise DataError(f"image metadata {path} holds a {type(loaded).__name__}, expected a dict of lists")
    concepts, files = {}, {}
    for partition, prefix in METADATA_PREFIX.items():
        columns = {}
        for column in ("concepts", "files"):
            key = f"{prefix}_img_{column}"
            if key not in loaded:
                raise DataError(f"image metadata {path} has no key '{key}' "
                                f"(keys present: {sorted(map(str, loaded))})")
            columns[column] = [str(v) for v in np.asarray(loaded[key], dtype=object).ravel()]
        if not columns["files"] or len(columns["files"]) != len(columns["concepts"]):
            raise DataError(f"image metadata {path}: '{prefix}_img_files' has {len(columns['files'])} entries "
                            f"and '{prefix}_img_concepts' {len(columns['concepts'])}; expected the same "
                            "number, at least 1")
        concepts[partition], files[partition] = columns["concepts"], columns["files"]
    return ImageMetadata(concepts=concepts, files=files, path=path)


# ---------------------------------------------------------------------------------------------
# EEG files


def subject_folder(subject: int) -> str:
    return f"sub-{subject:02d}"


def subjects_except(subject: int, n_subjects: int = 10) -> list[int]:
    """Subjects 1..n_subjects without `subject`: the training subjects of leave-one-subject-out."""
    if not 1 <= subject <= n_subjects:
        raise ConfigError(f"subject {subject} is not one of 1..{n_subjects}")
    return [s for s in range(1, n_subjects + 1) if s != subject]


def resolve_subjects(subject: int | Sequence[int] | str, eeg_dir: str | os.PathLike) -> list[int]:
    """An int, a list of ints, or "all" (every `sub-XX` folder in `eeg_dir`, sorted) -> a list of ints."""
    if subject == "all":
        found = sorted(int(m.group(1)) for p in Path(eeg_dir).glob("sub-*")
                       if p.is_dir() and (m := re.fullmatch(r"sub-(\d+)", p.name)))
        if not found:
            raise DataError(f"no sub-XX folders in the THINGS-EEG2 EEG folder {eeg_dir} ({WHERE})")
        return found
    subjects = [subject] if isinstance(subject, (int, np.integer)) else list(subject)
    valid = [isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in subjects]
    if not subjects or not all(valid):
        raise ConfigError(f"subject must be an int >= 1, a list of them or 'all', got {subject!r}")
    return [int(s) for s in subjects]


@dataclass
class ThingsEEG2File:
    """The validated content of one `preprocessed_eeg_{training,test}.npy`."""

    data: np.ndarray  # [image conditions, repetitions, n_channels, n_times]
    ch_names: list[str]
    times: np.ndarray  # s; NICE-layout files hold T + 50 entries (the un-cropped axis)
    path: Path

    @property
    def sfreq(self) -> float:
        """Hz, from the spacing of `times`."""
        return float(1.0 / np.median(np.diff(self.times))) if len(self.times) > 1 else float("nan")


def load_things_eeg2_file(eeg_dir: str | os.PathLike, subject: int, partition: str) -> ThingsEEG2File:
    """Read and check `<eeg_dir>/sub-XX/preprocessed_eeg_<partition>.npy` (partition "training"/"test")."""
    folder = Path(eeg_dir) / subject_folder(subject)
    if not folder.is_dir():
        present = sorted(p.name for p in Path(eeg_dir).glob("sub-*")) if Path(eeg_dir).is_dir() else []
        raise DataError(f"subject folder not found: {folder} (present: {present or 'none'}; {WHERE})")
    path = folder / EEG_FILES[partition]
    loaded = load_pickled_npy(path, f"THINGS-EEG2 {partition} EEG file")
    check_dict_file(loaded, EEG_KEYS, path)
    data = loaded["preprocessed_eeg_data"]
    if not isinstance(data, np.ndarray) or data.ndim != 4 or not np.issubdtype(data.dtype, np.number):
        found = f"{getattr(data, 'shape', type(data).__name__)} {getattr(data, 'dtype', '')}"
        raise DataError(f"EEG file {path}: 'preprocessed_eeg_data' is {found}, expected a numeric array "
                        "[image conditions, repetitions, channels, times]")
    if min(data.shape) < 1 or data.shape[-1] < 2:
        raise DataError(f"EEG file {path}: 'preprocessed_eeg_data' has shape {list(data.shape)}, expected at "
                        "least 1 condition, repetition and channel and 2 time samples")
    ch_names = [str(c) for c in np.asarray(loaded["ch_names"], dtype=object).ravel()]
    if len(ch_names) != data.shape[2]:
        raise DataError(f"EEG file {path}: 'ch_names' lists {len(ch_names)} channels but "
                        f"'preprocessed_eeg_data' has {data.shape[2]} (its shape: {list(data.shape)})")
    times = np.asarray(loaded["times"], dtype=np.float64).ravel()
    return ThingsEEG2File(data=data, ch_names=ch_names, times=times, path=path)


def check_rows(eeg: ThingsEEG2File, metadata: ImageMetadata, partition: str) -> None:
    """The EEG file must hold one row per image of the metadata's partition."""
    n_images = len(metadata.files[partition])
    if eeg.data.shape[0] != n_images:
        raise DataError(f"EEG file {eeg.path} holds {eeg.data.shape[0]} image conditions but {metadata.path} "
                        f"lists {n_images} {partition} images ('{METADATA_PREFIX[partition]}_img_files'); "
                        "expected the same")


# ---------------------------------------------------------------------------------------------
# Splits and EEG adaptation


def val_concept_names(concepts: Sequence[str], val_concepts: int, seed: int) -> list[str]:
    """`val_concepts` of the training `concepts`, drawn with `seed`, in their original order."""
    if not 0 <= val_concepts < len(concepts):
        raise ConfigError(f"val_concepts must be in 0..{len(concepts) - 1} (the training partition has "
                          f"{len(concepts)} concepts and train needs at least one), got {val_concepts}")
    picked = np.random.default_rng(seed).choice(len(concepts), size=val_concepts, replace=False)
    return [concepts[i] for i in sorted(int(i) for i in picked)]


def split_rows(metadata: ImageMetadata, split: str, val_concepts: int = 0, seed: int = 0) -> np.ndarray:
    """The EEG rows (image conditions) of `split`, in file order."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got '{split}'")
    if split == "test":
        return np.arange(len(metadata.files["test"]))
    if split == "val" and val_concepts < 1:
        raise ConfigError("split 'val' needs val_concepts >= 1 (the number of training concepts to hold out)")
    held = set(val_concept_names(metadata.concept_names("training"), val_concepts, seed))
    in_val = np.array([c in held for c in metadata.concepts["training"]])
    return np.flatnonzero(in_val if split == "val" else ~in_val)


def split_hygiene(metadata: ImageMetadata, val_concepts: int = 0, seed: int = 0) -> SplitHygiene:
    """The stimuli (images, concepts) each split uses and those that occur in two (data/split_hygiene.py)."""
    rows = {split: split_rows(metadata, split, val_concepts, seed) for split in SPLITS
            if split != "val" or val_concepts > 0}
    partition = {split: "test" if split == "test" else "training" for split in rows}
    return things_eeg2_hygiene({s: [metadata.concepts[partition[s]][r] for r in rows[s]] for s in rows},
                               {s: [metadata.files[partition[s]][r] for r in rows[s]] for s in rows},
                               f"image set {metadata.path.parent} (val_concepts {val_concepts}, seed {seed})")


def adapt_eeg(eeg: torch.Tensor, n_channels: int | None = None, n_times: int | None = None) -> torch.Tensor:
    """`eeg [C, T]` -> float32 `[n_channels, n_times]` (None keeps that axis).

    Time: linear interpolation with the end points aligned. Channels: fewer are tiled (row j =
    channel j mod C), more give the first `n_channels` - fixed, unlike stage 1's random block, so
    that evaluation is deterministic.
    """
    if n_times is not None and eeg.shape[-1] != n_times:
        eeg = resample_linear(eeg, n_times)
    if n_channels is not None and eeg.shape[0] < n_channels:
        eeg = eeg[torch.arange(n_channels) % eeg.shape[0]]
    elif n_channels is not None:
        eeg = eeg[:n_channels]
    return eeg.float().contiguous()


def _select(data: np.ndarray, rows: np.ndarray, average: bool, chunk: int = 512) -> np.ndarray:
    """float32 `data[rows]` ([n, R, C, T]), or its mean over repetitions ([n, C, T], in float64).

    Chunked, so a multi-GB file never needs a second full-size float64 copy in memory.
    """
    shape = (len(rows),) + (data.shape[2:] if average else data.shape[1:])
    out = np.empty(shape, dtype=np.float32)
    for start in range(0, len(rows), chunk):
        block = data[rows[start:start + chunk]]
        out[start:start + chunk] = block.mean(axis=1, dtype=np.float64) if average else block
    return out


# ---------------------------------------------------------------------------------------------
# The dataset


class ThingsEEG2Dataset(Dataset):
    """One split of THINGS-EEG2 for one or more subjects, with ImageNet-EEG's item keys.

    Item: `eeg` float32 [n_channels, n_times] (native C x T unless adapted); `label` int (index of
    the concept in `concepts`, the partition's concept list: training concepts for train/val, test
    concepts for test); `concept` and `wnid` str (the concept folder, e.g. "00001_aardvark" - `wnid`
    is the class-id slot of ImageNet-EEG items); `image_name` str (file stem, "aardvark_01b");
    `image_path` str; `condition` int (the EEG row); `subject` int; `index` (position in this split);
    `repetition` int when `average_repetitions` is False; with `load_images`: `image` float32
    [3, image_size, image_size] in [-1, 1] and `clip_pixel_values` (`clip_transform` of the original
    image; default CLIP ViT-L/14's processor at `clip_image_size`).
    """

    def __init__(
        self,
        eeg_dir: str | os.PathLike,
        image_dir: str | os.PathLike,
        subject: int | Sequence[int] | str = 1,
        split: str = "train",
        average_repetitions: bool = True,
        n_channels: int | None = None,
        n_times: int | None = None,
        pick_channels: Sequence[str] | None = None,
        val_concepts: int = 0,
        seed: int = 0,
        image_size: int = 512,
        load_images: bool = True,
        clip_image_size: int = 224,
        clip_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        augment: bool = False,
        crop_probability: float = 0.5,
        crop_ratio: float = 0.2,
        check_images: bool = True,
        allow_repeated_stimuli: bool = False,
    ):
        if (n_channels is not None and n_channels < 1) or (n_times is not None and n_times < 2):
            raise ConfigError(f"need n_channels >= 1 and n_times >= 2 (or None), got {n_channels}, {n_times}")
        self.eeg_dir, self.image_dir = Path(eeg_dir), Path(image_dir)
        self.split, self.partition = split, "test" if split == "test" else "training"
        self.average_repetitions, self.image_size = average_repetitions, image_size
        self.out_channels, self.out_times = n_channels, n_times
        self.metadata = load_image_metadata(self.image_dir)
        self.rows = split_rows(self.metadata, split, val_concepts, seed)
        self.concepts = self.metadata.concept_names(self.partition)
        self._labels = {concept: label for label, concept in enumerate(self.concepts)}
        self.split_concepts = list(dict.fromkeys(self.metadata.concepts[self.partition][r] for r in self.rows))
        self.hygiene = split_hygiene(self.metadata, val_concepts, seed)  # refused before any EEG is read
        check_repeated_stimuli(self.hygiene, allow_repeated_stimuli)
        self.subjects = resolve_subjects(subject, self.eeg_dir)
        self.eeg, self.index = self._load_eeg(list(pick_channels) if pick_channels else None)  # [] = every channel
        self.load_images = load_images
        self.augment, self.crop_probability = augment, crop_probability
        self.crop_size = image_size - int(crop_ratio * image_size)
        self._check_eeg()
        if load_images:
            check_split_images(self._image_paths(), self.split, self.image_dir,
                               f"{WHERE}; load_images=False loads the EEG alone", decode=check_images)
            if clip_transform is None:

                clip_transform = ProcessorTransform(clip_image_size)
        self.clip_transform = clip_transform

    @classmethod
    def from_config(cls, cfg: Any, split: str, augment: bool = False,
                    clip_transform: Callable[[Image.Image], torch.Tensor] | None = None,
                    load_images: bool = True) -> ThingsEEG2Dataset:
        """From a `PairedDataConfig` with kind=things_eeg2 whose paths are resolved: the fields of its
        `things_eeg2` group and its image fields that are arguments here, by name; subject 0 = every
        subject of eeg_dir; with `things_eeg2.leave_out` = k, train and val use the other subjects and
        test uses subject k alone (leave-one-subject-out)."""
        things = cfg.things_eeg2
        if things.leave_out is not None:
            subject = [things.leave_out] if split == "test" else subjects_except(things.leave_out)
        else:
            subject = "all" if cfg.subject == 0 else cfg.subject
        average = things.average_repetitions_test if split == "test" else things.average_repetitions_train
        # subject and n_times of the group are ImageNet-EEG's (n_times: THINGS-EEG2's own is in `things`)
        return cls(**config_arguments(cfg, cls, skip=("subject", "n_times")), **config_arguments(things, cls),
                   subject=subject, split=split, average_repetitions=average, augment=augment,
                   clip_transform=clip_transform, load_images=load_images)

    def _load_eeg(self, pick_channels: Sequence[str] | None) -> tuple[list[np.ndarray], list[tuple]]:
        """Per subject float32 [rows, (R,) C, T]; the items as (subject position, row position, repetition)."""
        arrays, index = [], []
        for s, subject in enumerate(self.subjects):
            eeg = load_things_eeg2_file(self.eeg_dir, subject, self.partition)
            check_rows(eeg, self.metadata, self.partition)
            data, ch_names = eeg.data, eeg.ch_names
            if pick_channels is not None:
                missing = [c for c in pick_channels if c not in ch_names]
                if missing:
                    raise DataError(f"EEG file {eeg.path} has no channel(s) {missing} (it has {ch_names})")
                picked = [ch_names.index(c) for c in pick_channels]
                data, ch_names = data[:, :, picked], list(pick_channels)
            if s == 0:
                self.ch_names, self.times, self.native_shape = ch_names, eeg.times, data.shape[2:]
            elif data.shape[2:] != self.native_shape:
                raise DataError(f"EEG file {eeg.path} has {list(data.shape[2:])} channels x times, subject "
                                f"{self.subjects[0]} has {list(self.native_shape)}; expected the same")
            arrays.append(_select(data, self.rows, self.average_repetitions))
            n_reps = 1 if self.average_repetitions else data.shape[1]
            index += [(s, i, r) for i in range(len(self.rows)) for r in range(n_reps)]
            del eeg, data  # the full file can be freed once this split's rows are copied
        return arrays, index

    def _check_eeg(self) -> None:
        """The content check of ImageNet-EEG's loader, here: finite values in every selected row, and the
        amplitude rule (`data.common.eeg_scale_problem`) over each subject's rows."""
        for s, data in enumerate(self.eeg):
            if not np.isfinite(data).all():
                bad = int(np.argwhere(~np.isfinite(data.reshape(len(data), -1)).all(axis=1))[0, 0])
                raise DataError(f"THINGS-EEG2 subject {self.subjects[s]}: row {int(self.rows[bad])} of the "
                                f"{self.partition} EEG holds NaN or Inf")
            scale = eeg_scale_problem(max(abs(float(data.max())), abs(float(data.min()))))
            if scale is not None:
                raise DataError(f"THINGS-EEG2 subject {self.subjects[s]}: the {self.partition} EEG {scale}")

    @property
    def labels(self) -> list[int]:
        """The label of every item, in order (as ImageNetEEGDataset.labels)."""
        concepts = self.metadata.concepts[self.partition]
        return [self._labels[concepts[int(self.rows[row])]] for _, row, _ in self.index]

    @property
    def wnids(self) -> list[str]:
        """Class id of each label (the concept folder names), as ImageNetEEGDataset.wnids."""
        return list(self.concepts)

    @property
    def n_channels(self) -> int:
        return self.out_channels or int(self.native_shape[0])

    @property
    def n_times(self) -> int:
        return self.out_times or int(self.native_shape[1])

    def image_path(self, i: int) -> Path:
        _, row, _ = self.index[i]
        return self.metadata.image_path(self.image_dir, self.partition, int(self.rows[row]))

    def _image_paths(self) -> list[Path]:
        """This split's image paths, each once, in row order."""
        return list(dict.fromkeys(self.metadata.image_path(self.image_dir, self.partition, int(row))
                                  for row in self.rows))

    def missing_images(self) -> list[Path]:
        """Image paths of this split that do not exist (each once, in row order)."""
        return [p for p in self._image_paths() if not p.is_file()]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, row, rep = self.index[i]
        condition = int(self.rows[row])
        data = self.eeg[s][row] if self.average_repetitions else self.eeg[s][row, rep]
        concept = self.metadata.concepts[self.partition][condition]
        path = self.image_path(i)
        item = {
            "eeg": adapt_eeg(torch.from_numpy(data), self.out_channels, self.out_times),
            "label": self._labels[concept],
            "concept": concept,
            "wnid": concept,
            "image_name": Path(self.metadata.files[self.partition][condition]).stem,
            "image_path": str(path),
            "condition": condition,
            "subject": self.subjects[s],
            "index": i,
        }
        if not self.average_repetitions:
            item["repetition"] = rep
        if self.load_images:
            item.update(image_fields(open_rgb(path, WHERE), self.image_size, self.clip_transform, self.augment,
                                     self.crop_probability, self.crop_size))
        return item


# ---------------------------------------------------------------------------------------------
# `python -m dreamdiffusion.data.things_eeg2 check`


def check(eeg_dir: str | os.PathLike, image_dir: str | os.PathLike, subject: int = 1, val_concepts: int = 0,
          seed: int = 0, out=None) -> list[Path]:
    """Print what the files hold and what each split gets; return the missing image paths (also printed)."""
    out = out or sys.stdout
    metadata = load_image_metadata(image_dir)
    n_reps = {}
    for partition in PARTITIONS:
        n_images, n_concepts = len(metadata.files[partition]), len(metadata.concept_names(partition))
        print(f"{metadata.path} {partition}: {n_images} images of {n_concepts} concepts", file=out)
    for partition in PARTITIONS:
        eeg = load_things_eeg2_file(eeg_dir, subject, partition)
        check_rows(eeg, metadata, partition)
        n_reps[partition] = eeg.data.shape[1]
        print(f"{eeg.path} ({storage_format(eeg.path)}): preprocessed_eeg_data {list(eeg.data.shape)} "
              f"{eeg.data.dtype} (image conditions x repetitions x channels x times), {len(eeg.ch_names)} "
              f"ch_names, times {eeg.times[0]:.3f}..{eeg.times[-1]:.3f} s ({len(eeg.times)} entries, "
              f"{eeg.sfreq:.1f} Hz)", file=out)
        if len(eeg.times) != eeg.data.shape[-1]:
            print(f"  note: 'times' has {len(eeg.times)} entries for {eeg.data.shape[-1]} samples (NICE-layout "
                  "files keep the un-cropped axis; their samples are its last ones)", file=out)
    for split in SPLITS:
        if split == "val" and val_concepts == 0:
            print("    val: none (val_concepts = 0)", file=out)
            continue
        rows = split_rows(metadata, split, val_concepts, seed)
        partition = "test" if split == "test" else "training"
        n_concepts = len(set(metadata.concepts[partition][r] for r in rows))
        print(f"  {split:>5}: {n_concepts} concepts, {len(rows)} images (averaged items), "
              f"{len(rows) * n_reps[partition]} single-repetition items", file=out)
    hygiene = split_hygiene(metadata, val_concepts, seed)
    print("\n".join(hygiene.lines()), file=out)
    paths = [metadata.image_path(image_dir, p, r) for p in PARTITIONS for r in range(len(metadata.files[p]))]
    missing = [p for p in paths if not p.is_file()]
    print(f"images: {len(paths)} listed in {metadata.path.name}, {len(missing)} missing", file=out)
    for path in missing:
        print(f"  missing: {path}", file=out)
    return missing


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamdiffusion.data.things_eeg2",
                                     description="Check THINGS-EEG2 files against the loading rules.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="shapes, channel names, counts per split, missing images")
    p.add_argument("--eeg-dir", required=True, help="the folder of sub-XX/preprocessed_eeg_{training,test}.npy")
    p.add_argument("--images", required=True,
                   help="the image set: image_metadata.npy, training_images/, test_images/")
    p.add_argument("--subject", type=int, default=1, help="1..10 (default 1)")
    p.add_argument("--val-concepts", type=int, default=0, help="training concepts held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation concepts")
    args = parser.parse_args(argv)
    missing = check(args.eeg_dir, args.images, subject=args.subject, val_concepts=args.val_concepts,
                    seed=args.seed)
    if missing:
        raise DataError(f"{len(missing)} image(s) missing under {args.images} (listed above; {WHERE})")
    check_repeated_stimuli(split_hygiene(load_image_metadata(args.images), args.val_concepts, args.seed), allow=False)
    print("ok")


if __name__ == "__main__":
    sys.exit(run_cli(main))
