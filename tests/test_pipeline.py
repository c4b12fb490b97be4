"""DreamDiffusionPipeline on a tiny real DreamDiffusion: determinism, samplers, guidance, checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreamdiffusion.errors import ConfigError
from dreamdiffusion.pipeline import DreamDiffusionPipeline, make_scheduler
from stage2_tiny import ENCODER, IMAGE_SIZE, tiny_model


@pytest.fixture(scope="module")
def pipe():
    pipe = DreamDiffusionPipeline(tiny_model(seed=0).eval())
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
def test_samplers_run_and_differ_from_the_noise(pipe, eeg, sampler):
    out = pipe(eeg[:1], num_images_per_eeg=1, num_inference_steps=3, sampler=sampler, generator=_gens(1)).images
    assert out.shape == (1, 1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(out).all()


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
    plms = make_scheduler(pipe.model.noise_scheduler.config, "plms")
    plms.set_timesteps(250)
    # LDM's PLMSSampler: 250 uniform steps 997, 993, ..., 1 (ddim_discretize "uniform" + 1)
    assert sorted(set(plms.timesteps.tolist()), reverse=True) == list(range(997, 0, -4))
    ddim = make_scheduler(pipe.model.noise_scheduler.config, "ddim")
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
        dict(output_type="latent"),
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
