"""The unpaired stage-1 corpus from MOABB datasets: EEG channels, band-pass, one sampling rate, windows.

The paper pretrains on ~120,000 EEG samples from 400+ subjects of MOABB datasets but never said
which ones or how they were processed. This builder makes that step explicit and repeatable:

    for every dataset / subject / session / run (MOABB -> mne.io.Raw):
        keep the EEG channels (no EOG/EMG/stim), convert volts -> microvolts,
        band-pass l_freq..h_freq (5-95 Hz, as the paired ImageNet-EEG data) - the upper edge is
            lowered to `nyquist_margin` x Nyquist for low-rate recordings, and the manifest records it,
        resample to `sfreq` (1 kHz = ImageNet-EEG's rate), cut windows of `window_seconds`,
        write each window as float32 `.npy` [n_channels, n_times].

Output under `out_dir`:
    <Dataset>/sub-<subject>/ses-<session>_run-<run>_win-<k>.npy
    <Dataset>/sub-<subject>/done.json   the subject's manifest rows, written when it is complete
    manifest.csv                        one row per window (dataset, subject, session, run, n_channels,
                                        sfreq, n_times, file, orig_sfreq, l_freq, h_freq, start)
    summary.json, summary.txt           counts per dataset and in all, and the settings used
    corpus.json, index.bin, eeg_c<C>.bin, sources.txt
                                        the same windows packed for stage 1 (every *.npy below
                                        `out_dir`, checked once; dreamdiffusion.data.packed_corpus)

Resumable: a subject with `done.json` is not loaded again; window files already present are kept.
Every file is written atomically.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamdiffusion.config import resolve_path
from dreamdiffusion.core.errors import ConfigError, DataError
from dreamdiffusion.core.extras import require_extra
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text
from dreamdiffusion.data.packed_corpus import pack_folder

# Large MOABB datasets (docs/method.md, "Data"). Shin2017A/B need `accept_licenses` and are left out of
# the default list for that reason.
DEFAULT_DATASETS = [
    "PhysionetMI",
    "Lee2019_MI",
    "Cho2017",
    "Schirrmeister2017",
    "GrosseWentrup2009",
    "BNCI2015_004",
    "Lee2019_ERP",
    "Lee2019_SSVEP",
]
# Constructor arguments for a dataset named on the command line: all of PhysionetMI's runs
# (imagined and executed movement), not only the imagined ones MOABB loads by default.
DATASET_KWARGS: dict[str, dict[str, Any]] = {"PhysionetMI": {"imagined": True, "executed": True}}
LICENSED_DATASETS = {"Shin2017A", "Shin2017B"}
MOABB_FEATURE = "building the stage-1 corpus from MOABB"

MANIFEST_COLUMNS = ["dataset", "subject", "session", "run", "n_channels", "sfreq", "n_times", "file",
                    "orig_sfreq", "l_freq", "h_freq", "start"]
VOLTS_TO_MICROVOLTS = 1e6


@dataclass
class CorpusSettings:
    l_freq: float = 5.0  # band-pass edges (Hz), as ImageNet-EEG's eeg_5_95_std.pth
    h_freq: float = 95.0
    nyquist_margin: float = 0.9  # h_freq is lowered to this fraction of Nyquist when above it
    sfreq: float = 1000.0  # target rate; None in `build_pretrain_corpus` keeps each dataset's own
    window_seconds: float = 2.0  # the loader takes a random 512-sample crop of each window
    stride_seconds: float | None = None  # None = window_seconds (no overlap)
    max_subjects: int | None = None  # per dataset; None = all
    accept_licenses: bool = False  # needed by Shin2017A/B

    def check(self) -> None:
        if not 0 < self.l_freq < self.h_freq:
            raise ConfigError(f"band-pass edges must satisfy 0 < l_freq < h_freq, got {self.l_freq}, {self.h_freq}")
        if not 0 < self.nyquist_margin < 1:
            raise ConfigError(f"nyquist_margin must be in (0, 1), got {self.nyquist_margin}")
        if self.sfreq is not None and self.sfreq <= 2 * self.l_freq:
            raise ConfigError(f"sfreq {self.sfreq} Hz is too low for a {self.l_freq} Hz high-pass")
        if self.window_seconds <= 0 or (self.stride_seconds is not None and self.stride_seconds <= 0):
            raise ConfigError("window_seconds and stride_seconds must be > 0")
        if self.max_subjects is not None and self.max_subjects < 1:
            raise ConfigError(f"max_subjects must be >= 1, got {self.max_subjects}")


def load_dataset(name: str, accept_licenses: bool = False):
    """A MOABB dataset object from a class name in `moabb.datasets` or a dotted path `pkg.mod.Class`."""
    require_extra("moabb", MOABB_FEATURE)
    import moabb.datasets  # imported here, not at the top - MOABB is optional (the moabb extra)

    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"no dataset class {name!r}: {err}") from err
    else:
        cls = getattr(moabb.datasets, name, None)
        if not isinstance(cls, type):
            known = sorted(n for n in dir(moabb.datasets) if not n.startswith("_") and n[0].isupper())
            raise ConfigError(f"{name!r} is not a MOABB dataset; known names: {', '.join(known)}")
    kwargs = dict(DATASET_KWARGS.get(cls.__name__, {}))
    if cls.__name__ in LICENSED_DATASETS:
        if not accept_licenses:
            raise ConfigError(f"{cls.__name__} requires accepting its licence: pass --accept-licenses")
        kwargs["accept"] = True
    return cls(**kwargs)


def _safe_name(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value)).strip("-") or "x"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def process_raw(raw, settings: CorpusSettings) -> tuple[np.ndarray, float, float, float]:
    """mne Raw -> (eeg [n_channels, n_times] in microvolts, new sfreq, l_freq used, h_freq used)."""
    raw = raw.copy().load_data(verbose="error").pick("eeg", exclude="bads", verbose="error")
    orig_sfreq = float(raw.info["sfreq"])
    target = orig_sfreq if settings.sfreq is None else float(settings.sfreq)
    # The upper edge must stay below the Nyquist frequency of the slower of the two rates.
    h_freq = min(settings.h_freq, settings.nyquist_margin * min(orig_sfreq, target) / 2)
    if h_freq <= settings.l_freq:
        raise DataError(f"sampling rate {orig_sfreq} Hz leaves no pass band above {settings.l_freq} Hz")
    raw.filter(settings.l_freq, h_freq, picks="eeg", verbose="error")
    if target != orig_sfreq:
        raw.resample(target, verbose="error")
    return raw.get_data().astype(np.float64) * VOLTS_TO_MICROVOLTS, target, settings.l_freq, h_freq


def _subject_rows(dataset, name: str, subject, out_dir: Path, settings: CorpusSettings,
                  log: Callable[[str], None]) -> tuple[list[dict[str, Any]], int, int]:
    """Process one subject; return (manifest rows, windows written, windows already present)."""
    rel_dir = Path(_safe_name(name)) / f"sub-{_safe_name(subject)}"
    rows: list[dict[str, Any]] = []
    written = kept = 0
    sessions = dataset.get_data(subjects=[subject])[subject]
    for session, runs in sessions.items():
        for run, raw in runs.items():
            orig_sfreq = float(raw.info["sfreq"])
            eeg, sfreq, l_freq, h_freq = process_raw(raw, settings)
            window = int(round(settings.window_seconds * sfreq))
            stride = int(round((settings.stride_seconds or settings.window_seconds) * sfreq))
            if eeg.shape[0] == 0:
                log(f"  {name} subject {subject} session {session} run {run}: no EEG channels, skipped")
                continue
            n_windows = 0 if eeg.shape[1] < window else (eeg.shape[1] - window) // stride + 1
            for k in range(n_windows):
                start = k * stride
                chunk = eeg[:, start:start + window]
                if not np.isfinite(chunk).all():
                    continue
                rel = rel_dir / f"ses-{_safe_name(session)}_run-{_safe_name(run)}_win-{k:05d}.npy"
                if (out_dir / rel).is_file():
                    kept += 1
                else:
                    _save_npy(out_dir / rel, chunk.astype(np.float32))
                    written += 1
                rows.append({"dataset": name, "subject": subject, "session": session, "run": run,
                             "n_channels": chunk.shape[0], "sfreq": sfreq, "n_times": window,
                             "file": rel.as_posix(), "orig_sfreq": orig_sfreq, "l_freq": l_freq,
                             "h_freq": round(h_freq, 3), "start": start})
    atomic_write_json(out_dir / rel_dir / "done.json", rows)
    return rows, written, kept


def build_pretrain_corpus(
    datasets: Iterable[str | Any],
    out_dir: str | os.PathLike,
    settings: CorpusSettings | None = None,
    subjects: Sequence[Any] | None = None,
    log: Callable[[str], None] = print,
    pack: bool = True,
) -> dict[str, Any]:
    """Write the windows, `manifest.csv` and `summary.json` under `out_dir`; return the summary.

    `datasets`: MOABB class names / dotted paths, or dataset objects (tests pass a FakeDataset).
    `subjects`: restrict every dataset to these subject ids (else `settings.max_subjects` or all).
    `pack`: then pack every window below `out_dir` into `out_dir` itself (`packed_corpus.pack_folder`),
    which stage 1 reads when `data.root` holds its corpus.json.
    """
    settings = settings or CorpusSettings()
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    per_dataset: dict[str, Any] = {}
    totals = {"windows_written": 0, "windows_present": 0, "subjects_skipped_done": 0}
    for entry in datasets:
        dataset = load_dataset(entry, settings.accept_licenses) if isinstance(entry, str) else entry
        name = type(dataset).__name__
        chosen = list(dataset.subject_list) if subjects is None else [s for s in dataset.subject_list
                                                                          if s in set(subjects)]
        if settings.max_subjects is not None:
            chosen = chosen[: settings.max_subjects]
        stats = {"subjects": 0, "recordings": set(), "windows": 0, "channels": set(), "orig_sfreq": set(),
                 "h_freq": set()}
        for subject in chosen:
            done = out_dir / _safe_name(name) / f"sub-{_safe_name(subject)}" / "done.json"
            if done.is_file():
                rows = json.loads(done.read_text())
                totals["subjects_skipped_done"] += 1
                log(f"{name} subject {subject}: done before, {len(rows)} windows")
            else:
                rows, written, kept = _subject_rows(dataset, name, subject, out_dir, settings, log)
                totals["windows_written"] += written
                totals["windows_present"] += kept
                log(f"{name} subject {subject}: {written} windows written, {kept} already present")
            stats["subjects"] += 1
            for r in rows:
                stats["recordings"].add((r["subject"], r["session"], r["run"]))
                stats["channels"].add(int(r["n_channels"]))
                stats["orig_sfreq"].add(float(r["orig_sfreq"]))
                stats["h_freq"].add(float(r["h_freq"]))
            stats["windows"] += len(rows)
            all_rows.extend(rows)
        per_dataset[name] = {
            "subjects": stats["subjects"],
            "recordings": len(stats["recordings"]),
            "windows": stats["windows"],
            "hours": round(stats["windows"] * settings.window_seconds / 3600, 3),
            "n_channels": sorted(stats["channels"]),
            "orig_sfreq": sorted(stats["orig_sfreq"]),
            "h_freq_used": sorted(stats["h_freq"]),
        }
    _write_manifest(out_dir / "manifest.csv", all_rows)
    summary = {
        "settings": asdict(settings),
        "unit": "microvolts",
        "datasets": per_dataset,
        "total_windows": len(all_rows),
        "total_subjects": sum(d["subjects"] for d in per_dataset.values()),
        **totals,
    }
    if pack:
        corpus = pack_folder(out_dir, out_dir, log=log)
        summary["packed"] = {"windows": corpus["n_windows"], "shards": [s["file"] for s in corpus["shards"]],
                             "seconds": corpus["seconds_to_pack"]}
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.txt", format_summary(summary) + "\n")
    return summary


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'dataset':<22}{'subjects':>9}{'windows':>10}{'hours':>9}  channels  rate(Hz) -> h_freq"]
    for name, d in summary["datasets"].items():
        lines.append(f"{name:<22}{d['subjects']:>9}{d['windows']:>10}{d['hours']:>9.2f}  "
                     f"{d['n_channels']}  {d['orig_sfreq']} -> {d['h_freq_used']}")
    lines.append(f"total: {summary['total_windows']} windows from {summary['total_subjects']} subjects "
                 f"({summary['windows_written']} written now, {summary['windows_present']} kept, "
                 f"{summary['subjects_skipped_done']} subjects done before)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# code/prepare_pretrain_data.py


def parse_args(argv=None):

    defaults = CorpusSettings()
    parser = argparse.ArgumentParser(prog="prepare_pretrain_data.py", description="Build the unpaired stage-1 corpus from MOABB datasets.")
    parser.add_argument("datasets", nargs="*", default=DEFAULT_DATASETS,
                        help=f"MOABB dataset class names or dotted paths (default: {' '.join(DEFAULT_DATASETS)})")
    parser.add_argument("--out", default="datasets/pretrain_eeg", help="output folder (relative to the repo root)")
    parser.add_argument("--l-freq", type=float, default=defaults.l_freq, help="high-pass edge, Hz")
    parser.add_argument("--h-freq", type=float, default=defaults.h_freq,
                        help="low-pass edge, Hz (lowered below Nyquist for slow recordings)")
    parser.add_argument("--sfreq", type=float, default=defaults.sfreq,
                        help="resample to this rate, Hz; 0 keeps each recording's own rate")
    parser.add_argument("--window-seconds", type=float, default=defaults.window_seconds)
    parser.add_argument("--stride-seconds", type=float, default=None, help="default: the window length")
    parser.add_argument("--subjects", type=int, nargs="+", default=None, help="only these subject ids")
    parser.add_argument("--max-subjects", type=int, default=None, help="at most this many subjects per dataset")
    parser.add_argument("--accept-licenses", action="store_true", help="accept the licence of Shin2017A/B")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                        help="pack the windows for stage 1 (corpus.json, index.bin, eeg_c<C>.bin) when done")
    return parser.parse_args(argv)


def main(argv=None):
    """The command line of code/prepare_pretrain_data.py."""

    args = parse_args(argv)
    require_extra("moabb", MOABB_FEATURE)  # before anything is written
    settings = CorpusSettings(l_freq=args.l_freq, h_freq=args.h_freq, sfreq=args.sfreq or None,
                              window_seconds=args.window_seconds, stride_seconds=args.stride_seconds,
                              max_subjects=args.max_subjects, accept_licenses=args.accept_licenses)
    out_dir = resolve_path(args.out)
    summary = build_pretrain_corpus(args.datasets, out_dir, settings, subjects=args.subjects, pack=args.pack)
    print(format_summary(summary))
    print(f"wrote {out_dir}/manifest.csv and summary.json" + (" and the packed corpus (corpus.json)" if args.pack else ""))
    return summary

