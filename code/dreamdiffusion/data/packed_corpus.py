"""A packed stage-1 corpus: the windows of a folder of `*.npy` in a few memory-mapped files, so a sample
is a slice of a file that is already open instead of an `open()` + header parse per sample.

A packed corpus is a folder holding:

    corpus.json    format, dtype and layout; each shard and the index with its fingerprint (size and
                   modification time); the content checks run when it was packed; the files left out
    index.bin      int64 little-endian [n_windows, 4]: (shard, offset, n_channels, n_times) per window,
                   `offset` in float32 elements from the start of the shard
    eeg_c<C>.bin   float32 little-endian: the windows of C channels one after another, each [C, n_times]
                   row-major - the bytes of its `.npy` file without the header
    sources.txt    line k: the file window k was packed from, relative to the folder that was packed

Why this format (and not WebDataset/LitData/MosaicML shards or HDF5): stage 1 samples windows by index
(a `DistributedSampler` permutation of (seed, epoch), which makes a resumed run continue exactly), so
it needs random access, not a stream through a shuffle buffer; numpy's memmap over raw files gives
that with no new dependency and no file handle to share across DataLoader workers (HDF5's pitfall),
as nanoGPT's `train.bin` does for tokens. Each window keeps the row-major layout of its `.npy`, so the
crop copies the same bytes as the per-file loader, and the windows keep the folder's sorted order and
crop (`pretrain_corpus.crop_window`): a seed gives the same samples from either form.

Check once, trust after: every window is checked (2-D, floating point, finite as float32, the amplitude
rule of `data.common.eeg_scale_problem`) when it is packed; a start-up reads `corpus.json` and
`index.bin` and `stat`s the shards, and re-reads a shard only when its fingerprint differs from the
recorded one.

    python -m dreamdiffusion.data.packed_corpus pack SRC DST [--skip-bad-files]

packs every `*.npy` below SRC into DST (DST may be SRC: the packed files are not `*.npy`);
`code/prepare_pretrain_data.py` packs the folder it builds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dreamdiffusion.core.errors import DataError, run_cli
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text
from dreamdiffusion.data.check_record import fingerprint
from dreamdiffusion.data.common import DATA_README, eeg_scale_problem
from dreamdiffusion.data.pretrain_corpus import (
    NPY_CHECK,
    EEGBatch,
    EEGPretrainDataset,
    check_array_header,
    crop_batch,
    crop_window,
    scan_npy,
)

logger = logging.getLogger(__name__)

FORMAT = "dreamdiffusion-packed-eeg/1"
CORPUS_FILE = "corpus.json"
INDEX_FILE = "index.bin"
SOURCES_FILE = "sources.txt"
DTYPE, INDEX_DTYPE = np.dtype("<f4"), np.dtype("<i8")
INDEX_COLUMNS = ("shard", "offset", "n_channels", "n_times")
PACK_CHECK = f"{NPY_CHECK}; finite as float32"
PACK_HINT = "python -m dreamdiffusion.data.packed_corpus pack SRC DST packs a folder of *.npy again"


def shard_name(n_channels: int) -> str:
    return f"eeg_c{n_channels}.bin"


def is_packed(root: str | os.PathLike | None) -> bool:
    return root is not None and (Path(root) / CORPUS_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Packing


@dataclass
class _Window:
    source: Path
    n_channels: int
    n_times: int


def _header(path: Path) -> tuple[_Window | None, str | None]:
    """(the window, None) or (None, why it is not usable), reading only the .npy header."""
    if path.stat().st_size == 0:
        return None, "is empty (0 bytes)"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - as pretrain_corpus.check_npy: any failure means "not an EEG array"
        return None, f"cannot be read as a .npy array ({type(err).__name__}: {err})"
    problem = check_array_header(array.shape, array.dtype)
    return (None, problem) if problem else (_Window(path, int(array.shape[0]), int(array.shape[1])), None)


def _refuse_or_skip(path: Path, problem: str, skip: bool, skipped: list[tuple[Path, str]]) -> None:
    if not skip:
        raise DataError(f"EEG file {path} {problem} (--skip-bad-files leaves such files out of the packed corpus)")
    logger.warning("skipping %s: it %s", path, problem)
    skipped.append((path, problem))


def _value_problem(values: np.ndarray) -> str | None:
    """The content rules of `pretrain_corpus.check_npy` on a window's float32 values: finite, plausible scale."""
    if not np.isfinite(values).all():
        return "contains NaN or Inf values (as float32)"
    return eeg_scale_problem(float(np.abs(values).max()))


