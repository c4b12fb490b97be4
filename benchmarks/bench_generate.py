"""Generation speed of `DreamDiffusionPipeline` per sampler and step count: JSON with seconds per image.

    # the real setting: SD1.5-sized UNet/VAE (random weights) at 512 px on a GPU, fp16
    python benchmarks/bench_generate.py --device cuda --out results/bench_generate_gpu.json
    # a CPU run at a small size
    python benchmarks/bench_generate.py --device cpu --image-size 64 --samplers plms:10 ddim:10 dpm++:10
    # 512 px where a full run is too slow (the CPU): time 2 and 4 steps, project 250 / 25 linearly
    python benchmarks/bench_generate.py --device cpu --num-images-per-eeg 1 --samplers \
        --project plms:250 dpm++:25 --measure-steps 2 4

The models are built from `--sd-config-dir` (SD1.5's configs by default) with random weights:
speed does not depend on the weights. The EEG encoder is the paper's "large" one by default
(`--encoder small` for a quick run); it runs once per batch, the UNet once per step. One
untimed warm-up call precedes the measurements. `--sample-size` overrides the UNet's
sample_size so the image side is `--image-size`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from dreamdiffusion.config import resolve_path  # noqa: E402
from dreamdiffusion.core.files import atomic_write_json  # noqa: E402
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, time_cond_overrides  # noqa: E402
from dreamdiffusion.models.mae import EEGEncoder  # noqa: E402
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline  # noqa: E402
from dreamdiffusion.models.sd15 import build_sd15, read_sd15_configs  # noqa: E402

ENCODERS = {
    "large": dict(embed_dim=1024, depth=24, num_heads=16),  # the paper's (about 297M parameters)
    "small": dict(embed_dim=256, depth=2, num_heads=8),
}


def build(config_dir: str, image_size: int, encoder: str, device, dtype) -> DreamDiffusion:
    unet_config, vae_config, scheduler_config = read_sd15_configs(resolve_path(config_dir) if config_dir else None)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if image_size % factor:
        raise SystemExit(f"--image-size must be a multiple of the VAE factor {factor}")
    overrides = {**time_cond_overrides(), "sample_size": image_size // factor}
    sd = build_sd15(unet_config, vae_config, scheduler_config, unet_overrides=overrides)
    eeg_encoder = EEGEncoder(n_channels=128, n_times=512, patch_size=4, mlp_ratio=1.0, **ENCODERS[encoder])
    model = DreamDiffusion.build(eeg_encoder, sd, clip_dim=768)
    return model.to(device=device, dtype=dtype).eval()


def _projected(run, entry: str, measure: tuple[int, int], repeats: int, n_images: int) -> dict:
    """Time `sampler` at two step counts; seconds = fixed + per_step x steps, projected to `steps`.
    Each sampler's UNet calls are linear in the steps (PLMS: steps + 1), so two points fix the line."""
    sampler, _, steps = entry.partition(":")
    a, b = measure
    ta, tb = (min(run(sampler, n) for _ in range(repeats)) for n in (a, b))
    per_step = (tb - ta) / (b - a)
    seconds = ta + per_step * (int(steps) - a)
    return {"sampler": sampler, "steps": int(steps), "images": n_images, "projected": True,
            "measured": {f"{a}_steps_s": round(ta, 3), f"{b}_steps_s": round(tb, 3)},
            "seconds": round(seconds, 1), "seconds_per_image": round(seconds / n_images, 2),
            "images_per_second": round(n_images / seconds, 6),
            "seconds_per_step_per_image": round(per_step / n_images, 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--sd-config-dir", default=None, help="default: SD1.5's configs (package data)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="large")
    parser.add_argument("--n-trials", type=int, default=1, help="EEG trials per pipeline call")
    parser.add_argument("--num-images-per-eeg", type=int, default=5)
    parser.add_argument("--samplers", nargs="*", default=["plms:250", "plms:50", "ddim:250", "ddim:50", "dpm++:25"],
                        help="sampler:steps entries")
    parser.add_argument("--project", nargs="*", default=[], metavar="SAMPLER:STEPS",
                        help="entries not run in full: timed at --measure-steps and projected linearly (labelled)")
    parser.add_argument("--measure-steps", type=int, nargs=2, default=(2, 4), metavar=("A", "B"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the JSON here as well")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    model = build(args.sd_config_dir, args.image_size, args.encoder, device, dtype)
    pipe = DreamDiffusionPipeline.from_model(model)
    pipe.set_progress_bar_config(disable=True)
    eeg = torch.randn(args.n_trials, 128, 512)

    def run(sampler: str, steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(eeg, num_images_per_eeg=args.num_images_per_eeg, num_inference_steps=steps, sampler=sampler,
             generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run("ddim", 1)  # warm-up: allocations, kernels
    n_images = args.n_trials * args.num_images_per_eeg
    results = []
    for entry in args.samplers:
        sampler, _, steps = entry.partition(":")
        steps = int(steps)
        seconds = min(run(sampler, steps) for _ in range(args.repeats))
        results.append({"sampler": sampler, "steps": steps, "images": n_images, "seconds": round(seconds, 3),
                        "seconds_per_image": round(seconds / n_images, 4),
                        "images_per_second": round(n_images / seconds, 4),
                        "seconds_per_step_per_image": round(seconds / steps / n_images, 5)})
        print(json.dumps(results[-1]), flush=True)
    for entry in args.project:
        results.append(_projected(run, entry, args.measure_steps, args.repeats, n_images))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": "DreamDiffusionPipeline generation (random weights)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "sd_config_dir": args.sd_config_dir,
        "image_size": args.image_size,
        "encoder": args.encoder,
        "n_trials_per_call": args.n_trials,
        "num_images_per_eeg": args.num_images_per_eeg,
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "torch": torch.__version__,
        "results": results,
    }
    if args.out:
        atomic_write_json(resolve_path(args.out), report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
