"""How much memory a training step needs, computed from measurements, and what the device has free.

peak ~ (weights + AdamW states + DDP buckets + activations and gradients at the step's worst moment)
       x (1 + ALLOCATOR_MARGIN) + the CUDA context (on a GPU), where
  - weights: every parameter and buffer, at its storage dtype (mixed precision keeps fp32 weights;
    `store_frozen_at` stores frozen matrix layers at the autocast dtype);
  - AdamW states: two fp32 tensors per trainable parameter (gradients: one, fp32);
  - DDP buckets (several processes): DDP reduces gradients through buckets of their own, one more fp32
    copy of the trainable gradients (Lightning's DDP keeps `gradient_as_bucket_view=False`);
  - activations, measured on one real step at batch 1 and at batch 2 (a per-sample part that grows
    with the batch and a fixed part that does not - under autocast, the half-precision copies of the
    weights), parameters excluded, each storage counted once:
      kept: what the forward leaves alive for the backward - the tensors autograd saves
        (`torch.autograd.graph.saved_tensors_hooks`; with gradient checkpointing these include each
        checkpointed block's inputs, which torch saves through the same hooks) and any other result
        of the forward still alive at its end (a dispatch mode holding weak references to the storage
        of every operation's result);
      step peak: the most bytes of results alive at once through the forward and the backward (with
        gradient checkpointing: the kept inputs, plus the recomputed activations of the block being
        back-propagated and their gradients), parameters' gradients apart;
    the estimate takes the larger of the step peak and kept, plus every parameter's gradient;
  - ALLOCATOR_MARGIN: the caching allocator's rounding and fragmentation, temporaries inside kernels and
    the optimiser's, and what a poll every few operations misses;
  - CUDA_CONTEXT_BYTES: the CUDA context with cuBLAS / cuDNN loaded and their workspaces.
The verdict compares it with the memory the run can still get on ITS device: `torch.cuda.mem_get_info`'s
free bytes plus what this process's allocator already holds (`device_memory`). It is a computation,
not a measured peak: `benchmarks/gpu_report.py` puts it beside `torch.cuda.max_memory_allocated`.
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
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, per trainable parameter
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# The allocator's rounding/fragmentation and the transient buffers the count leaves out, as a share of
# the counted bytes (a rule of thumb; gpu_report.py measures the ratio on a real GPU).
ALLOCATOR_MARGIN = 0.10
# The CUDA context, cuBLAS/cuDNN handles, lazily loaded kernels and workspaces: about 0.5-1 GiB with
# torch 2.x on a recent GPU. Part of it exists when the check runs, so the verdict errs by that part
# on the safe side.
CUDA_CONTEXT_BYTES = GIB
MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class MemoryEstimate:
    """Bytes of one training step's state and kept activations; `peak(batch)` adds them up."""

    weights: int
    gradients: int
    optimizer: int
    activations_per_sample: int  # everything kept for the backward, the checkpointed inputs included
    activations_fixed: int
    precision: str
    gradient_checkpointing: bool
    checkpointed_inputs_per_sample: int = 0  # the part of activations_per_sample kept outside autograd
    # The most bytes of results alive at once in the step (forward and backward; parameters' gradients
    # apart): with gradient checkpointing, the kept inputs plus a block's recomputed activations.
    step_peak_per_sample: int = 0
    step_peak_fixed: int = 0
    ddp_buckets: int = 0
    cuda_context: int = 0

    def activations(self, batch: int) -> int:
        return self.activations_fixed + self.activations_per_sample * batch

    def step_activations(self, batch: int) -> int:
        """Activations and gradients at the step's worst moment: the measured peak of live results (at
        least the kept activations) with every parameter's gradient."""
        measured = self.step_peak_fixed + self.step_peak_per_sample * batch
        return max(measured, self.activations(batch)) + self.gradients

    def counted(self, batch: int) -> int:
        """The tensors' bytes: weights, AdamW, DDP buckets, and activations with gradients at the peak."""
        return self.weights + self.optimizer + self.ddp_buckets + self.step_activations(batch)

    def peak(self, batch: int) -> int:
        return int(self.counted(batch) * (1 + ALLOCATOR_MARGIN)) + self.cuda_context

    def fitting_batch(self, device_bytes: int) -> int:
        """The largest batch whose computed peak fits `device_bytes` (0: not even one sample)."""
        room = (device_bytes - self.cuda_context) / (1 + ALLOCATOR_MARGIN) - self.counted(0)
        return max(0, int(room // max(1, self.step_peak_per_sample, self.activations_per_sample)))

    def describe(self, batch: int) -> str:
        ddp = f", DDP buckets {self.ddp_buckets / GIB:.2f}" if self.ddp_buckets else ""
        context = f" + CUDA context {self.cuda_context / GIB:.2f}" if self.cuda_context else ""
        kept = (f" ({self.checkpointed_inputs_per_sample * batch / GIB:.2f} of them checkpointed-block inputs)"
                if self.checkpointed_inputs_per_sample else "")
        return (f"{self.peak(batch) / GIB:.1f} GiB (weights {self.weights / GIB:.2f}, AdamW "
                f"{self.optimizer / GIB:.2f}{ddp}, activations kept for the backward {self.activations(batch) / GIB:.2f}"
                f"{kept}, with gradients and recomputation at the step's peak {self.step_activations(batch) / GIB:.2f} "
                f"at batch {batch}; +{ALLOCATOR_MARGIN:.0%} allocator margin{context}; {self.precision}, gradient "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'})")

    def record(self, batches: tuple[int, ...] = (1, 4, 25)) -> dict[str, Any]:
        return {**asdict(self), "allocator_margin": ALLOCATOR_MARGIN,
                "peak_gib": {str(b): round(self.peak(b) / GIB, 2) for b in batches}}


def state_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(weights, gradients, AdamW states) in bytes: weights at their dtype, the rest fp32 per trainable value."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights, trainable * 4, trainable * 4 * ADAM_STATES


class _OperationResults(TorchDispatchMode):
    """Weak references to the storage of every operation's result, by address (a later result at the
    address of a freed one replaces it), and the largest total of those alive, read every
    `poll_every` operations (parameters, and gradients once they are a parameter's `.grad`, excluded)."""

    poll_every = 8

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self._calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self.excluded:
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self._calls += 1
        if self._calls % self.poll_every == 0:
            self.peak = max(self.peak, sum(self.alive().values()))
        return out

    def alive(self) -> dict[int, int]:
        self.storages = {ptr: (ref, n) for ptr, (ref, n) in self.storages.items() if not ref.expired()}
        return {ptr: n for ptr, (_, n) in self.storages.items() if ptr not in self.excluded}


@dataclass
class KeptBytes:
    """What one training step's forward leaves for its backward, and its largest moment."""

    saved: int  # tensors autograd saved for the backward
    other: int  # other results of the forward alive at its end (e.g. inputs a checkpointed block keeps itself)
    step_peak: int  # the most bytes of operation results alive at once in the forward and backward (not the .grads)

    @property
    def total(self) -> int:
        return self.saved + self.other


def kept_activation_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor], precision: str = "32-true") -> KeptBytes:
    """One real step's activations: what the forward (`loss_fn()`) leaves alive for its backward, each
    storage once, the model's parameters and the returned loss excluded; and the peak of results alive
    at once through the forward and the backward, parameters' gradients excluded (they are counted
    apart; activation gradients and, with gradient checkpointing, the recomputed block's activations
    show there). Gradients are cleared again and the random streams left as they were."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = next(model.parameters()).device
    autocast = (torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
                if precision in AUTOCAST_DTYPES else contextlib.nullcontext())
    devices = [device] if device.type == "cuda" else []
    results = _OperationResults(set(params))
    hooks = [p.register_post_accumulate_grad_hook(lambda p: results.excluded.add(p.grad.untyped_storage().data_ptr()))
             for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=devices), results:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = loss_fn()
        alive = results.alive()
        loss.backward()
        results.peak = max(results.peak, sum(results.alive().values()))
    for hook in hooks:
        hook.remove()
    for p in model.parameters():
        p.grad = None
    excluded = params | {loss.untyped_storage().data_ptr()}
    saved = {ptr: n for ptr, n in saved.items() if ptr not in excluded}
    other = {ptr: n for ptr, n in alive.items() if ptr not in excluded and ptr not in saved}
    return KeptBytes(sum(saved.values()), sum(other.values()), results.peak)


def estimate(model: nn.Module, loss_fn: Callable[[int], torch.Tensor], precision: str,
             gradient_checkpointing: bool, world_size: int = 1) -> MemoryEstimate:
    """A MemoryEstimate from the model's parameters and two real steps: `loss_fn(1)` and `loss_fn(2)`,
    the loss of a batch of 1 and of 2 samples. `world_size` > 1 adds DDP's gradient buckets; a model
    on a GPU adds the CUDA context."""
    weights, gradients, optimizer = state_bytes(model)
    one, two = (kept_activation_bytes(model, lambda n=n: loss_fn(n), precision) for n in (1, 2))
    per_sample = max(two.total - one.total, 0)
    peak_per_sample = max(two.step_peak - one.step_peak, 0)
    on_gpu = next(model.parameters()).device.type == "cuda"
    return MemoryEstimate(weights, gradients, optimizer, per_sample, max(one.total - per_sample, 0), precision,
                          gradient_checkpointing, checkpointed_inputs_per_sample=max(two.other - one.other, 0),
                          step_peak_per_sample=peak_per_sample,
                          step_peak_fixed=max(one.step_peak - peak_per_sample, 0),
                          ddp_buckets=gradients if world_size > 1 else 0,
                          cuda_context=CUDA_CONTEXT_BYTES if on_gpu else 0)


@dataclass
class DeviceMemory:
    """What a run can still get on its device, and the rest of the device."""

    usable: int  # a GPU: free now + what this process's allocator holds; the CPU: available RAM
    total: int
    what: str

    def describe(self) -> str:
        held = self.total - self.usable
        return (f"{self.what} has {self.total / GIB:.1f} GiB, {self.usable / GIB:.1f} GiB of it free for this run "
                f"({held / GIB:.1f} GiB held by the CUDA context and other processes)" if held > 0 else
                f"{self.what} has {self.total / GIB:.1f} GiB")


def device_memory(device: torch.device) -> DeviceMemory:
    """The memory of the device a run uses: on a GPU `torch.cuda.mem_get_info` (free and total) plus
    the bytes this process's caching allocator already holds (its weights are in the estimate); on
    the CPU the available RAM (/proc/meminfo's MemAvailable, else all of it) plus this process's."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)
        return DeviceMemory(usable, total, f"{torch.cuda.get_device_name(device)} ({device})")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceMemory(min(total, _available_ram() + current_rss_bytes()), total, "CPU RAM")


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


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


def store_frozen_at(module: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen matrix layers (Linear, Conv) of `module` at `dtype`, the autocast dtype of
    the run; returns the bytes saved.

    Under autocast these layers run at `dtype` anyway: autocast casts an fp32 weight to `dtype` at
    every call (a frozen weight's cast is not cached), rounding it exactly as `.to(dtype)` does, so
    the results are unchanged and the per-call casts and the fp32 copies go. Norms, embeddings and
    anything trainable keep their dtype (autocast runs norms in fp32). Only for modules that never run
    outside autocast and are never saved (stage 2's CLIP image encoder)."""
    saved = 0
    for layer in module.modules():
        params = list(layer.parameters(recurse=False))
        if isinstance(layer, MATRIX_LAYERS) and params and not any(p.requires_grad for p in params):
            before = sum(p.numel() * p.element_size() for p in params)
            layer.to(dtype)
            saved += before - sum(p.numel() * p.element_size() for p in params)
    return saved
