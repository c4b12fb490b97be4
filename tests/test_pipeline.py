"""DreamDiffusionPipeline on a tiny real DreamDiffusion: determinism, samplers, guidance, checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline, make_scheduler
from stage2_tiny import ENCODER, IMAGE_SIZE, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def pipe(model):
    pipe = DreamDiffusionPipeline.from_model(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def eeg():
    return torch.randn(3, ENCODER["n_channels"], ENCODER["n_times"], generator=torch.Generator().manual_seed(0))


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_same_seed_same_images_and_batch_independence(pipe, eeg):
    kwargs = dict(num_images_per_eeg=2, num_inference_steps=3)
    a = pipe(eeg, generator=torch.Generator().manual_seed(5), **kwargs).images
    b = pipe(eeg, generator=torch.Generator().manual_seed(5), **kwargs).images
    c = pipe(eeg, generator=torch.Generator().manual_seed(6), **kwargs).images
    assert a.shape == (3, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[:, 0], a[:, 1])  # slots differ
    # one generator per trial: an image does not depend on which trials share its batch
    together = pipe(eeg, generator=_gens(10, 11, 12), **kwargs).images
    alone = torch.cat([pipe(eeg[i : i + 1], generator=_gens(10 + i), **kwargs).images for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert together.min() >= -1 and together.max() <= 1


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpm++"])
def test_samplers_run_and_differ_from_the_noise(pipe, model, eeg, sampler):
    noise = torch.randn(1, model.latent_channels, model.latent_size, model.latent_size,
                        generator=torch.Generator().manual_seed(9))
    kwargs = dict(num_images_per_eeg=1, sampler=sampler, latents=noise)
    out = pipe(eeg[:1], num_inference_steps=3, **kwargs).images
    assert out.shape == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(out).all()
    # denoising moved the latents away from the initial noise, and the image is what they decode to
    final = pipe(eeg[:1], num_inference_steps=3, output_type="latent", **kwargs).images[:, 0]
    assert final.shape == noise.shape and (final - noise).abs().mean() > 0.1
    with torch.no_grad():
        decoded = model.decode_latents(final).clamp(-1, 1)
        assert torch.allclose(out[:, 0], decoded, atol=1e-5)
        assert not torch.allclose(out[:, 0], model.decode_latents(noise).clamp(-1, 1), atol=0.05)
    # more steps are not the same computation
    assert not torch.allclose(out, pipe(eeg[:1], num_inference_steps=4, **kwargs).images)


def test_given_latents_replace_the_seeded_noise(pipe, model, eeg):
    """`latents=` as in diffusers: the same initial noise gives the same images, whatever the generator."""
    noise = torch.randn(2 * 2, model.latent_channels, model.latent_size, model.latent_size,
                        generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_images_per_eeg=2, num_inference_steps=2)
    a = pipe(eeg[:2], latents=noise, generator=_gens(1, 2), **kwargs).images
    b = pipe(eeg[:2], latents=noise, generator=_gens(5, 6), **kwargs).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, pipe(eeg[:2], generator=_gens(1, 2), **kwargs).images)


def _ldm_plms(eps, x, alphas_cumprod, steps):
    """LDM's PLMSSampler (ddim_eta 0), written out: a pseudo improved-Euler first step (two UNet
    calls), then the 2-, 3- and 4-step Adams-Bashforth combinations of the eps history; timesteps
    1, 1 + 1000/S, ...; alpha_prev of the last step = alphas_cumprod[0]. Float64."""
    ts = np.arange(0, 1000, 1000 // steps) + 1
    alphas = alphas_cumprod[ts].double()
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]]).double()

    def update(x, e, idx):  # the DDIM (eta 0) step from alphas[idx] to alphas_prev[idx]
        pred_x0 = (x - (1 - alphas[idx]).sqrt() * e) / alphas[idx].sqrt()
        return alphas_prev[idx].sqrt() * pred_x0 + (1 - alphas_prev[idx]).sqrt() * e

    x, old, calls = x.double(), [], 0
    time_range = ts[::-1]
    for i, t in enumerate(time_range):
        idx = len(ts) - 1 - i
        e_t = eps(x, t)
        calls += 1
        if not old:
            e_next = eps(update(x, e_t, idx), time_range[min(i + 1, len(ts) - 1)])
            calls += 1
            e_prime = (e_t + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e_t - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = update(x, e_prime, idx)
        old.append(e_t)
    return x, calls


def test_plms_is_ldm_plms(pipe, model, eeg):
    """diffusers' PNDM with skip_prk_steps (our "plms") against LDM's update equations on a tiny UNet:
    the same S + 1 UNet calls and the same latents after 10 steps."""
    condition = model.encode_eeg(eeg[:2])
    calls = []

    def eps(x, t):
        calls.append(int(t))
        with torch.no_grad():
            return model.denoise(x.float(), torch.full((len(x),), int(t)), condition).double()

    noise = torch.randn(2, model.latent_channels, model.latent_size, model.latent_size,
                        generator=torch.Generator().manual_seed(0))
    ours = pipe(eeg[:2], num_images_per_eeg=1, num_inference_steps=10, sampler="plms", latents=noise,
                output_type="latent").images[:, 0].double()
    theirs, n_calls = _ldm_plms(eps, noise, model.noise_scheduler.alphas_cumprod, 10)
    assert n_calls == 11
    scheduler = make_scheduler(model.noise_scheduler.config, "plms")
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 11  # diffusers makes the same 11 calls (its second timestep twice)
    assert torch.allclose(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=0), (ours - theirs).abs().max()


def test_ddim_eta_draws_seeded_noise(pipe, eeg):
    kwargs = dict(num_images_per_eeg=1, num_inference_steps=3, sampler="ddim")
    eta0 = pipe(eeg[:2], generator=_gens(1, 2), **kwargs).images
    eta1 = pipe(eeg[:2], generator=_gens(1, 2), eta=1.0, **kwargs).images
    assert not torch.allclose(eta0, eta1)
    assert torch.equal(eta1, pipe(eeg[:2], generator=_gens(1, 2), eta=1.0, **kwargs).images)


def test_guidance_changes_images_and_scale_one_is_off(pipe, eeg):
    kwargs = dict(num_images_per_eeg=1, num_inference_steps=3, generator=None)
    base = pipe(eeg[:2], **{**kwargs, "generator": _gens(3, 4)}).images
    same = pipe(eeg[:2], guidance_scale=1.0, null_condition="learned", **{**kwargs, "generator": _gens(3, 4)}).images
    assert torch.equal(base, same)
    for null in ("zero", "learned"):
        guided = pipe(eeg[:2], guidance_scale=3.0, null_condition=null, **{**kwargs, "generator": _gens(3, 4)}).images
        assert not torch.allclose(base, guided)


def test_output_types(pipe, eeg):
    kwargs = dict(num_images_per_eeg=2, num_inference_steps=2)
    pt = pipe(eeg[:2], generator=_gens(0, 1), **kwargs).images
    arrays = pipe(eeg[:2], generator=_gens(0, 1), output_type="np", **kwargs).images
    pil = pipe(eeg[:2], generator=_gens(0, 1), output_type="pil", **kwargs).images
    assert arrays.shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3) and arrays.dtype == np.uint8
    assert np.array_equal(arrays, ((pt + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy())
    assert isinstance(pil[1][0], Image.Image) and np.array_equal(np.asarray(pil[1][0]), arrays[1, 0])


def test_plms_matches_the_authors_timesteps(pipe):
    plms = make_scheduler(pipe.scheduler.config, "plms")
    plms.set_timesteps(250)
    # LDM's PLMSSampler: 250 uniform steps 997, 993, ..., 1 (ddim_discretize "uniform" + 1)
    assert sorted(set(plms.timesteps.tolist()), reverse=True) == list(range(997, 0, -4))
    ddim = make_scheduler(pipe.scheduler.config, "ddim")
    assert ddim.config.set_alpha_to_one is False and ddim.config.steps_offset == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampler="euler"),
        dict(num_images_per_eeg=0),
        dict(num_inference_steps=0),
        dict(eta=0.5, sampler="plms"),
        dict(eta=2.0, sampler="ddim"),
        dict(guidance_scale=-1.0),
        dict(null_condition="random"),
        dict(output_type="tensor"),
        dict(latents=torch.zeros(1, 4, 8, 8)),  # 1 latent for 3 trials
        dict(generator=[torch.Generator()]),  # 1 generator for 3 trials
    ],
)
def test_check_inputs_rejects_bad_arguments(pipe, eeg, kwargs):
    with pytest.raises(ConfigError):
        pipe(eeg, **kwargs)


def test_check_inputs_rejects_bad_eeg(pipe):
    with pytest.raises(ConfigError, match="n_channels"):
        pipe(torch.randn(ENCODER["n_channels"], ENCODER["n_times"]))
    with pytest.raises(ConfigError, match="either"):
        pipe()


def test_benchmark_script_runs_on_tiny_configs(tmp_path):
    import importlib.util
    import json

    from dreamdiffusion.config import REPO_ROOT
    from stage2_tiny import tiny_sd_configs, write_config_dir

    spec = importlib.util.spec_from_file_location("bench_generate", REPO_ROOT / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config_dir = write_config_dir(tmp_path / "sd", *tiny_sd_configs())
    out = tmp_path / "bench.json"
    report = bench.main(["--device", "cpu", "--sd-config-dir", str(config_dir), "--image-size", "16",
                         "--encoder", "small", "--num-images-per-eeg", "2", "--samplers", "plms:2", "dpm++:2",
                         "--out", str(out)])
    assert [r["sampler"] for r in report["results"]] == ["plms", "dpm++"]
    assert all(r["seconds_per_image"] > 0 and r["images"] == 2 for r in report["results"])
    assert json.loads(out.read_text())["image_size"] == 16
