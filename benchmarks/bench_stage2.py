"""Seconds per stage-2 training step and peak memory at full SD1.5 size, with random weights.

Builds the real architecture - SD1.5's UNet and VAE from the package's SD1.5 configs, CLIP ViT-L/14's vision tower
from its config, the paper's `large` EEG encoder - so no download is needed, then times
`training_losses` + backward + AdamW step on the parameters `select_trainable` picks.

With `--caches`, the step is also timed with the work done once in stage 2 (`data/stage2_cache.py`),
in turns with the step that does it every time: `clip` (the batch carries the CLIP image embeddings,
cache_clip_embeddings=true) and `clip+latents` (also the VAE posteriors, cache_latents=true). The
seconds of the CLIP forward and of the VAE encoder alone are reported too.

    python benchmarks/bench_stage2.py --resolution 512 --batch-size 4 --precision bf16-mixed --device cuda
    python benchmarks/bench_stage2.py --resolution 128 --batch-size 1 --steps 2 --device cpu
    python benchmarks/bench_stage2.py --resolution 512 --batch-size 1 --steps 2 --device cpu --caches clip clip+latents

Prints one JSON object (and writes it to --out if given). Peak memory is CUDA's max allocated
memory on a GPU, the process's peak resident set size on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamdiffusion.models.clip_embedder import CLIP_VIT_L14_VISION, TransformersCLIP
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, select_trainable, time_cond_overrides
from dreamdiffusion.models.mae import EEGEncoder
from dreamdiffusion.models.sd15 import build_sd15, read_sd15_configs

ENCODER_LARGE = dict(n_channels=128, n_times=512, patch_size=4, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=1.0)
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def build(device: str, gradient_checkpointing: bool) -> DreamDiffusion:
    sd = build_sd15(*read_sd15_configs(), unet_overrides=time_cond_overrides())
    clip = TransformersCLIP.from_model(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION)).eval())
    model = DreamDiffusion.build(EEGEncoder(**ENCODER_LARGE), sd, clip_encoder=clip)
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    return model.to(device).train()


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cached_batches(model: DreamDiffusion, batch: dict, caches: list[str], autocast, device: str) -> tuple[dict, dict]:
    """({variant: batch}, seconds of the work a cache removes): the batch as each cache makes it - the
    CLIP embeddings and VAE posteriors computed here once, as `data/stage2_cache.py` computes them."""
    seconds = {}
    with torch.no_grad(), autocast:
        sync(device)
        start = time.perf_counter()
        clip_embeds = model.clip_encoder(batch["clip_pixel_values"]).float()
        sync(device)
        seconds["clip_forward"] = time.perf_counter() - start
        moments = model.image_moments(batch["image"])
        sync(device)
        seconds["vae_encode"] = time.perf_counter() - start - seconds["clip_forward"]
    variants = {"per_step": batch}
    if "clip" in caches:
        variants["clip"] = {"eeg": batch["eeg"], "image": batch["image"], "clip_embeds": clip_embeds}
    if "clip+latents" in caches:
        variants["clip+latents"] = {"eeg": batch["eeg"], "latent_moments": moments, "clip_embeds": clip_embeds}
    return variants, {k: round(v, 3) for k, v in seconds.items()}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = args.device
    model = build(device, args.gradient_checkpointing)
    table = select_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5.3e-5)
    b, s = args.batch_size, args.resolution
    batch = {
        "eeg": torch.randn(b, 128, 512, device=device),
        "image": torch.rand(b, 3, s, s, device=device) * 2 - 1,
        "clip_pixel_values": torch.randn(b, 3, 224, 224, device=device),
    }
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=AUTOCAST[args.precision])
                if args.precision in AUTOCAST else contextlib.nullcontext())
    variants, work_seconds = cached_batches(model, batch, args.caches, autocast, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        for name, inputs in variants.items():  # in turns: the machine's load changes over a run
            sync(device)
            start = time.perf_counter()
            with autocast:
                losses = model.training_losses(inputs)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
            optimizer.step()
            sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    per_variant = {name: {"seconds_per_step": round(sum(t) / len(t), 3), "seconds_per_step_min": round(min(t), 3),
                          "runs": [round(x, 3) for x in t],
                          "vs_per_step": round(sum(t) / sum(times["per_step"]), 3)} for name, t in times.items()}
    times = times["per_step"]
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "resolution": s,
        "latent_size": s // model.vae_scale_factor,
        "batch_size": b,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_timed": args.steps,
        "seconds_per_step": sum(times) / len(times),
        "seconds_per_step_min": min(times),
        "peak_memory_gib": round(peak_memory_gib(device), 3),
        "trainable_parameters": sum(r["trainable"] for r in table),
        "frozen_parameters": sum(r["frozen"] for r in table),
        "loss": float(losses["loss"].detach()),
        "torch": torch.__version__,
        **({"caches": per_variant, "work_a_cache_removes_seconds": work_seconds} if args.caches else {}),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: /8)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"], default="32-true")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--caches", nargs="*", choices=["clip", "clip+latents"], default=[],
                        help="also time the step with these stage-2 caches, in turns with the per-step one")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8 (the VAE's factor), got {args.resolution}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
