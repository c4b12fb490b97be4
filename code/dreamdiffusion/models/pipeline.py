"""`DreamDiffusionPipeline`: images from EEG with a fine-tuned DreamDiffusion model (diffusers-style).

    pipe = DreamDiffusionPipeline(model)          # a DreamDiffusion (model.py)
    out = pipe(eeg, num_images_per_eeg=5, sampler="plms", generator=torch.Generator().manual_seed(0))
    out.images                                    # [n_trials, 5, 3, H, W] in [-1, 1]

Samplers, all built from the model's own noise-scheduler config (SD1.5: scaled-linear betas,
1000 steps, epsilon prediction, "leading" spacing with steps_offset 1, alpha_prev at the last step =
alphas_cumprod[0] rather than 1):
  - "plms" (default, 250 steps as the authors): diffusers' `PNDMScheduler` with `skip_prk_steps=True`.
    This is LDM's `PLMSSampler` (Liu et al.'s linear multi-step method): S + 1 UNet calls for S
    steps in both - diffusers' repeated second timestep is LDM's pseudo improved-Euler first step
    (two calls, averaged), followed by the same 2-, 3- and 4-step Adams-Bashforth combinations of
    the eps history. The timesteps (997, 993, ..., 1) match, and an independent implementation of
    LDM's update equations gives the same latents to float precision (tests/test_pipeline.py).
  - "ddim" (`DDIMScheduler`, `eta` as given; eta=0 is deterministic), 250 steps by default;
  - "dpm++" (`DPMSolverMultistepScheduler`, 2nd order, 25 steps by default).

Classifier-free guidance is off by default (guidance_scale=1, as in the paper). With a scale s != 1,
eps = eps(null) + s * (eps(eeg) - eps(null)); the null condition is "zero" (a zero context and zero
time embedding) or "learned" (`model.null_condition(n)` if the model defines one, else the model's
own encoding of an all-zero EEG).

Determinism: every (trial, slot) image has its own CPU generator, seeded from the caller's
generator(s); the initial latent noise and any sampler noise (DDIM with eta > 0) come from it, so an
image depends only on its seed - not on the batch size or on which trials share a batch. Pass one
generator per trial (a list) to make an image depend only on its trial's generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.utils import BaseOutput
from PIL import Image

from dreamdiffusion.core.errors import ConfigError

SAMPLERS = ("plms", "ddim", "dpm++")
DEFAULT_STEPS = {"plms": 250, "ddim": 250, "dpm++": 25}
NULL_CONDITIONS = ("zero", "learned")
OUTPUT_TYPES = ("pt", "np", "pil", "latent")
# 2**63 - 1: the largest seed a torch.Generator accepts
_MAX_SEED = 2**63 - 1


@dataclass
class DreamDiffusionPipelineOutput(BaseOutput):
    """images: "pt" float [n_trials, n_images_per_eeg, 3, H, W] in [-1, 1]; "np" uint8
    [n_trials, n_images_per_eeg, H, W, 3]; "pil" a list (per trial) of lists of PIL images;
    "latent" the final latents [n_trials, n_images_per_eeg, C, h, w] (scaled, not decoded)."""

    images: Any


def make_scheduler(noise_scheduler_config: dict, sampler: str):
    """A sampling scheduler of kind `sampler` from the model's training noise-scheduler config."""
    config = dict(noise_scheduler_config)
    if sampler == "plms":
        return PNDMScheduler.from_config(config, skip_prk_steps=True)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ConfigError(f"unknown sampler '{sampler}'; expected one of {', '.join(SAMPLERS)}")


