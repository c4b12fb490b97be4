"""Every GPU figure of the project from one command: `make gpu-report` (python benchmarks/gpu_report.py).

On one GPU, in at most ~8 minutes (about 3-4 on an H100), it measures and writes
results/gpu_report.json and results/gpu_report.md:
  1. stage 1: the paper's large MAE at batch 100 in bf16 (fused AdamW, gradient clipping, as
     `MAEPretrainModule`): step time, samples/s, peak CUDA memory; beside it the stage-1 loader's
     samples/s (random EEG in the builder's format, per-file and packed, the run's loader settings);
  2. stage 2 at 512 px with SD1.5-sized random-weight UNet/VAE, CLIP ViT-L/14 and the large encoder,
     bf16, batch 4 and 25, gradient checkpointing off/on, CLIP image encoder run every step / its
     embeddings cached: step time, peak memory (allocated and reserved) and the computed estimate
     (`core/memory.py`) beside it; the CUDA context as measured;
  3. generation: images/s of DPM-Solver++ (25 steps) and PLMS (250) at batch 1 and 8, in stage 3's
     `precision=auto` dtype, the EEG conditioner in fp32;
  4. checks (tests/test_gpu_rules.py's rules, on CUDA): FID built with its network on the GPU, fp32
     latents out of a bf16 VAE under autocast and out of a bf16 UNet's sampling, byte-identical
     repeats of each sampler.
A row that fails (out of memory, say) is recorded with its error and the others still run.
`--tiny` runs the same rows at toy sizes on the CPU in well under 3 minutes (`make test` runs it:
tests/test_gpu_rules.py); its figures mean nothing, only that every row runs.

Weights are random (speed and memory do not depend on them), so nothing is downloaded.

A GPU machine without network access: carry the packages it lacks as wheels. A box with torch,
Lightning, transformers, timm, torchmetrics, scikit-image and huggingface_hub (>= 1.32 for diffusers
0.42) lacks diffusers and omegaconf; fetch them on a machine with pip access, in the repository root
(`.whl/` is git-ignored; `--python-version` is the GPU box's):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 omegaconf==2.3.0
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # omegaconf's parser: an sdist only

(open_clip, torch-fidelity and wandb are not needed here; diffusers' importlib_metadata is the
standard library's on Python >= 3.8). `make gpu-report` then installs them with `pip install
--no-index --no-deps --target .whl/site .whl/*.whl` before the run and puts `.whl/site` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from dreamdiffusion.config import Stage1Config, Stage2Config  # noqa: E402
from dreamdiffusion.core.files import atomic_write_json, atomic_write_text  # noqa: E402
from dreamdiffusion.core.memory import GIB, estimate, peak_rss_bytes, store_frozen_at  # noqa: E402
from dreamdiffusion.core.precision import bf16_supported, numerics_record, set_tf32  # noqa: E402
from dreamdiffusion.data.packed_corpus import open_pretrain_corpus, pack_folder  # noqa: E402
from dreamdiffusion.evaluation.metrics import DistributionMetrics  # noqa: E402
from dreamdiffusion.models.clip_embedder import CLIP_VIT_L14_VISION, TransformersCLIP  # noqa: E402
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, select_trainable, time_cond_overrides  # noqa: E402
from dreamdiffusion.models.mae import EEGEncoder, build_mae  # noqa: E402
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline  # noqa: E402
from dreamdiffusion.models.sd15 import build_sd15, read_sd15_configs  # noqa: E402
from dreamdiffusion.train.lightning import SeededItems, SeededSampler, adamw  # noqa: E402
from dreamdiffusion.train.stage1 import parameter_groups  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sizes:
    """What the rows run at: the paper's sizes, or toy ones (`--tiny`)."""

    name: str
    encoder: dict[str, Any]  # the EEG encoder of stages 1 and 2
    decoder: dict[str, Any]
    stage1_batch: int
    stage2_batches: tuple[int, ...]
    image_size: int
    clip_vision: dict[str, Any]
    generation_batches: tuple[int, ...]
    samplers: tuple[tuple[str, int], ...]
    timed_steps: int
    warmup_steps: int
    loader_files: int
    loader_batches: int
    sd_configs: tuple[dict, dict, dict] = field(default_factory=read_sd15_configs)


