"""Loader speed at the paper's data size, on this machine: JSON with

- stage 1: samples/s of the per-file loader (`EEGPretrainDataset`, one `.npy` opened per sample) and the
  packed one (`PackedEEGDataset`) side by side - the same process, the same workers, the same sampled
  windows, measured in turns - in one process (the cost per sample of one worker) and through a
  DataLoader with --workers workers, as stage 1 loads (batch --batch-size);
- stage 1: start-up seconds of each (the per-file loader with no check record, i.e. every byte read,
  as before; its first start writing the record; a start reusing it; the packed corpus's start, which
  reads corpus.json and index.bin only), with the page faults and bytes read during each;
- stage 2: samples/s of the ImageNet-EEG loader at 512 px (random crop on) with JPEGs of ImageNet's
  size (500 x 375), with CLIP's input prepared per item and with the CLIP embeddings cached.

    python benchmarks/bench_loader.py --out benchmarks/results/bench_loader_cpu.json
    python benchmarks/bench_loader.py --corpora 200x128x2000 --batches 3 --repeats 1 --stage2-images 40   # smoke

Each corpus is synthetic, written in the MOABB builder's layout (`<Dataset>/sub-<s>/ses-0_run-<r>_win-<k>.npy`,
float32 [channels, times], plus manifest.csv), packed in place as `code/prepare_pretrain_data.py` packs,
and deleted afterwards (--keep keeps it). The values are random: loading speed does not depend on them.
Both forms of a corpus are read once before the loaders are timed, so both are read from the page cache
as far as RAM holds them (this benchmark never drops caches).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dreamdiffusion.core.files import atomic_write_json
from dreamdiffusion.data.imagenet_eeg import ImageNetEEGDataset
from dreamdiffusion.data.moabb_corpus import MANIFEST_COLUMNS
from dreamdiffusion.data.packed_corpus import PackedEEGDataset, pack_folder
from dreamdiffusion.data.pretrain_corpus import CHECK_RECORD, EEGPretrainDataset, collate_eeg, crop_window
from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg
from dreamdiffusion.train.lightning import SeededItems, SeededSampler

# What one GPU step consumes, for comparison (not measured here: this machine has no GPU). The large
# MAE step at batch 100 (32 visible tokens per sample in the encoder) is of the order of 10 ms on an
# H100 (issue 20's estimate), i.e. ~10,000 samples/s.
GPU_STAGE1_SAMPLES_PER_S_ESTIMATE = 10_000
IMAGENET_SIZE = (500, 375)  # the typical ImageNet JPEG (width x height)


# ---------------------------------------------------------------------------------------------
# Measurements


def io_counters() -> dict[str, int]:
    """Minor+major page faults (what reading a memory-mapped file costs) and bytes read by read() calls."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"page_faults": usage.ru_minflt + usage.ru_majflt, "read_bytes": 0}
    if Path("/proc/self/io").is_file():
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        out["read_bytes"] = int(fields["rchar"])
    return out


def timed_start(build: Callable[[], Dataset]) -> tuple[Dataset, dict]:
    before, started = io_counters(), time.perf_counter()
    dataset = build()
    seconds = time.perf_counter() - started
    after = io_counters()
    return dataset, {"seconds": round(seconds, 4), **{k: after[k] - before[k] for k in before}}


def stage1_loader(dataset: Dataset, workers: int, batch_size: int, seed: int) -> DataLoader:
    """Stage 1's loader (`train.stage1.PretrainData`): shuffled by a DistributedSampler, each item seeded
    by (seed, epoch, index), batches cropped into one buffer and handed on by `collate_eeg`."""
    sampler = SeededSampler(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed), seed)
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_eeg, persistent_workers=workers > 0)