def _copy_windows(windows: list[_Window], mm: np.memmap, skip: bool, skipped: list) -> list[tuple[_Window, int]]:
    """Copy `windows` (all of one channel count) into `mm` one after another, checking each copy's values
    (`_value_problem`); return (window, offset) of those kept. A window left out is overwritten by the next."""
    kept, position = [], 0
    for window in windows:
        n = window.n_channels * window.n_times
        block = mm[position:position + n]
        try:
            # float64/16 -> float32 as the loader casts (a float64 beyond float32's range becomes inf: refused below)
            with np.errstate(over="ignore"):
                block[:] = np.load(window.source, mmap_mode="r").reshape(-1)
        except (OSError, ValueError) as err:  # a file truncated after its header fails when its data is read
            _refuse_or_skip(window.source, f"cannot be read to its end ({type(err).__name__}: {err})", skip, skipped)
            continue
        problem = _value_problem(block)
        if problem is not None:
            _refuse_or_skip(window.source, problem, skip, skipped)
            continue
        kept.append((window, position))
        position += n
    return kept


def pack_files(paths: Sequence[Path], source_root: str | os.PathLike, dst: str | os.PathLike,
               skip_bad_files: bool = False, log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Pack the `.npy` windows `paths` (below `source_root`, in the order given) into the folder `dst`;
    return the corpus description (`corpus.json`). The shards are written under temporary names and
    renamed together once every window is in, then the index and `corpus.json` last: an interrupted or
    refused pack leaves a previous corpus in `dst` as it was, or no corpus that looks complete."""
    source_root, dst = Path(source_root), Path(dst)
    started = time.perf_counter()
    skipped: list[tuple[Path, str]] = []
    by_channels: dict[int, list[_Window]] = {}
    for path in paths:
        window, problem = _header(Path(path))
        if problem is not None:
            _refuse_or_skip(Path(path), problem, skip_bad_files, skipped)
        else:
            by_channels.setdefault(window.n_channels, []).append(window)
    if not by_channels:
        raise DataError(f"no usable EEG window among the {len(paths)} files below {source_root} to pack")
    dst.mkdir(parents=True, exist_ok=True)
    old = _previous_shards(dst)
    order = {Path(p): k for k, p in enumerate(paths)}
    placed, shards = [], []
    with contextlib.ExitStack() as renames:
        for n_chans in sorted(by_channels):
            name, windows = shard_name(n_chans), by_channels[n_chans]
            tmp = renames.enter_context(atomic_path(dst / name))
            mm = np.memmap(tmp, dtype=DTYPE, mode="w+", shape=(sum(w.n_channels * w.n_times for w in windows),))
            kept = _copy_windows(windows, mm, skip_bad_files, skipped)
            used = sum(w.n_channels * w.n_times for w, _ in kept)
            mm.flush()
            del mm
            os.truncate(tmp, used * DTYPE.itemsize)  # the windows left out leave no hole
            if kept:
                placed += [(order[w.source], len(shards), offset, w) for w, offset in kept]
                shards.append({"file": name, "n_channels": n_chans, "n_windows": len(kept), "elements": used})
            log(f"packed {len(kept)} windows of {n_chans} channels into {dst / name} "
                f"({used * DTYPE.itemsize / 2**30:.2f} GiB)")
        (dst / CORPUS_FILE).unlink(missing_ok=True)  # from here until the new one is written, no corpus
    for name in (old | {shard_name(c) for c in by_channels}) - {s["file"] for s in shards}:
        (dst / name).unlink(missing_ok=True)  # a previous pack's shard, or one whose windows were all left out
    return _write_corpus(dst, source_root, sorted(placed, key=lambda p: p[0]), shards, skipped,
                         time.perf_counter() - started)


def _previous_shards(dst: Path) -> set[str]:
    try:
        return {s["file"] for s in json.loads((dst / CORPUS_FILE).read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_corpus(dst: Path, source_root: Path, placed: list, shards: list[dict], skipped: list,
                  seconds: float) -> dict[str, Any]:
    """index.bin, sources.txt, then corpus.json with the fingerprints of the files as written."""
    if not placed:
        raise DataError(f"every one of the files below {source_root} was left out: nothing to pack")
    index = np.array([(shard, offset, w.n_channels, w.n_times) for _, shard, offset, w in placed], dtype=INDEX_DTYPE)
    with atomic_path(dst / INDEX_FILE) as tmp:
        index.tofile(tmp)
    atomic_write_text(dst / SOURCES_FILE, "".join(f"{_relative(w.source, source_root)}\n" for *_, w in placed))
    for shard in shards:
        shard["fingerprint"] = fingerprint(dst / shard["file"])
    corpus = {
        "format": FORMAT,
        "dtype": DTYPE.str,
        "layout": "each window [n_channels, n_times] row-major; windows one after another in the shard of "
                  "their channel count",
        "n_windows": len(index),
        "index": {"file": INDEX_FILE, "dtype": INDEX_DTYPE.str, "columns": list(INDEX_COLUMNS),
                  "fingerprint": fingerprint(dst / INDEX_FILE)},
        "shards": shards,
        "sources": {"file": SOURCES_FILE, "root": str(source_root)},
        "checks": PACK_CHECK,
        "skipped": [[_relative(p, source_root), why] for p, why in skipped],
        "seconds_to_pack": round(seconds, 2),
    }
    atomic_write_json(dst / CORPUS_FILE, corpus)
    return corpus


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def pack_folder(src: str | os.PathLike, dst: str | os.PathLike, skip_bad_files: bool = False,
                log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Pack every `*.npy` below `src` (sorted, as `EEGPretrainDataset` reads them) into `dst`."""
    return pack_files(scan_npy(Path(src)), src, dst, skip_bad_files, log)


# ---------------------------------------------------------------------------------------------
# Reading


def read_corpus(root: Path) -> dict[str, Any]:
    """`corpus.json` of a packed corpus, with its format checked."""
    path = root / CORPUS_FILE
    try:
        corpus = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"packed corpus {path} cannot be read ({type(err).__name__}: {err}); {PACK_HINT}") from err
    if not isinstance(corpus, dict) or corpus.get("format") != FORMAT:
        found = corpus.get("format") if isinstance(corpus, dict) else type(corpus).__name__
        raise DataError(f"{path} has format {found!r}, expected {FORMAT!r}; {PACK_HINT}")
    return corpus