def paper_sizes() -> Sizes:
    stage1 = OmegaConf.to_container(OmegaConf.structured(Stage1Config))
    return Sizes("paper", stage1["encoder"], stage1["decoder"], stage1_batch=100, stage2_batches=(4, 25),
                 image_size=512, clip_vision=CLIP_VIT_L14_VISION, generation_batches=(1, 8),
                 samplers=(("dpm++", 25), ("plms", 250)), timed_steps=10, warmup_steps=3, loader_files=600,
                 loader_batches=30)


def tiny_sizes() -> Sizes:
    unet = dict(UNet2DConditionModel.from_config(dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)).config)
    vae = dict(AutoencoderKL.from_config(dict(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)).config)
    encoder = dict(n_channels=8, n_times=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0)
    decoder = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    clip = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                patch_size=8, projection_dim=16)
    return Sizes("tiny", encoder, decoder, stage1_batch=8, stage2_batches=(2, 3), image_size=16, clip_vision=clip,
                 generation_batches=(1, 2), samplers=(("dpm++", 3), ("plms", 4)), timed_steps=2, warmup_steps=1,
                 loader_files=24, loader_batches=3, sd_configs=(unet, vae, read_sd15_configs()[2]))


# ---------------------------------------------------------------------------------------------
# Timing and memory


class Clock:
    """Seconds of GPU work between `start` and `stop` from CUDA events (one sync, at `stop`); the wall
    clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self._begin
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._begin.elapsed_time(end) / 1000


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {"peak_rss_gib": round(peak_rss_bytes() / GIB, 3)}
    free, total = torch.cuda.mem_get_info(device)
    return {"max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
            "cuda_context_and_others_gib": round((total - free - torch.cuda.memory_reserved(device)) / GIB, 3)}


def guarded(name: str, rows: list[dict[str, Any]], run: Callable[[], dict[str, Any]], started: float) -> None:
    """`run()`'s row appended to `rows`; a failure (out of memory, say) is recorded as the row's error."""
    try:
        row = run()
    except (RuntimeError, torch.cuda.OutOfMemoryError, ValueError) as err:  # the row fails, the report goes on
        row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    row = {"row": name, **row}
    rows.append(row)
    print(f"[{time.perf_counter() - started:6.1f} s] {name}: " + json.dumps(
        {k: v for k, v in row.items() if k != "row"}, default=str)[:400], flush=True)


def amp(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# 1. Stage 1


def stage1_step_row(sizes: Sizes, device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """The MAE step of `MAEPretrainModule`: forward, masked loss, backward, clipping, fused AdamW."""
    defaults = Stage1Config()
    torch.manual_seed(0)
    with device:
        model = build_mae(sizes.encoder, sizes.decoder, defaults.mask_ratio).train()
        eeg = torch.randn(sizes.stage1_batch, sizes.encoder["n_channels"], sizes.encoder["n_times"])
    optimizer = adamw(parameter_groups(model, defaults.weight_decay), lr=defaults.lr, betas=tuple(defaults.betas))

    def step() -> None:
        with amp(device, dtype):
            loss = model(eeg)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(sizes.warmup_steps):
        step()
    reset_peak(device)
    clock = Clock(device)
    clock.start()
    for _ in range(sizes.timed_steps):
        step()
    seconds = clock.stop() / sizes.timed_steps
    return {"batch": sizes.stage1_batch, "precision": str(dtype or torch.float32), "step_ms": round(seconds * 1000, 2),
            "samples_per_s": round(sizes.stage1_batch / seconds, 1), "fused_adamw": bool(optimizer.defaults["fused"]),
            **peak_memory(device)}


def write_random_corpus(root: Path, sizes: Sizes) -> None:
    """`loader_files` recordings of random EEG in the builder's format (sub-XX/*.npy, float32
    [channels, time]); the loader's speed does not depend on the values."""
    rng = np.random.default_rng(0)
    for i in range(sizes.loader_files):
        n_channels = (32, 64, 128)[i % 3] if sizes.name == "paper" else sizes.encoder["n_channels"]
        length = int(rng.integers(2, 4) * sizes.encoder["n_times"])
        folder = root / f"sub-{i % 8:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"rec{i:05d}.npy", rng.standard_normal((n_channels, length), dtype=np.float32))


