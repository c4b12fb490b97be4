"""`DreamDiffusionPipeline`: images from EEG with a fine-tuned DreamDiffusion model (a diffusers pipeline).

    pipe = DreamDiffusionPipeline.from_pretrained("outputs/stage2/model", torch_dtype=torch.float16).to("cuda")
    out = pipe(eeg, num_images_per_eeg=5, height=512, width=512, generator=torch.Generator().manual_seed(0))
    out.images                                    # [n_trials, 5, 3, 512, 512] in [-1, 1]

Its components, as in model_index.json: `conditioner` (our `EEGConditioner`, a diffusers
`ModelMixin` from `dreamdiffusion.models.dreamdiffusion`, so that package must be importable where
the folder is loaded), `unet`, `vae` and `scheduler` (the training noise schedule). A training-side
`DreamDiffusion` becomes a pipeline with `DreamDiffusionPipeline.from_model(model)` (shared modules),
the authors' `checkpoint.pth` with `from_original_checkpoint`. `callback_on_step_end` (diffusers'
signature: (pipe, step, timestep, callback_kwargs) -> dict, may replace "latents") and
`set_progress_bar_config` work as in diffusers' pipelines.

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
time embedding) or "learned" (`negative_condition` if given - the class-name oracle's empty prompt -
else the conditioner's encoding of an all-zero EEG).

Determinism: every (trial, slot) image has its own CPU generator, seeded from the caller's
generator(s); the initial latent noise and any sampler noise (DDIM with eta > 0) come from it, so an
image depends only on its seed - not on the batch size or on which trials share a batch. Pass one
generator per trial (a list) to make an image depend only on its trial's generator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from PIL import Image

from dreamdiffusion.core.errors import CheckpointError, ConfigError, NonFiniteError
from dreamdiffusion.core.images import to_uint8
from dreamdiffusion.models.dreamdiffusion import (
    DreamDiffusion,
    EEGCondition,
    EEGConditioner,
    decode_latents,
    denoise,
    load_conditioner,
)
from dreamdiffusion.models.sampling import DEFAULT_STEPS, NULL_CONDITIONS, SAMPLERS
from dreamdiffusion.models.sd15 import load_diffusers_folder

OUTPUT_TYPES = ("pt", "np", "pil", "latent")
# 2**63 - 1: the largest seed a torch.Generator accepts
_MAX_SEED = 2**63 - 1
# "owner/name" that is not a local folder: a Hugging Face hub repository, left to diffusers
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


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


class NonFiniteLatentsError(NonFiniteError):
    """Final latents with NaN or Inf; `images` lists (trial, slot) of each, counted within the call."""

    def __init__(self, message: str, images: list[tuple[int, int]]):
        super().__init__(message)
        self.images = images


def check_finite_latents(latents: torch.Tensor, num_images_per_eeg: int, dtype: torch.dtype) -> None:
    """A NonFiniteLatentsError when any image's final latents [n_images, C, h, w] (trial-major) hold NaN
    or Inf: decoded, they would become black images that are then scored. One sync per call."""
    bad = (~torch.isfinite(latents.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
    if not bad:
        return
    images = [(i // num_images_per_eeg, i % num_images_per_eeg) for i in bad]
    hint = ("fp16's range ends at 65504: generate in bf16 or fp32" if dtype == torch.float16
            else "an activation overflowed, or the weights or the EEG hold NaN/Inf")
    raise NonFiniteLatentsError(
        f"the final latents of {len(images)} image(s) are not finite (NaN or Inf), the first: this call's trial "
        f"{images[0][0]}, image {images[0][1] + 1} (the UNet ran in {str(dtype).replace('torch.', '')}; {hint})", images)


class DreamDiffusionPipeline(DiffusionPipeline):
    """Generation from EEG: an `EEGConditioner` in the place of SD1.5's text encoder, beside its
    UNet, VAE and noise scheduler (the training schedule; each call builds its sampler from its
    config). `save_pretrained` writes diffusers' layout (model_index.json, conditioner/, unet/,
    vae/, scheduler/); `from_pretrained(folder, torch_dtype=...)` reads it back.

    conditioner may be None (base SD1.5, the class-name oracle): every call then passes `condition`.
    """

    model_cpu_offload_seq = "conditioner->unet->vae"
    _optional_components = ["conditioner"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, conditioner: EEGConditioner | None, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(conditioner=conditioner, unet=unet, vae=vae, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # where vae.config.scaling_factor came from (stage 3's protocol prints it)
        self.latent_scale_source = "the VAE config"

    # -- building and loading -------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: DreamDiffusion) -> DreamDiffusionPipeline:
        """A pipeline sharing a `DreamDiffusion`'s modules (no copy): conditioner, UNet, VAE, noise scheduler."""
        pipe = cls(conditioner=model.conditioner, unet=model.unet, vae=model.vae, scheduler=model.noise_scheduler)
        pipe.latent_scale_source = model.latent_scale_source
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DreamDiffusionPipeline:
        """diffusers' loading of a `save_pretrained` folder, with every model checked strictly against
        its weights (a mismatch is a CheckpointError) and cast to `torch_dtype` (or `dtype`). A folder
        of an earlier version (dreamdiffusion.json) loads too: `from_pretrained(old).save_pretrained(new)`
        converts it. A hub id ("owner/name") is left to diffusers."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            if _HUB_ID.fullmatch(str(pretrained_model_name_or_path)):
                return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            raise CheckpointError(f"model folder not found: {folder} (expected the output of save_pretrained, e.g. "
                                  "<stage-2 output_dir>/model; the authors' checkpoint.pth: from_original_checkpoint)")
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        if not (folder / "model_index.json").is_file():  # an earlier version's layout
            return cls.from_model(DreamDiffusion.from_pretrained(folder, torch_dtype=dtype))
        try:
            index = json.loads((folder / "model_index.json").read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{folder / 'model_index.json'} is not valid JSON: {err}") from err
        loaded = {}
        if (index.get("conditioner") or [None])[0] is not None and "conditioner" not in kwargs:
            loaded["conditioner"] = load_conditioner(folder, dtype)[0]
        if not {"unet", "vae"} & set(kwargs):
            sd = load_diffusers_folder(folder, torch_dtype=dtype)
            loaded.update(unet=sd.unet, vae=sd.vae)
            kwargs.setdefault("low_cpu_mem_usage", False)  # only the scheduler is left to read
        elif dtype is not None:
            kwargs["torch_dtype"] = dtype  # diffusers loads the one not passed
        return super().from_pretrained(folder, **loaded, **kwargs)

    @classmethod
    def from_original_checkpoint(cls, path: str | os.PathLike, sd_config: str | os.PathLike | None = None,
                                 torch_dtype: torch.dtype | None = None) -> DreamDiffusionPipeline:
        """The authors' released generation checkpoint (`checkpoint.pth`), read without running pickled
        code (`DreamDiffusion.from_original_checkpoint`); `save_pretrained` then writes it in our layout."""
        model = DreamDiffusion.from_original_checkpoint(path, sd_config=sd_config)
        return cls.from_model(model if torch_dtype is None else model.to(torch_dtype))

    @property
    def image_size(self) -> int:
        """The UNet's native resolution in pixels: the default height and width (512 for SD1.5)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def encode_eeg(self, eeg: torch.Tensor) -> EEGCondition:
        """eeg [B, n_channels, n_times] -> EEGCondition (context [B, 77, D], time and CLIP embeddings)."""
        if self.conditioner is None:
            raise ConfigError("this pipeline has no EEG conditioner (base SD1.5): pass a precomputed `condition`")
        return self.conditioner(eeg.to(self.conditioner.device, self.conditioner.dtype))

    # -- arguments ------------------------------------------------------------------------------

    def check_inputs(self, eeg, condition, num_images_per_eeg, num_inference_steps, sampler, eta,
                     guidance_scale, null_condition, generator, output_type, height, width, latents=None,
                     negative_condition=None, callback_on_step_end_tensor_inputs=("latents",)) -> None:
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
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ConfigError(f"callback_on_step_end_tensor_inputs {unknown} are not passed to callbacks; "
                              f"expected names from {self._callback_tensor_inputs}")
        n_trials = len(eeg) if eeg is not None else _batch_size(condition)
        if isinstance(generator, list) and len(generator) != n_trials:
            raise ConfigError(f"a list of generators needs one per trial ({n_trials}), got {len(generator)}")
        self._check_sizes(n_trials * num_images_per_eeg, height, width, latents)
        self._check_null(n_trials, null_condition, negative_condition)

    def _check_sizes(self, n_images: int, height, width, latents) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise ConfigError(f"{name} must be a positive multiple of the VAE's downsampling factor "
                                  f"({factor}), got {value!r}")
        shape = (n_images, self.unet.config.in_channels, height // factor, width // factor)
        if latents is not None and (not torch.is_tensor(latents) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ConfigError(f"latents must be a tensor of shape {shape} for height={height}, width={width} "
                              f"(trial-major: n_trials x num_images_per_eeg, channels, height / {factor}, "
                              f"width / {factor}), got {got}")

    def _check_null(self, n_trials: int, null_condition: str, negative_condition) -> None:
        if negative_condition is None:
            if null_condition == "learned" and self.conditioner is None:
                raise ConfigError("null_condition='learned' without an EEG conditioner needs `negative_condition` "
                                  "(e.g. the empty prompt's text states)")
            return
        if null_condition != "learned":
            raise ConfigError("`negative_condition` is the learned null condition: pass it with null_condition='learned'")
        if _batch_size(negative_condition) != n_trials:
            raise ConfigError(f"negative_condition needs one row per trial ({n_trials}), got "
                              f"{_batch_size(negative_condition)}")

    # -- steps ----------------------------------------------------------------------------------

    def _null_condition(self, condition: Any, kind: str, negative_condition: Any) -> Any:
        """The condition of guidance's null branch, one row per row of `condition`."""
        if kind == "zero":
            return _map_condition(condition, torch.zeros_like)
        if negative_condition is not None:
            return _map_condition(negative_condition, lambda t: t.to(self._execution_device))
        encoder = self.conditioner.config.encoder_config
        return self.encode_eeg(torch.zeros(_batch_size(condition), encoder["n_channels"], encoder["n_times"]))

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

    def prepare_latents(self, generators: list[torch.Generator], scheduler, height: int, width: int,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """The initial latents [n_images, C, height / f, width / f]: given, or one CPU draw per image.
        fp32 whatever the UNet's dtype: the sampler's arithmetic on them stays fp32 (`denoise` casts)."""
        if latents is None:
            shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = torch.stack([torch.randn(shape, generator=g) for g in generators])  # drawn on the CPU
        return (latents.float() * scheduler.init_noise_sigma).to(self._execution_device, torch.float32)

    @staticmethod
    def _to_output(images: torch.Tensor, n_trials: int, output_type: str):
        if output_type == "latent":
            return images.reshape(n_trials, -1, *images.shape[1:])
        images = images.float().clamp(-1, 1).cpu()
        images = images.reshape(n_trials, -1, *images.shape[1:])  # [n_trials, n_images_per_eeg, 3, H, W]
        if output_type == "pt":
            return images
        arrays = to_uint8(images)
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
        height: int | None = None,
        width: int | None = None,
        negative_condition: Any = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Generate `num_images_per_eeg` images per EEG trial (arguments: the module docstring).

        eeg: [n_trials, n_channels, n_times] (or `condition`: a precomputed EEGCondition-like object
        whose `context` is [n_trials, 77, D], e.g. the class-name oracle's text states).
        height, width: the image size in pixels (multiples of the VAE factor; default `image_size`).
        latents: the initial noise [n_trials * num_images_per_eeg, C, height / f, width / f] (trial-major).
        Returns `DreamDiffusionPipelineOutput(images)` (or a 1-tuple with return_dict=False).
        """
        height, width = height or self.image_size, width or self.image_size
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(eeg, condition, num_images_per_eeg, num_inference_steps, sampler, eta, guidance_scale,
                          null_condition, generator, output_type, height, width, latents, negative_condition,
                          callback_on_step_end_tensor_inputs)
        device = self._execution_device
        steps = num_inference_steps or DEFAULT_STEPS[sampler]
        do_guidance = guidance_scale != 1.0

        # 1. EEG -> condition (context [n, 77, D], optional time embedding)
        condition = self.encode_eeg(eeg) if condition is None else condition
        n_trials = _batch_size(condition)
        # 2. classifier-free guidance: the null condition first, then the EEG one; both repeated per slot
        if do_guidance:
            condition = _cat_conditions(self._null_condition(condition, null_condition, negative_condition), condition)
        condition = _map_condition(condition, lambda t: t.repeat_interleave(num_images_per_eeg, dim=0))
        n_images = n_trials * num_images_per_eeg
        # 3. sampler and timesteps from the scheduler's config
        scheduler = make_scheduler(self.scheduler.config, sampler)
        scheduler.set_timesteps(steps, device=device)
        # 4. initial noise: given, or drawn from one CPU generator per (trial, slot)
        generators = self._image_generators(generator, n_trials, num_images_per_eeg)
        latents = self.prepare_latents(generators, scheduler, height, width, latents)
        step_kwargs = {"generator": generators, "eta": eta} if sampler == "ddim" else {}
        # 5. the denoising loop
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            eps = denoise(self.unet, model_input, t.expand(model_input.shape[0]).to(device), condition)
            if do_guidance:
                eps_null, eps_eeg = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_eeg - eps_null)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
        # 6. stop at non-finite latents (a half-precision overflow) rather than decode them into black images
        check_finite_latents(latents, num_images_per_eeg, self.unet.dtype)
        # 7. decode the latents in chunks to bound memory
        if output_type == "latent":
            images = latents
        else:
            images = torch.cat([decode_latents(self.vae, latents[i : i + decode_batch_size])
                                for i in range(0, n_images, decode_batch_size)])
        self.maybe_free_model_hooks()
        images = self._to_output(images, n_trials, output_type)
        return DreamDiffusionPipelineOutput(images=images) if return_dict else (images,)
