"""Number formats a run uses on a GPU, decided in one place and recorded with every run.

- bf16 only where the GPU computes it natively (compute capability 8.0 and newer: A100, H100, RTX 30xx
  on); elsewhere `auto` means fp32, and fp16 is used only when a config asks for it by name.
- TF32 for the fp32 matrix products and convolutions (validation sampling, scoring, the probe: the
  work not under autocast): 10 mantissa bits in the products' inputs, fp32 accumulation. `tf32=false`
  in a stage's config keeps full fp32; `numerics_record` writes the setting into the run's records.
"""

from __future__ import annotations

from typing import Any

import torch

from dreamdiffusion.core.errors import ConfigError

# Stage 3's `precision` values and the dtype each stands for; `auto` is resolved by `generation_dtype`.
GENERATION_DTYPES = {"fp32": torch.float32, "32": torch.float32, "bf16": torch.bfloat16,
                     "fp16": torch.float16, "16": torch.float16}
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 tensor cores


def bf16_supported(device: torch.device | str) -> bool:
    """True where bf16 is native: a CUDA GPU of compute capability >= 8.0, or the CPU (slow but exact
    bf16 arithmetic). `torch.cuda.is_bf16_supported()` also says True where bf16 is only emulated."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def generation_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Stage 3's weights and activations dtype: `auto` = bf16 on a GPU with native bf16, else fp32;
    fp16 only when asked for. A ConfigError for bf16 on a GPU without it, or an unknown value."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else torch.float32
    if precision not in GENERATION_DTYPES:
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    dtype = GENERATION_DTYPES[precision]
    if dtype == torch.bfloat16 and not bf16_supported(device):
        raise ConfigError(f"precision={precision} but {device_name(device)} has no native bf16 "
                          "(compute capability < 8.0): use precision=fp32, or fp16 (range up to 65504 only)")
    return dtype


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for fp32 matrix products (cuBLAS) and convolutions (cuDNN); a no-op on the CPU."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type.upper() if device.type == "cpu" else str(device)


def numerics_record(device: torch.device | str) -> dict[str, Any]:
    """What a run's records say about its number formats: TF32 switches, native bf16, the device."""
    device = torch.device(device)
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    return {
        "device_name": device_name(device),
        "tf32_matmul": torch.get_float32_matmul_precision() != "highest" if on_gpu else False,
        "tf32_conv": bool(torch.backends.cudnn.allow_tf32) if on_gpu else False,
        "native_bf16": bf16_supported(device),
        "torch": torch.__version__,
    }