def read_index(root: Path, corpus: dict[str, Any]) -> np.ndarray:
    """`index.bin` as int64 [n_windows, 4], checked against the shards (counts, channel counts, bounds)."""
    path = root / INDEX_FILE
    if not path.is_file():
        raise DataError(f"packed corpus {root}: {INDEX_FILE} is missing; {PACK_HINT}")
    flat = np.fromfile(path, dtype=INDEX_DTYPE)
    n = int(corpus["n_windows"])
    if flat.size != n * len(INDEX_COLUMNS):
        raise DataError(f"packed corpus {root}: {INDEX_FILE} holds {flat.size} numbers, expected {n} windows x "
                        f"{len(INDEX_COLUMNS)}; {PACK_HINT}")
    index = flat.reshape(n, len(INDEX_COLUMNS)).astype(np.int64)
    shards = corpus["shards"]
    shard, offset, n_chans, n_times = index.T
    bad = (shard < 0) | (shard >= len(shards)) | (offset < 0) | (n_times < 2)
    if not bad.any():
        channels = np.array([s["n_channels"] for s in shards])[shard]
        elements = np.array([s["elements"] for s in shards])[shard]
        bad = (n_chans != channels) | (offset + n_chans * n_times > elements)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataError(f"packed corpus {root}: window {k} of {INDEX_FILE} {tuple(index[k])} does not fit its shard "
                        f"({', '.join(INDEX_COLUMNS)}); {PACK_HINT}")
    return index


