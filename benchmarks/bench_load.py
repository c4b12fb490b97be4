"""diffusers' loading of an SD1.5-sized UNet with and without `accelerate`: JSON with load seconds and
peak RSS per run.

    python benchmarks/bench_load.py --folder /tmp/sd15-unet --repeats 3
    # accelerate need not be in the environment: --accelerate-path adds a folder that holds it
    pip install --no-deps --target /tmp/accelerate-pkg accelerate
    python benchmarks/bench_load.py --folder /tmp/sd15-unet --accelerate-path /tmp/accelerate-pkg

The UNet is built once from SD1.5's config (random weights: loading does not depend on them) and saved
as a diffusers folder (`diffusion_pytorch_model.safetensors`, fp32, 3.4 GB). Each measurement is a fresh
process (so its peak RSS is its own) that times `UNet2DConditionModel.from_pretrained(folder)`, then
reads every weight once (the file is memory-mapped, so only that makes all of it resident): with
accelerate importable diffusers builds the model on the meta device and fills it from the file
(`low_cpu_mem_usage`); without it, the model is first initialised at random, then overwritten.
The two settings alternate, `--repeats` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CODE = Path(__file__).resolve().parents[1] / "code"


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec, so a child does not
    inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 2**30, 3)
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(folder: Path, accelerate: bool, dtype: str, low_cpu_mem_usage: str) -> dict:
    """One load in this process; `accelerate=False` hides the package from diffusers."""
    if not accelerate:
        sys.modules["accelerate"] = None  # what Python treats as "not installed"
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import is_accelerate_available

    if accelerate and not is_accelerate_available():
        raise SystemExit("accelerate is not importable here: pip install accelerate, or pass --accelerate-path")
    before = peak_rss_gib()
    start = time.perf_counter()
    kwargs = {} if low_cpu_mem_usage == "default" else {"low_cpu_mem_usage": low_cpu_mem_usage == "true"}
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype), **kwargs)
    seconds = time.perf_counter() - start
    after_load = peak_rss_gib()
    # safetensors maps the file: weights not yet read are not resident. Reading every weight once
    # (what the first forward pass does) gives the memory of the loaded model.
    with torch.no_grad():
        for p in unet.parameters():
            p.sum()
    return {"accelerate": is_accelerate_available(), "seconds": round(seconds, 3),
            "seconds_with_every_weight_read": round(time.perf_counter() - start, 3),
            "peak_rss_gib": peak_rss_gib(), "peak_rss_after_load_gib": after_load,
            "peak_rss_before_load_gib": before,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "dtype": str(next(unet.parameters()).dtype)}


def write_folder(folder: Path) -> None:
    """Run in its own process, so the measuring processes start small."""
    sys.path.insert(0, str(CODE))
    from dreamdiffusion.models.sd15 import build_sd15, read_sd15_configs

    unet = build_sd15(*read_sd15_configs()).unet
    unet.save_pretrained(folder, safe_serialization=True)


def run(args: argparse.Namespace, accelerate: bool) -> dict:
    env = dict(os.environ)
    if accelerate and args.accelerate_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.accelerate_path, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--child", "--folder", str(args.folder), "--dtype", args.dtype,
           "--low-cpu-mem-usage", args.low_cpu_mem_usage]
    out = subprocess.run(cmd + (["--with-accelerate"] if accelerate else []), env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="where the random SD1.5 UNet is (or is written)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--low-cpu-mem-usage", default="default", choices=["default", "true", "false"],
                        help="diffusers' low_cpu_mem_usage argument (default: not passed, diffusers decides)")
    parser.add_argument("--accelerate-path", default=None, help="a folder holding accelerate (added to PYTHONPATH)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-accelerate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-folder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_folder:
        write_folder(args.folder)
        return
    if args.child:
        print(json.dumps(child(args.folder, args.with_accelerate, args.dtype, args.low_cpu_mem_usage)))
        return
    if not (args.folder / "diffusion_pytorch_model.safetensors").is_file():
        subprocess.run([sys.executable, __file__, "--write-folder", "--folder", str(args.folder)], check=True)
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run(args, accelerate=mode == "with"))
    summary = {mode: {key: statistics.median(r[key] for r in rs)
                      for key in ("seconds", "seconds_with_every_weight_read", "peak_rss_after_load_gib", "peak_rss_gib")}
               for mode, rs in runs.items()}
    import diffusers
    import torch

    print(json.dumps({"benchmark": "diffusers UNet2DConditionModel.from_pretrained, SD1.5 config, safetensors",
                      "dtype": args.dtype, "low_cpu_mem_usage": args.low_cpu_mem_usage, "file_gib": round((args.folder / "diffusion_pytorch_model.safetensors")
                                                             .stat().st_size / 2**30, 3),
                      "diffusers": diffusers.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                      "machine": platform.machine(), "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
