"""How much memory a training step needs, computed from measurements.

peak ~ weights + gradients + AdamW states + activations, where
  - weights: every parameter and buffer, at its storage dtype (mixed precision keeps fp32 weights);
  - gradients: the trainable parameters, fp32; AdamW states: two fp32 tensors per trainable parameter;
  - activations: the bytes autograd actually saves for backward during a real forward pass
    (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters excluded:
    they are the weights), measured at batch 1 and 2: a per-sample part that grows with the batch and
    a fixed part that does not (under autocast, the half-precision copies of the weights).
It is a computation, not a measured peak: allocator caching, temporary buffers inside kernels and,
with gradient checkpointing, the recomputed activations of the block being back-propagated are not
in it. On a GPU, `torch.cuda.max_memory_allocated` measures the real peak to compare with.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dreamdiffusion.core.errors import ConfigError

GIB = 2**30
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, per trainable parameter
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class MemoryEstimate:
    """Bytes of one training step's state and activations; `peak(batch)` adds them up."""

    weights: int
    gradients: int
    optimizer: int
    activations_per_sample: int
    activations_fixed: int
    precision: str
    gradient_checkpointing: bool

    def activations(self, batch: int) -> int:
        return self.activations_fixed + self.activations_per_sample * batch

    def peak(self, batch: int) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations(batch)

    def fitting_batch(self, device_bytes: int) -> int:
        """The largest batch whose computed peak fits `device_bytes` (0: not even one sample)."""
        free = device_bytes - (self.weights + self.gradients + self.optimizer + self.activations_fixed)
        return max(0, free // max(1, self.activations_per_sample))

    def describe(self, batch: int) -> str:
        return (f"{self.peak(batch) / GIB:.1f} GiB (weights {self.weights / GIB:.2f}, gradients "
                f"{self.gradients / GIB:.2f}, AdamW {self.optimizer / GIB:.2f}, activations "
                f"{self.activations(batch) / GIB:.2f} at batch {batch}; {self.precision}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'})")

    def record(self, batches: tuple[int, ...] = (1, 4, 25)) -> dict[str, Any]:
        return {**asdict(self), "peak_gib": {str(b): round(self.peak(b) / GIB, 2) for b in batches}}


def state_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(weights, gradients, AdamW states) in bytes: weights at their dtype, the rest fp32 per trainable value."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights, trainable * 4, trainable * 4 * ADAM_STATES


def saved_activation_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor], precision: str = "32-true") -> int:
    """Bytes of the tensors autograd saves while `loss_fn()` runs (one forward), each storage once and
    the model's parameters excluded; the backward then runs so that the measurement is a real step.
    Gradients are cleared again and the random streams left as they were."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = next(model.parameters()).device
    autocast = (torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
                if precision in AUTOCAST_DTYPES else contextlib.nullcontext())
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = loss_fn()
        loss.backward()
    for p in model.parameters():
        p.grad = None
    return sum(seen.values())


def estimate(model: nn.Module, loss_fn: Callable[[int], torch.Tensor], precision: str,
             gradient_checkpointing: bool) -> MemoryEstimate:
    """A MemoryEstimate from the model's parameters and two real steps: `loss_fn(1)` and `loss_fn(2)`,
    the loss of a batch of 1 and of 2 samples."""
    weights, gradients, optimizer = state_bytes(model)
    one, two = (saved_activation_bytes(model, lambda n=n: loss_fn(n), precision) for n in (1, 2))
    per_sample = max(two - one, 0)
    return MemoryEstimate(weights, gradients, optimizer, per_sample, max(one - per_sample, 0), precision,
                          gradient_checkpointing)


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the device: a GPU's total memory, or the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "CPU RAM"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def advice(estimate: MemoryEstimate, batch: int, device_bytes: int) -> str | None:
    """None when the computed peak fits; else the settings to change, in the order that keeps the method."""
    if estimate.peak(batch) <= device_bytes:
        return None
    fits = estimate.fitting_batch(device_bytes)
    steps = []
    if not estimate.gradient_checkpointing:
        steps.append("gradient_checkpointing=true (recomputes the UNet's activations in the backward pass)")
    if estimate.precision == "32-true":
        steps.append("trainer.precision=bf16-mixed (half the activation memory)")
    steps.append(f"batch_size={fits} with trainer.accumulate_grad_batches={-(-batch // max(fits, 1))}"
                 if fits >= 1 else "a device with more memory: not even one sample fits")
    return "it will not fit; change " + ", or ".join(steps)


def resolve_device(name: str, what: str = "device") -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda`, `cuda:N`; a ConfigError naming `what` otherwise,
    or when a GPU is asked for and torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N, got '{name}'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={name} but no CUDA GPU is available (use auto or cpu)")
    return device