def stage2_loader(dataset: Dataset, workers: int, batch_size: int, seed: int) -> DataLoader:
    """Stage 2's loader (`train.stage2._loader`): shuffled, torch's default collate."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


def samples_per_s(loader: DataLoader, batches: int) -> list[float]:
    """Samples/s over the first `batches` batches after a warm-up batch (which includes the workers'
    start), twice over the same batches: a first pass, and a second one, as every epoch after the
    first (a packed corpus's pages are then mapped in the workers already)."""
    rates = []
    for _ in range(2):
        iterator = iter(loader)
        next(iterator)
        started, n = time.perf_counter(), 0
        for _ in range(batches):
            n += len(next(iterator)["eeg"])
        rates.append(n / (time.perf_counter() - started))
        del iterator
    return rates


def side_by_side(datasets: dict[str, Dataset], make_loader: Callable, workers: int, batch_size: int, batches: int,
                 repeats: int) -> dict:
    """Each loader in turn, `repeats` times (the machine is shared and noisy: a ratio is taken within
    one turn, and the median over turns is reported), first and second pass."""
    batches = min(batches, min(len(d) for d in datasets.values()) // batch_size - 1)
    runs: dict[str, list[list[float]]] = {name: [] for name in datasets}
    for turn in range(repeats):
        for name, dataset in datasets.items():
            runs[name].append(samples_per_s(make_loader(dataset, workers, batch_size, turn), batches))
    a, b = list(datasets)
    out: dict = {"workers": workers, "batch_size": batch_size, "batches_timed": batches}
    for k, pass_name in enumerate(("first_pass", "second_pass")):
        rates = {name: [run[k] for run in runs[name]] for name in datasets}
        ratios = [y / x for x, y in zip(rates[a], rates[b])]
        out[pass_name] = {**{f"{n}_samples_per_s": round(statistics.median(v), 1) for n, v in rates.items()},
                          f"{b}_over_{a}": round(statistics.median(ratios), 2),
                          "ratio_per_turn": [round(r, 2) for r in ratios],
                          **{f"{n}_runs": [round(x, 1) for x in v] for n, v in rates.items()}}
    return out


# ---------------------------------------------------------------------------------------------
# Stage 1


def warm_page_cache(root: Path) -> None:
    """Read every file of both forms once, so neither loader is timed on disk reads the other was
    spared (as far as RAM holds both; the JSON says how much RAM the machine has)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def per_sample_costs(per_file: EEGPretrainDataset, packed: PackedEEGDataset, n: int = 500) -> dict[str, float]:
    """Microseconds per sample of what each loader does for one item, measured in turns on the same windows:
    opening a window (`np.load` of a .npy, memory-mapped: header parse and mapping; a packed window:
    a slice of a mapped shard), and the crop (the copy of the samples kept, x scale)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(packed), n)
    out = {}
    for name, open_window in [("open_npy", lambda i: np.load(per_file.files[i], mmap_mode="r")),
                              ("open_packed", packed.window)]:
        started = time.perf_counter()
        windows = [open_window(int(i)) for i in picks]
        out[f"{name}_us"] = round((time.perf_counter() - started) / n * 1e6, 1)
        started = time.perf_counter()
        for window in windows:
            crop_window(window, 128, 512, 0.1)
        out[f"crop_after_{name}_us"] = round((time.perf_counter() - started) / n * 1e6, 1)
    return out


def write_builder_corpus(root: Path, n_windows: int, n_channels: int, n_times: int, seed: int = 0) -> float:
    """`n_windows` random float32 windows in the builder's layout (10 subjects, runs of 50 windows) and
    manifest.csv; returns the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_windows):
        subject, run, win = 1 + k % 10, (k // 10) // 50, (k // 10) % 50
        rel = Path("Synthetic") / f"sub-{subject}" / f"ses-0_run-{run}_win-{win:05d}.npy"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, 10 * rng.standard_normal((n_channels, n_times), dtype=np.float32))
        rows.append({"dataset": "Synthetic", "subject": subject, "session": 0, "run": run, "n_channels": n_channels,
                     "sfreq": 1000.0, "n_times": n_times, "file": rel.as_posix(), "orig_sfreq": 1000.0,
                     "l_freq": 5.0, "h_freq": 95.0, "start": win * n_times})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return time.perf_counter() - started


def stage1(root: Path, n_windows: int, n_channels: int, n_times: int, args: argparse.Namespace) -> dict:
    seconds_to_write = write_builder_corpus(root, n_windows, n_channels, n_times)
    sizes = dict(n_channels=128, n_times=512, scale=0.1)  # the paper's encoder input
    start_up = {}
    _, start_up["per_file_no_record"] = timed_start(lambda: EEGPretrainDataset(root, check_record=False, **sizes))
    (root / CHECK_RECORD).unlink(missing_ok=True)
    _, start_up["per_file_first_start_writes_record"] = timed_start(lambda: EEGPretrainDataset(root, **sizes))
    per_file, start_up["per_file_record_reused"] = timed_start(lambda: EEGPretrainDataset(root, **sizes))
    started = time.perf_counter()
    corpus = pack_folder(root, root, log=lambda _: None)
    seconds_to_pack = time.perf_counter() - started
    packed, start_up["packed"] = timed_start(lambda: PackedEEGDataset(root, **sizes))
    # the same windows in the same order: the same samples for the same seed (checked on a few)
    for i in (0, n_windows // 2, n_windows - 1):
        torch.manual_seed(i)
        expected = per_file[i]["eeg"]
        torch.manual_seed(i)
        assert torch.equal(packed[i]["eeg"], expected)
    pair = {"per_file": per_file, "packed": packed}
    warm_page_cache(root)
    costs = per_sample_costs(per_file, packed)
    out = {"windows": n_windows, "window_shape": [n_channels, n_times],
           "corpus_gib": round(n_windows * n_channels * n_times * 4 / 2**30, 2),
           "seconds_to_write": round(seconds_to_write, 1), "seconds_to_pack": round(seconds_to_pack, 1),
           "packed_index_bytes": (root / "index.bin").stat().st_size, "start_up": start_up,
           "per_sample_costs_us": costs,
           "one_process": side_by_side(pair, stage1_loader, 0, args.batch_size, args.batches, args.repeats),
           "workers": side_by_side(pair, stage1_loader, args.workers, args.batch_size, args.batches, args.repeats)}
    assert corpus["n_windows"] == n_windows
    return out


# ---------------------------------------------------------------------------------------------
# Stage 2


def imagenet_sized_jpegs(image_dir: Path, seed: int = 0) -> float:
    """Rewrite every JPEG below `image_dir` at ImageNet's typical 500 x 375 with some texture (JPEGs of
    flat synthetic drawings decode far faster than photographs); returns their mean size in KiB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for path in sorted(image_dir.rglob("*.JPEG")):
        with Image.open(path) as img:
            base = np.asarray(img.convert("RGB").resize(IMAGENET_SIZE, Image.BICUBIC), dtype=np.float32)
        noise = rng.normal(0, 14, base.shape[:2] + (1,)).repeat(3, axis=2)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