def _condition_fields(condition: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(condition):
        return {f.name: getattr(condition, f.name) for f in dataclasses.fields(condition)}
    if hasattr(condition, "_asdict"):
        return condition._asdict()
    raise TypeError(f"a condition must be a dataclass or a NamedTuple, got {type(condition).__name__}")


def _map_condition(condition: Any, fn) -> Any:
    """Apply `fn` to every tensor field of an EEGCondition (None fields stay None)."""
    fields = {k: (fn(v) if torch.is_tensor(v) else v) for k, v in _condition_fields(condition).items()}
    return type(condition)(**fields)


def _cat_conditions(first: Any, second: Any) -> Any:
    a, b = _condition_fields(first), _condition_fields(second)
    fields = {k: (torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else a[k]) for k in a}
    return type(first)(**fields)


def _batch_size(condition: Any) -> int:
    return int(_condition_fields(condition)["context"].shape[0])


class DreamDiffusionPipeline(DiffusionPipeline):
    """Generation from EEG with a `DreamDiffusion` model (or any object with its sampling API:
    `encode_eeg`, `denoise`, `decode_latents`, `noise_scheduler`, `latent_channels`, `latent_size`,
    `vae_scale_factor`, `dtype`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.register_modules(model=model)

    # -- arguments ------------------------------------------------------------------------------

    def check_inputs(self, eeg, condition, num_images_per_eeg, num_inference_steps, sampler, eta,
                     guidance_scale, null_condition, generator, output_type, latents=None) -> None:
        if (eeg is None) == (condition is None):
            raise ConfigError("give either `eeg` (a [n_trials, n_channels, n_times] tensor) or a "
                              "precomputed `condition`, not both or neither")
        if eeg is not None and (not torch.is_tensor(eeg) or eeg.ndim != 3):
            shape = tuple(eeg.shape) if torch.is_tensor(eeg) else type(eeg).__name__
            raise ConfigError(f"eeg must be a [n_trials, n_channels, n_times] tensor, got {shape}")
        if eeg is not None and len(eeg) == 0:
            raise ConfigError("eeg holds no trials")
        if not isinstance(num_images_per_eeg, int) or num_images_per_eeg < 1:
            raise ConfigError(f"num_images_per_eeg must be a positive integer, got {num_images_per_eeg!r}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{sampler}'; expected one of {', '.join(SAMPLERS)}")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int)
                                                or not 1 <= num_inference_steps <= 1000):
            raise ConfigError(f"num_inference_steps must be an integer in [1, 1000], got {num_inference_steps!r}")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"eta must lie in [0, 1], got {eta}")
        if eta != 0.0 and sampler != "ddim":
            raise ConfigError(f"eta only applies to the ddim sampler, got eta={eta} with '{sampler}'")
        if guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")
        if null_condition not in NULL_CONDITIONS:
            raise ConfigError(f"null_condition must be one of {NULL_CONDITIONS}, got '{null_condition}'")
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {OUTPUT_TYPES}, got '{output_type}'")
        n_trials = len(eeg) if eeg is not None else _batch_size(condition)
        if isinstance(generator, list) and len(generator) != n_trials:
            raise ConfigError(f"a list of generators needs one per trial ({n_trials}), got {len(generator)}")
        if latents is not None:
            model = self.model
            shape = (n_trials * num_images_per_eeg, model.latent_channels, model.latent_size, model.latent_size)
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ConfigError(f"latents must be a tensor of shape {shape} (trial-major: n_trials x "
                                  f"num_images_per_eeg, channels, size, size), got {got}")

    # -- steps ----------------------------------------------------------------------------------

    def _null_condition(self, condition: Any, n: int, kind: str) -> Any:
        model = self.model
        if kind == "learned":
            if hasattr(model, "null_condition"):
                return model.null_condition(n)
            eeg_shape = (n, model.conditioner.encoder.config["n_channels"], model.conditioner.encoder.config["n_times"])
            return model.encode_eeg(torch.zeros(eeg_shape, device=model.device, dtype=model.dtype))
        return _map_condition(condition, torch.zeros_like)

    @staticmethod
    def _image_generators(generator, n_trials: int, num_images_per_eeg: int) -> list[torch.Generator]:
        """One CPU generator per (trial, slot), trial-major, seeded from the caller's generator(s)."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, _MAX_SEED, (1,)).item()))
        per_trial = generator if isinstance(generator, list) else [
            torch.Generator().manual_seed(int(s)) for s in torch.randint(0, _MAX_SEED, (n_trials,), generator=generator)
        ]
        seeds = [torch.randint(0, _MAX_SEED, (num_images_per_eeg,), generator=g) for g in per_trial]
        return [torch.Generator().manual_seed(int(s)) for trial in seeds for s in trial]

    def _initial_latents(self, generators: list[torch.Generator], scheduler) -> torch.Tensor:
        model = self.model
        size = model.latent_size
        shape = (model.latent_channels, size, size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # drawn on the CPU
        return (noise * scheduler.init_noise_sigma).to(model.device, model.dtype)

    @staticmethod
    def _to_output(images: torch.Tensor, n_trials: int, output_type: str):
        if output_type == "latent":
            return images.reshape(n_trials, -1, *images.shape[1:])
        images = images.float().clamp(-1, 1).cpu()
        images = images.reshape(n_trials, -1, *images.shape[1:])  # [n_trials, n_images_per_eeg, 3, H, W]
        if output_type == "pt":
            return images
        arrays = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        if output_type == "np":
            return arrays
        return [[Image.fromarray(np.ascontiguousarray(a)) for a in trial] for trial in arrays]

    @torch.no_grad()
    def __call__(
        self,
        eeg: torch.Tensor | None = None,
        num_images_per_eeg: int = 5,
        num_inference_steps: int | None = None,
        sampler: str = "plms",
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        null_condition: str = "zero",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        condition: Any = None,
        latents: torch.Tensor | None = None,
        decode_batch_size: int = 8,
        return_dict: bool = True,
    ):
        """Generate `num_images_per_eeg` images per EEG trial.

        eeg: [n_trials, n_channels, n_times] (or `condition`: a precomputed EEGCondition-like object
        whose `context` is [n_trials, 77, D], e.g. the class-name oracle's text states).
        num_inference_steps: None = the sampler's default (plms/ddim 250, dpm++ 25).
        generator: one torch.Generator, or one per trial (see the module docstring).
        latents: the initial noise [n_trials * num_images_per_eeg, C, h, w] (trial-major), as in
        diffusers' pipelines; by default drawn from the generators.
        output_type: "pt", "np", "pil", or "latent" (skip the VAE decoder).
        Returns `DreamDiffusionPipelineOutput(images)` (or a 1-tuple with return_dict=False).
        """
        self.check_inputs(eeg, condition, num_images_per_eeg, num_inference_steps, sampler, eta,
                          guidance_scale, null_condition, generator, output_type, latents)
        model = self.model
        steps = num_inference_steps or DEFAULT_STEPS[sampler]
        do_guidance = guidance_scale != 1.0

        # 1. EEG -> condition (context [n, 77, D], optional time embedding), repeated per slot
        if condition is None:
            condition = model.encode_eeg(eeg.to(model.device, model.dtype))
        n_trials = _batch_size(condition)
        condition = _map_condition(condition, lambda t: t.repeat_interleave(num_images_per_eeg, dim=0))
        n_images = n_trials * num_images_per_eeg
        # 2. classifier-free guidance: the null condition first, then the EEG one
        if do_guidance:
            condition = _cat_conditions(self._null_condition(condition, n_images, null_condition), condition)
        # 3. sampler and timesteps from the model's noise-scheduler config
        scheduler = make_scheduler(model.noise_scheduler.config, sampler)
        scheduler.set_timesteps(steps, device=model.device)
        # 4. initial noise: given, or drawn from one CPU generator per (trial, slot)
        generators = self._image_generators(generator, n_trials, num_images_per_eeg)
        if latents is None:
            latents = self._initial_latents(generators, scheduler)
        else:
            latents = (latents * scheduler.init_noise_sigma).to(model.device, model.dtype)
        step_kwargs = {"generator": generators, "eta": eta} if sampler == "ddim" else {}
        # 5. the denoising loop
        for t in self.progress_bar(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]).to(model.device)
            eps = model.denoise(model_input, timesteps, condition)
            if do_guidance:
                eps_null, eps_eeg = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_eeg - eps_null)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        # 6. decode the latents in chunks to bound memory
        if output_type == "latent":
            images = latents
        else:
            images = torch.cat([model.decode_latents(latents[i : i + decode_batch_size])
                                for i in range(0, n_images, decode_batch_size)])
        images = self._to_output(images, n_trials, output_type)
        return DreamDiffusionPipelineOutput(images=images) if return_dict else (images,)