def loader_rows(sizes: Sizes, device: torch.device, workdir: Path) -> list[dict[str, Any]]:
    """Samples/s of stage 1's loader (SeededItems + SeededSampler, persistent workers, pinned memory
    on a GPU), over a folder of *.npy and over the same windows packed."""
    folder, packed = workdir / "npy", workdir / "packed"
    write_random_corpus(folder, sizes)
    pack_folder(folder, packed, log=lambda message: None)
    workers = min(8, os.cpu_count() or 1) if sizes.name == "paper" else 1
    rows = []
    for kind, root in (("folder of *.npy", folder), ("packed", packed)):
        data = OmegaConf.structured(Stage1Config).data
        data.root, data.n_channels, data.n_times = str(root), sizes.encoder["n_channels"], sizes.encoder["n_times"]
        data.check_record = str(workdir / f"checks_{kind[0]}.json")
        dataset = open_pretrain_corpus(data)
        sampler = SeededSampler(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0), seed=0)
        loader = DataLoader(SeededItems(dataset), batch_size=sizes.stage1_batch, sampler=sampler, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
        n, started, batches = 0, None, 0
        while batches < sizes.loader_batches:
            for batch in loader:
                if started is None:
                    started = time.perf_counter()  # after the first batch: the workers are up
                else:
                    n += len(batch["eeg"])
                batches += 1
                if batches >= sizes.loader_batches:
                    break
        seconds = time.perf_counter() - started
        rows.append({"corpus": kind, "windows": len(dataset), "workers": workers, "batch": sizes.stage1_batch,
                     "samples_per_s": round(n / seconds, 1) if seconds > 0 else None})
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Stage 2


def build_stage2(sizes: Sizes, device: torch.device, dtype: torch.dtype | None) -> DreamDiffusion:
    """SD1.5's UNet/VAE and CLIP from configs with random weights, the encoder, "paper" trainable set;
    the frozen CLIP's matrices stored at the autocast dtype, as Stage2Module.setup does."""
    torch.manual_seed(0)
    unet_config, vae_config, scheduler_config = sizes.sd_configs
    with device:
        sd = build_sd15(unet_config, vae_config, scheduler_config, unet_overrides=time_cond_overrides())
        clip = TransformersCLIP.from_model(CLIPVisionModelWithProjection(CLIPVisionConfig(**sizes.clip_vision)).eval())
        model = DreamDiffusion.build(EEGEncoder(**sizes.encoder), sd, clip_encoder=clip)
    select_trainable(model, "paper")
    if dtype is not None:
        store_frozen_at(model.clip_encoder, dtype)
    return model.to(device).train()


def stage2_batch(model: DreamDiffusion, sizes: Sizes, n: int, device: torch.device, cached_clip: bool) -> dict:
    clip_size = sizes.clip_vision["image_size"]
    batch = {"eeg": torch.randn(n, sizes.encoder["n_channels"], sizes.encoder["n_times"], device=device),
             "image": torch.rand(n, 3, sizes.image_size, sizes.image_size, device=device) * 2 - 1}
    if cached_clip:  # the CLIP image embeddings computed once (train/stage2_cache.py)
        batch["clip_embeds"] = torch.randn(n, model.clip_encoder.projection_dim, device=device)
    else:
        batch["clip_pixel_values"] = torch.randn(n, 3, clip_size, clip_size, device=device)
    return batch


def stage2_row(model: DreamDiffusion, sizes: Sizes, device: torch.device, dtype: torch.dtype | None, batch_size: int,
               checkpointing: bool, cached_clip: bool, estimates: dict) -> dict[str, Any]:
    """Step time and peak memory of `training_losses` + backward + clipping + fused AdamW, with the
    computed estimate of the same setting beside them."""
    defaults = Stage2Config()
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "16-mixed" if dtype == torch.float16 else "32-true"
    (model.unet.enable_gradient_checkpointing if checkpointing else model.unet.disable_gradient_checkpointing)()
    key = (checkpointing, cached_clip)
    if key not in estimates:  # per sample + fixed: one estimate serves every batch size
        estimates[key] = estimate(model, lambda n: model.training_losses(
            stage2_batch(model, sizes, n, device, cached_clip))["loss"], precision, checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=defaults.lr, weight_decay=defaults.weight_decay)
    batch = stage2_batch(model, sizes, batch_size, device, cached_clip)

    def step() -> None:
        with amp(device, dtype):
            loss = model.training_losses(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, defaults.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        reset_peak(device)
        for _ in range(sizes.warmup_steps):
            step()
        clock = Clock(device)
        clock.start()
        for _ in range(sizes.timed_steps):
            step()
        seconds = clock.stop() / sizes.timed_steps
        memory = peak_memory(device)
    finally:  # the next row starts without this row's gradients and AdamW states
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
    est = estimates[key]
    return {"batch": batch_size, "gradient_checkpointing": checkpointing, "clip": "cached" if cached_clip else "every step",
            "precision": precision, "step_ms": round(seconds * 1000, 1), "samples_per_s": round(batch_size / seconds, 2),
            **memory, "estimate_tensors_gib": round(est.counted(batch_size) / GIB, 2),
            "estimate_peak_gib": round(est.peak(batch_size) / GIB, 2), "estimate": est.describe(batch_size)}


# ---------------------------------------------------------------------------------------------
# 3. Generation and 4. the checks


def generation_pipe(model: DreamDiffusion, dtype: torch.dtype) -> DreamDiffusionPipeline:
    """The pipeline as stage 3 runs it: UNet and VAE in `dtype`, the EEG conditioner fp32, eval mode."""
    pipe = DreamDiffusionPipeline.from_model(model.eval())
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)
    pipe.conditioner.float()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation_row(pipe: DreamDiffusionPipeline, sizes: Sizes, sampler: str, steps: int, batch: int) -> dict[str, Any]:
    eeg = torch.randn(batch, sizes.encoder["n_channels"], sizes.encoder["n_times"])
    kwargs = dict(num_images_per_eeg=1, sampler=sampler, output_type="np")
    pipe(eeg, num_inference_steps=2, generator=torch.Generator().manual_seed(1), **kwargs)  # warm-up
    started = time.perf_counter()
    pipe(eeg, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)  # ends on the host
    seconds = time.perf_counter() - started
    return {"sampler": sampler, "steps": steps, "batch": batch, "dtype": str(pipe.unet.dtype),
            "seconds": round(seconds, 2), "images_per_s": round(batch / seconds, 3)}


class _Features(nn.Module):
    """A small feature network for the FID check (uint8 [N, 3, H, W] -> [N, 8]), without `num_features`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() / 255).mean(dim=(2, 3))


def checks(model: DreamDiffusion, pipe: DreamDiffusionPipeline, sizes: Sizes, device: torch.device,
           dtype: torch.dtype) -> dict[str, Any]:
    """tests/test_gpu_rules.py's device and dtype rules, on this device."""
    out: dict[str, Any] = {}
    with warnings.catch_warnings():  # KID's and IS's notes that they keep every feature
        warnings.simplefilter("ignore", UserWarning)
        metrics = DistributionMetrics(_Features().to(device))  # images arrive on the CPU, as stage 3 reads PNGs
    g = torch.Generator().manual_seed(0)
    for real in (True, False):
        metrics.update(torch.randint(0, 256, (8, 3, 64, 64), generator=g, dtype=torch.uint8), real=real)
    out["fid_with_network_on_device"] = round(metrics.compute()["fid"], 4)
    images = torch.rand(2, 3, sizes.image_size, sizes.image_size, device=device) * 2 - 1
    vae_dtype = pipe.vae.dtype  # the pipeline shares the model's VAE, already in `dtype`
    with amp(device, dtype if dtype != torch.float32 else None), torch.no_grad():
        out["latents_dtype_from_vae"] = f"{model.encode_images(images).dtype} (VAE in {vae_dtype}, autocast {dtype})"
    eeg = torch.randn(2, sizes.encoder["n_channels"], sizes.encoder["n_times"])
    latents = pipe(eeg, num_images_per_eeg=1, num_inference_steps=3, sampler="dpm++", output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    out["latents_dtype_from_sampling"] = f"{latents.dtype} (UNet in {pipe.unet.dtype})"
    for sampler in ("plms", "ddim", "dpm++"):
        runs = [pipe(eeg, num_images_per_eeg=2, num_inference_steps=5, sampler=sampler, output_type="np",
                     generator=torch.Generator().manual_seed(3)).images for _ in range(2)]
        out[f"repeat_identical_{sampler}"] = bool(np.array_equal(runs[0], runs[1]))
    return out


# ---------------------------------------------------------------------------------------------
# The report


def run(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    set_tf32(True)
    native = bf16_supported(device)  # a GPU of compute capability >= 8.0; the CPU (--tiny) runs bf16 too
    train_dtype = torch.bfloat16 if native else None  # trainer.precision=auto on a GPU
    gen_dtype = torch.bfloat16 if native else torch.float32  # stage 3's precision=auto on a GPU
    report: dict[str, Any] = {"sizes": sizes.name, "device": str(device), "numerics": numerics_record(device),
                              "platform": platform.platform(), "python": platform.python_version(),
                              "stage1": [], "loader": [], "stage2": [], "generation": [], "checks": []}
    guarded("stage 1 step", report["stage1"], lambda: stage1_step_row(sizes, device, train_dtype), started)
    with tempfile.TemporaryDirectory() as workdir:
        rows: list[dict[str, Any]] = []
        guarded("stage 1 loader", rows, lambda: {"rows": loader_rows(sizes, device, Path(workdir))}, started)
        report["loader"] = rows[0].get("rows", rows)
    model = build_stage2(sizes, device, train_dtype)
    estimates: dict = {}
    for checkpointing in (False, True):
        for cached_clip in (False, True):
            for batch in sizes.stage2_batches:
                name = f"stage 2 batch {batch}, checkpointing {'on' if checkpointing else 'off'}, CLIP " + (
                    "cached" if cached_clip else "every step")
                guarded(name, report["stage2"], lambda b=batch, c=checkpointing, k=cached_clip: stage2_row(
                    model, sizes, device, train_dtype, b, c, k, estimates), started)
    model.unet.disable_gradient_checkpointing()
    pipe = generation_pipe(model, gen_dtype)
    for sampler, steps in sizes.samplers:
        for batch in sizes.generation_batches:
            guarded(f"generation {sampler} {steps} steps, batch {batch}", report["generation"],
                    lambda s=sampler, n=steps, b=batch: generation_row(pipe, sizes, s, n, b), started)
    guarded("checks", report["checks"], lambda: checks(model, pipe, sizes, device, gen_dtype), started)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, row.get("error", "–") if c == columns[-1] else "–"))
                                       for c in columns) + " |")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    numerics = report["numerics"]
    memory = (["max_allocated_gib", "max_reserved_gib"] if report["device"].startswith("cuda") else ["peak_rss_gib"])
    lines = [f"# GPU report ({report['sizes']} sizes) on {numerics['device_name']}", "",
             f"torch {numerics['torch']}; TF32 matmul {numerics['tf32_matmul']}, conv {numerics['tf32_conv']}; "
             f"native bf16 {numerics['native_bf16']}; {report['seconds']} s in all. Step times: the mean over the "
             "timed steps (warm-up steps first) from CUDA events on a GPU, the wall clock on the CPU; peak memory: "
             "torch.cuda.max_memory_allocated / reserved of the row (the process's peak RSS on the CPU).", "",
             "## Stage 1", ""]
    lines += _table(report["stage1"], ["batch", "precision", "step_ms", "samples_per_s", *memory, "error"])
    lines += ["", "Loader (stage 1's, on random EEG in the builder's format):", ""]
    lines += _table(report["loader"], ["corpus", "windows", "workers", "batch", "samples_per_s", "error"])
    lines += ["", "## Stage 2 (the estimate of core/memory.py beside the measured peak)", ""]
    lines += _table(report["stage2"], ["batch", "gradient_checkpointing", "clip", "step_ms", "samples_per_s", *memory,
                                       "estimate_tensors_gib", "estimate_peak_gib", "error"])
    lines += ["", "## Generation", ""]
    lines += _table(report["generation"], ["sampler", "steps", "batch", "dtype", "seconds", "images_per_s", "error"])
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for row in report["checks"] for k, v in row.items() if k != "row"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: every row runs, no figure means anything")
    parser.add_argument("--device", default=None, help="default: cuda when there is a GPU (the CPU with --tiny)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results", help="where gpu_report.json/.md go")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device} but torch sees no CUDA GPU")
    if not args.tiny and device.type != "cuda":
        parser.error("the paper-size rows need a GPU; use --tiny for a CPU run of every row at toy sizes")
    diffusers_logging.set_verbosity_error()  # its advice on casting with `.to()`: the casts here are stage 3's
    report = run(tiny_sizes() if args.tiny else paper_sizes(), device)
    atomic_write_json(args.out_dir / "gpu_report.json", report)
    atomic_write_text(args.out_dir / "gpu_report.md", report_markdown(report))
    print(f"wrote {args.out_dir / 'gpu_report.json'} and {args.out_dir / 'gpu_report.md'} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main()
