"""The unpaired EEG of stage 1: every `*.npy` (channels x time) below a folder, read as the authors'
stage-1 loader does - a random `n_times` crop (linear interpolation when shorter), channels tiled up
to `n_channels` or a random contiguous block of them, times `scale` (their `/10`).

The same windows packed into a few memory-mapped files (`data/packed_corpus.py`) are read by
`PackedEEGDataset` with the same crop (`crop_window`), so a seed gives the same samples from either.

The content check (2-D, floating point, finite, at least 2 samples, the amplitude rule of
`data.common.eeg_scale_problem`) runs once per file: its results
are kept in a check record (`data/check_record.py`, default `<root>/eeg_checks.json`) with each file's
size and modification time, and a later start-up re-checks only the files that changed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from dreamdiffusion.core.errors import DataError
from dreamdiffusion.core.files import atomic_write_text
from dreamdiffusion.data.check_record import CheckRecord
from dreamdiffusion.data.common import DATA_README, eeg_scale_problem, require_file, resample_linear

logger = logging.getLogger(__name__)

CHECK_RECORD = "eeg_checks.json"  # the check record of a folder of *.npy, in the folder unless data.check_record
# The check a record holds: a new rule in `check_npy` must change this, so old records are not trusted.
NPY_CHECK = "npy-eeg/2: 2-D, floating point, >= 1 channel, >= 2 samples, finite, the amplitude rule"


# ---------------------------------------------------------------------------------------------
# One window: its check, and the crop of the authors' loader


def check_npy(path: Path) -> str | None:
    """Why `path` is not a usable (channels x time) float EEG array, or None if it is (reads every byte)."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    # np.load raises OSError, ValueError or EOFError on a damaged or truncated file, and refuses a
    # pickled object (ValueError): each means "not an EEG array".
    except Exception as err:  # noqa: BLE001
        return f"cannot be read as a .npy array ({type(err).__name__}: {err})"
    problem = check_array_header(array.shape, array.dtype)
    if problem is not None:
        return problem
    try:
        finite = bool(np.isfinite(array).all())
    except (OSError, ValueError) as err:  # a file truncated after its header fails when the data is read
        return f"cannot be read to its end ({type(err).__name__}: {err})"
    if not finite:
        return "contains NaN or Inf values"
    return eeg_scale_problem(max(abs(float(array.max())), abs(float(array.min()))))


