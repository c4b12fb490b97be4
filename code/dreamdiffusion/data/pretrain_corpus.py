"""The unpaired EEG of stage 1: every `*.npy` (channels x time) below a folder, read as the authors'
stage-1 loader does - a random `n_times` crop (linear interpolation when shorter), channels tiled up
to `n_channels` or a random contiguous block of them, times `scale` (their `/10`)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dreamdiffusion.core.errors import DataError
from dreamdiffusion.core.files import atomic_write_text
from dreamdiffusion.data.common import DATA_README, require_file, resample_linear

logger = logging.getLogger(__name__)


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
                require_file(f, "EEG .npy file")
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