class _Stage2Items(Dataset):
    """ImageNet-EEG items with the tensors only (the collate of the stage-2 loader)."""

    def __init__(self, dataset: ImageNetEEGDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {k: v for k, v in self.dataset[i].items() if torch.is_tensor(v)}


def stage2(root: Path, args: argparse.Namespace) -> dict:
    paths = write_synthetic_imagenet_eeg(root, n_classes=args.stage2_images // 10, images_per_class=10,
                                         n_subjects=1, image_size=64, seed=0)
    kib = imagenet_sized_jpegs(paths["image_dir"])

    def dataset(cache_clip: bool) -> _Stage2Items:
        ds = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], paths["image_dir"], subject=1, split="train",
                                image_size=512, augment=True)
        if cache_clip:
            ds.clip_transform = None  # what WithImageFeatures does once the embeddings are cached
        return _Stage2Items(ds)

    pair = {"clip_input_per_item": dataset(False), "clip_cached": dataset(True)}
    batches = max(1, args.stage2_samples // args.stage2_batch_size)
    settings = (args.stage2_batch_size, batches, args.repeats)
    return {"images": len(list(paths["image_dir"].rglob("*.JPEG"))), "jpeg_size": list(IMAGENET_SIZE),
            "jpeg_mean_kib": round(kib, 1), "image_size": 512, "trials": len(pair["clip_cached"]),
            "one_process": side_by_side(pair, stage2_loader, 0, *settings),
            "workers": side_by_side(pair, stage2_loader, args.workers, *settings)}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", default=["2000x128x2000", "20000x128x600"],
                        help="WINDOWSxCHANNELSxTIMES per corpus (default: the builder's 2 s windows at 1 kHz for "
                             "2,000; 0.6 s windows for 20,000, so they fit on this disk: 5.7 GiB, twice with the packed copy)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100, help="stage 1's batch (per device)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="turns of each loader (median reported)")
    parser.add_argument("--stage2-images", type=int, default=400, help="images of the synthetic ImageNet-EEG")
    parser.add_argument("--stage2-samples", type=int, default=160, help="timed samples per stage-2 measurement")
    parser.add_argument("--stage2-batch-size", type=int, default=4, help="stage 2's batch (per device)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dreamdiffusion_bench_loader"))
    parser.add_argument("--keep", action="store_true", help="keep the corpora under --scratch")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a DataLoader worker runs (torch sets 1 thread in each worker)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {ram_gib:.0f} GiB RAM (shared with other jobs: "
                         f"noisy; load average {os.getloadavg()[0]:.1f} at the start)",
              "torch": torch.__version__,
              "page_cache": "both forms of a corpus read once before the loaders are timed; caches never dropped",
              "gpu_stage1_samples_per_s_estimate": GPU_STAGE1_SAMPLES_PER_S_ESTIMATE, "stage1": []}
    try:
        for spec in args.corpora:
            n_windows, n_channels, n_times = (int(x) for x in spec.split("x"))
            root = args.scratch / f"corpus_{spec}"
            shutil.rmtree(root, ignore_errors=True)
            result["stage1"].append(stage1(root, n_windows, n_channels, n_times, args))
            print(json.dumps(result["stage1"][-1]), file=sys.stderr)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        root = args.scratch / "imagenet_eeg"
        shutil.rmtree(root, ignore_errors=True)
        result["stage2"] = stage2(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