def check_array_header(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an array of this shape and dtype is not a usable EEG window, or None."""
    if len(shape) != 2:
        return f"has shape {tuple(shape)}, expected 2-D (channels x time)"
    if not np.issubdtype(dtype, np.floating):
        return f"has dtype {dtype}, expected floating point EEG"
    if shape[0] < 1 or shape[1] < 2:
        return f"has shape {tuple(shape)}: too short to crop or interpolate (at least 1 channel and 2 samples are needed)"
    return None


def crop_window(window: np.ndarray, n_channels: int, n_times: int, scale: float,
                out: np.ndarray | None = None) -> torch.Tensor:
    """One training sample of a window `[C, L]` (an array or a memory-mapped view): float32 [n_channels, n_times],
    written into `out` when given (a float32 [n_channels, n_times] array, e.g. a row of a batch buffer).

    A random `n_times` crop when L > n_times, else linear interpolation to n_times (end points
    aligned); C < n_channels tiles the channels (row j = channel j mod C), C > n_channels takes a
    random contiguous block; the values are cast to float32 before anything else and multiplied by
    `scale` (in float32) last. The draws come from torch's global RNG, in this order (crop start,
    then channel block), which both stage-1 datasets share. Only the rows and samples kept are read.
    """
    n_chans, length = window.shape
    if length > n_times:
        start = int(torch.randint(0, length - n_times + 1, (1,)))
        rows = window[:, start:start + n_times]
    else:
        rows = resample_linear(torch.from_numpy(np.array(window, dtype=np.float32)), n_times).numpy()
    if n_chans < n_channels:
        rows = rows[np.arange(n_channels) % n_chans]
    elif n_chans > n_channels:
        first = int(torch.randint(0, n_chans - n_channels + 1, (1,)))
        rows = rows[first:first + n_channels]
    out = np.empty((n_channels, n_times), dtype=np.float32) if out is None else out
    if rows.dtype == np.float32:  # one pass: the copy of what is kept, times scale in float32
        np.multiply(rows, np.float32(scale), out=out)
    else:  # cast first, as float32 data would have been (float64 x float32 rounds once, not twice)
        out[...] = rows
        out *= np.float32(scale)
    return torch.from_numpy(out)


class EEGBatch(list):
    """The items of a batch (`crop_batch`) plus `eeg`, the float32 buffer [B, n_channels, n_times] their
    tensors are views of: `collate_eeg` hands the buffer on instead of stacking a copy."""

    eeg: torch.Tensor


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 buffer; inside a DataLoader worker, in shared memory - as torch's `default_collate`
    allocates its output there - so the batch reaches the main process without another copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def crop_batch(windows: Iterable[np.ndarray], n_channels: int, n_times: int, scale: float,
               seeds: Sequence[int] | None = None) -> EEGBatch:
    """`crop_window` of each window, in order, written into one buffer [B, n_channels, n_times]: the
    items of a batch (DataLoader's `__getitems__`), each a view of the buffer. The same values and
    random draws as item by item; one allocation and, with `collate_eeg`, no copy for the batch.
    `seeds`: item k draws from torch's CPU stream seeded with seeds[k], and the stream is left as it
    was (what `train.lightning.SeededItems` does item by item)."""
    windows = list(windows)
    buffer = _batch_buffer((len(windows), n_channels, n_times))
    rows = buffer.numpy()
    batch = EEGBatch()
    with torch.random.fork_rng(devices=[], enabled=seeds is not None):
        for k, window in enumerate(windows):
            if seeds is not None:
                # the CPU generator alone (the crop's draws): torch.manual_seed also seeds every
                # accelerator's generators, ~100x slower per call
                torch.default_generator.manual_seed(int(seeds[k]))
            batch.append({"eeg": crop_window(window, n_channels, n_times, scale, out=rows[k])})
    batch.eeg = buffer
    return batch


def collate_eeg(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stage-1 DataLoader's collate: the buffer of a `crop_batch` as it is, else torch's default_collate."""
    if isinstance(items, EEGBatch):
        return {"eeg": items.eeg}
    return default_collate(items)


# ---------------------------------------------------------------------------------------------
# A folder of *.npy


def checked_npy_files(root: Path, paths: Sequence[Path], record_path: Path | None, write_record: bool
                      ) -> list[str | None]:
    """`check_npy` of each path (None = usable), from the check record where a file is unchanged."""
    if record_path is None:
        return [check_npy(p) for p in paths]
    record = CheckRecord(record_path, root, NPY_CHECK)
    results = record.results(paths, lambda p: {"problem": check_npy(p)})
    logger.info("%s: checked %d of %d files (the others unchanged since %s)", root, record.n_checked, len(paths),
                record_path)
    if write_record:
        record.save()
    return [r["problem"] for r in results]


class EEGPretrainDataset(Dataset):
    """Every `*.npy` (channels x time) below `root`, one item per file: `{"eeg": float32 [n_channels, n_times]}`.

    As the authors' stage-1 loader (`crop_window`): a random `n_times` crop of a longer recording,
    linear interpolation (end points aligned) of a shorter one; fewer channels are tiled up to
    `n_channels` (row j = channel j mod C), more give a random contiguous block; the result is
    multiplied by `scale` (0.1 = the authors' `/10`). Randomness comes from torch's global RNG,
    which DataLoader seeds per worker.

    The files below `root` are checked against a check record (`check_record`, default
    `<root>/eeg_checks.json`; False: no record, every file is read): only new or changed files are
    read, and the record is rewritten when `write_record` (rank 0). Explicit `files` are always checked.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        n_channels: int = 128,
        n_times: int = 512,
        scale: float = 0.1,
        skip_bad_files: bool = False,
        files: Sequence[str | os.PathLike] | None = None,
        check_record: str | os.PathLike | bool | None = None,
        write_record: bool = True,
    ):
        self.root = Path(root) if root is not None else None
        self.n_channels, self.n_times, self.scale = n_channels, n_times, scale
        if files is None:
            candidates = scan_npy(self.root)
            record = None if check_record is False else Path(check_record or self.root / CHECK_RECORD)
            problems = checked_npy_files(self.root, candidates, record, write_record)
        else:
            candidates = [Path(f) for f in files]
            for f in candidates:
                require_file(f, "EEG .npy file")
            problems = [check_npy(p) for p in candidates]
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path, problem in zip(candidates, problems):
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

    def select(self, indices: Sequence[int]) -> EEGPretrainDataset:
        """The same dataset over some of its (already checked) windows; `skipped` stays the whole scan's."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.files = [self.files[i] for i in indices]
        return out

    def write_skipped(self, path: str | os.PathLike) -> None:
        """`skipped_files.txt`: one line per file skipped by skip_bad_files, with the reason."""
        atomic_write_text(path, "".join(f"{p}\t{why}\n" for p, why in self.skipped))

    @classmethod
    def from_config(cls, cfg: Any, files: Sequence[str | os.PathLike] | None = None,
                    write_record: bool = True) -> EEGPretrainDataset:
        """From a `PretrainDataConfig` whose paths are resolved (`config.resolved`)."""
        return cls(
            root=cfg.root,
            n_channels=cfg.n_channels,
            n_times=cfg.n_times,
            scale=cfg.scale,
            skip_bad_files=cfg.skip_bad_files,
            files=files,
            check_record=cfg.check_record,
            write_record=write_record,
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = np.load(self.files[i], mmap_mode="r")
        return {"eeg": crop_window(window, self.n_channels, self.n_times, self.scale)}

    def __getitems__(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> EEGBatch:
        """A batch's items (DataLoader's batched fetch): the same samples as `__getitem__` one by one
        (`seeds`: see `crop_batch`)."""
        windows = (np.load(self.files[i], mmap_mode="r") for i in indices)
        return crop_batch(windows, self.n_channels, self.n_times, self.scale, seeds)


def scan_npy(root: Path | None) -> list[Path]:
    """Every `*.npy` file below `root`, sorted (the order every stage-1 dataset uses)."""
    if root is None or not root.is_dir():
        raise DataError(f"pretraining EEG folder not found: {root} ({DATA_README} explains how to build it)")
    found = sorted(p for p in root.rglob("*.npy") if p.is_file())
    if not found:
        raise DataError(f"no *.npy files below {root} ({DATA_README} explains how to build it)")
    return found