def read_sources(root: Path) -> list[str]:
    path = root / SOURCES_FILE
    return path.read_text().splitlines() if path.is_file() else []


def _recheck_shards(root: Path, corpus: dict[str, Any], index: np.ndarray, skip_bad_files: bool
                    ) -> tuple[np.ndarray, list[tuple[Path, str]], int]:
    """Re-check the windows of every shard whose fingerprint differs from `corpus.json`'s (all of them
    when the index changed): (index of the windows kept, windows left out, shards re-read)."""
    index_changed = fingerprint(root / INDEX_FILE) != corpus["index"]["fingerprint"]
    keep = np.ones(len(index), dtype=bool)
    bad: list[tuple[Path, str]] = []
    reread = 0
    sources = None
    for k, shard in enumerate(corpus["shards"]):
        path = root / shard["file"]
        if not path.is_file():
            raise DataError(f"packed corpus {root}: shard {shard['file']} is missing; {PACK_HINT}")
        stamp = fingerprint(path)
        if stamp[0] != shard["elements"] * DTYPE.itemsize:
            raise DataError(f"packed corpus {root}: shard {shard['file']} has {stamp[0]} bytes, corpus.json records "
                            f"{shard['elements'] * DTYPE.itemsize}; {PACK_HINT}")
        if stamp == shard["fingerprint"] and not index_changed:
            continue
        reread += 1
        flat = np.memmap(path, dtype=DTYPE, mode="r")
        for w in np.flatnonzero(index[:, 0] == k):
            _, offset, n_chans, n_times = index[w].tolist()
            problem = _value_problem(flat[offset:offset + n_chans * n_times])
            if problem is not None:
                sources = read_sources(root) if sources is None else sources
                where = root / sources[w] if w < len(sources) else f"{shard['file']} window {w}"
                problem += " (found when the changed shard was re-checked)"
                if not skip_bad_files:
                    raise DataError(f"packed corpus {root}: window {w} (from {where}) {problem} "
                                    "(data.skip_bad_files=true skips such windows)")
                logger.warning("skipping window %d of %s (from %s): it %s", w, root, where, problem)
                keep[w] = False
                bad.append((Path(str(where)), problem))
        shard["fingerprint"] = stamp
    if index_changed:
        corpus["index"]["fingerprint"] = fingerprint(root / INDEX_FILE)
    return index[keep], bad, reread


