"""Stage-1 training speed: JSON with samples/s, seconds per step and peak memory of the EEG MAE.

    python benchmarks/bench_stage1.py --preset large --batch-size 4 --steps 3          # CPU
    python benchmarks/bench_stage1.py --preset large --batch-size 100 --precision bf16-mixed --device cuda

One step = the MAE forward on random EEG [batch, 128, 512], the masked loss, backward, gradient
clipping and an AdamW update, as in `MAEPretrainModule` (speed does not depend on the data).
Untimed warm-up steps come first. Memory: on a GPU `torch.cuda.max_memory_allocated`; on the CPU
the process's peak resident set size (which includes the Python/torch baseline, also reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from dreamdiffusion.core.files import atomic_write_json
from dreamdiffusion.models.mae import ENCODER_PRESETS, MaskedEEGAutoencoder, count_parameters
from dreamdiffusion.train.stage1 import parameter_groups

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def peak_rss_gib() -> float:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rss_before = peak_rss_gib()
    model = MaskedEEGAutoencoder(n_channels=args.n_channels, n_times=args.n_times, patch_size=4,
                                 **ENCODER_PRESETS[args.preset], mask_ratio=args.mask_ratio).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=2.5e-4, betas=(0.9, 0.95))
    dtype = AUTOCAST[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    eeg = torch.randn(args.batch_size, args.n_channels, args.n_times, device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(eeg)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        scaler.step(optimizer)
        scaler.update()
        return loss.detach().item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    result = {
        "benchmark": "stage1_mae_train_step",
        "preset": args.preset,
        "encoder": ENCODER_PRESETS[args.preset],
        "parameters_encoder": count_parameters(model.encoder),
        "parameters_total": count_parameters(model),
        "batch_size": args.batch_size,
        "input": [args.n_channels, args.n_times],
        "mask_ratio": args.mask_ratio,
        "precision": args.precision,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "seconds_per_step": round(seconds, 4),
        "seconds_per_step_min": round(min(times), 4),
        "samples_per_second": round(args.batch_size / seconds, 3),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["memory_measure"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_gib"] = round(peak_rss_gib(), 3)
        result["rss_before_model_gib"] = round(rss_before, 3)
        result["memory_measure"] = "peak resident set size of the process (ru_maxrss)"
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(ENCODER_PRESETS), default="large")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=sorted(AUTOCAST), default="32-true")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--n-channels", type=int, default=128)
    parser.add_argument("--n-times", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0) or 0),
                        help="torch CPU threads (default: OMP_NUM_THREADS or torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