class PackedEEGDataset(Dataset):
    """The windows of a packed corpus, one item per window: `{"eeg": float32 [n_channels, n_times]}`,
    cropped as `EEGPretrainDataset` crops (`crop_window`): the same samples for the same seed.

    Start-up reads `corpus.json` and `index.bin` and `stat`s the shards; a shard whose fingerprint
    changed is re-checked, and with `write_record` (rank 0) its new fingerprint is recorded when
    nothing was wrong. The shards are memory-mapped lazily in each process (DataLoader workers
    included) and never pickled.
    """

    def __init__(self, root: str | os.PathLike, n_channels: int = 128, n_times: int = 512, scale: float = 0.1,
                 skip_bad_files: bool = False, write_record: bool = True):
        self.root = Path(root)
        self.n_channels, self.n_times, self.scale = n_channels, n_times, scale
        if not is_packed(self.root):
            raise DataError(f"{self.root} is not a packed corpus ({CORPUS_FILE} is missing; {PACK_HINT})")
        corpus = read_corpus(self.root)
        index = read_index(self.root, corpus)
        self.index, bad, reread = _recheck_shards(self.root, corpus, index, skip_bad_files)
        if reread and not bad and write_record:
            try:
                atomic_write_json(self.root / CORPUS_FILE, corpus)
            except OSError as err:
                logger.warning("cannot record the new fingerprints in %s (%s): the next start-up re-checks the "
                               "changed shards again", self.root / CORPUS_FILE, err)
        if len(self.index) == 0:
            raise DataError(f"every window of the packed corpus {self.root} was left out; {PACK_HINT}")
        source_root = Path(corpus["sources"]["root"])
        self.skipped = [(source_root / p, why) for p, why in corpus["skipped"]] + bad
        self.shards = [s["file"] for s in corpus["shards"]]
        self._maps: dict[int, np.ndarray] = {}
        logger.info("packed corpus %s: %d windows in %d shards (%d re-checked: their fingerprint changed)",
                    self.root, len(self.index), len(self.shards), reread)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def select(self, indices: Sequence[int]) -> PackedEEGDataset:
        """The same dataset over some of its windows (positions in this dataset)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.index, out._maps = self.index[np.asarray(indices, dtype=np.int64)], {}
        return out

    def write_skipped(self, path: str | os.PathLike) -> None:
        """`skipped_files.txt`: the files left out when packing (and windows left out now), with the reason."""
        atomic_write_text(path, "".join(f"{p}\t{why}\n" for p, why in self.skipped))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # each process maps the shards itself

    def _shard(self, k: int) -> np.ndarray:
        """Shard k as a flat float32 array over a read-only memory map (a plain ndarray: slicing it costs
        a fraction of what slicing an np.memmap does)."""
        if k not in self._maps:
            with open(self.root / self.shards[k], "rb") as f:
                self._maps[k] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=DTYPE)
        return self._maps[k]

    def __len__(self) -> int:
        return len(self.index)

    def window(self, i: int) -> np.ndarray:
        """Window `i` as a read-only view [n_channels, n_times] of its memory-mapped shard (nothing read yet)."""
        shard, offset, n_chans, n_times = self.index[i].tolist()
        return self._shard(shard)[offset:offset + n_chans * n_times].reshape(n_chans, n_times)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"eeg": crop_window(self.window(i), self.n_channels, self.n_times, self.scale)}

    def __getitems__(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> EEGBatch:
        """A batch's items (DataLoader's batched fetch): the same samples as `__getitem__` one by one
        (`seeds`: see `crop_batch`)."""
        return crop_batch((self.window(i) for i in indices), self.n_channels, self.n_times, self.scale, seeds)


def open_pretrain_corpus(cfg: Any, write_record: bool = True) -> EEGPretrainDataset | PackedEEGDataset:
    """The stage-1 dataset of a `PretrainDataConfig` (paths resolved): the packed corpus when `root`
    holds corpus.json, else every `*.npy` below `root`. `write_record`: this process may update the
    check records (rank 0); the others only read them."""
    if is_packed(cfg.root):
        return PackedEEGDataset(cfg.root, cfg.n_channels, cfg.n_times, cfg.scale, cfg.skip_bad_files, write_record)
    return EEGPretrainDataset.from_config(cfg, write_record=write_record)


# ---------------------------------------------------------------------------------------------
# python -m dreamdiffusion.data.packed_corpus pack SRC DST


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m dreamdiffusion.data.packed_corpus",
                                     description="Pack a folder of *.npy EEG windows for stage 1.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack every *.npy below SRC into DST (DST may be SRC)")
    p.add_argument("src", type=Path, help="a folder of *.npy windows (channels x time), searched recursively")
    p.add_argument("dst", type=Path, help="the packed corpus folder (corpus.json, index.bin, eeg_c<C>.bin)")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave out unusable files (listed in corpus.json) instead of stopping at the first")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        raise DataError(f"SRC {args.src} is not a folder ({DATA_README} explains how to build the stage-1 corpus)")
    corpus = pack_folder(args.src, args.dst, args.skip_bad_files, log=print)
    print(f"wrote {args.dst / CORPUS_FILE}: {corpus['n_windows']} windows in {len(corpus['shards'])} shards, "
          f"{len(corpus['skipped'])} files left out, {corpus['seconds_to_pack']} s")
    return corpus


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
