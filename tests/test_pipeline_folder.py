"""DreamDiffusionPipeline as a diffusers pipeline folder, on a tiny real stage-2 model: save_pretrained /
from_pretrained(torch_dtype=...), height/width and latents of the matching size, callback_on_step_end,
the progress bar, an earlier version's folder, the authors' checkpoint, the model card, and the
Python example of docs/python_api.md."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamdiffusion.config import REPO_ROOT
from dreamdiffusion.core.errors import CheckpointError, ConfigError, run_cli
from dreamdiffusion.models.dreamdiffusion import EEGConditioner
from dreamdiffusion.models.original_formats import write_generation_checkpoint
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline
from dreamdiffusion.train import model_card
from stage2_tiny import ENCODER, IMAGE_SIZE, tiny_model, tiny_sd_configs, write_config_dir

STEPS = dict(num_inference_steps=3, sampler="plms")  # 3 PLMS steps = 4 UNet calls


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=3, clip=None).eval()
    with torch.no_grad():  # the trained parts away from their initial values, so a fresh load would show
        for p in model.conditioner.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "model"
    DreamDiffusionPipeline.from_model(model).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = DreamDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _eeg(n=2, seed=0):
    return torch.randn(n, ENCODER["n_channels"], ENCODER["n_times"], generator=torch.Generator().manual_seed(seed))


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_the_folder_is_a_diffusers_pipeline_that_reloads_the_same_model(model, folder, pipe):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DreamDiffusionPipeline"
    assert index["conditioner"] == ["dreamdiffusion.models.dreamdiffusion", "EEGConditioner"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["scheduler"][1] == "DDPMScheduler"
    config = json.loads((folder / "conditioner" / "config.json").read_text())
    assert config["encoder_config"] == model.conditioner.encoder.config and config["time_embed_dim"] is not None
    assert isinstance(pipe.conditioner, EEGConditioner) and pipe.dtype == torch.float32
    original = DreamDiffusionPipeline.from_model(model)
    original.set_progress_bar_config(disable=True)
    kwargs = dict(num_images_per_eeg=2, generator=_gens(1, 2), **STEPS)
    assert torch.equal(pipe(_eeg(), **kwargs).images, original(_eeg(), **{**kwargs, "generator": _gens(1, 2)}).images)


def test_torch_dtype_at_load(folder):
    half = DreamDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {half.conditioner.dtype, half.unet.dtype, half.vae.dtype} == {torch.bfloat16}
    half.set_progress_bar_config(disable=True)
    out = half(_eeg(1), num_images_per_eeg=1, output_type="np", **STEPS).images
    assert out.shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_height_width_and_latents_of_the_matching_size(pipe):
    out = pipe(_eeg(), num_images_per_eeg=2, height=16, width=24, generator=_gens(1, 2), **STEPS).images
    assert out.shape == (2, 2, 3, 16, 24) and torch.isfinite(out).all()
    # latents of the size height/width ask for: accepted, and they replace the seeded noise
    noise = torch.randn(4, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    a = pipe(_eeg(), num_images_per_eeg=2, height=16, width=24, latents=noise, generator=_gens(1, 2), **STEPS).images
    b = pipe(_eeg(), num_images_per_eeg=2, height=16, width=24, latents=noise, generator=_gens(7, 8), **STEPS).images
    assert a.shape == (2, 2, 3, 16, 24) and torch.equal(a, b)
    # the default size's latents with another height/width: refused with the expected shape
    with pytest.raises(ConfigError, match=re.escape("latents must be a tensor of shape (4, 4, 8, 12) for height=16, "
                                                    "width=24")):
        pipe(_eeg(), num_images_per_eeg=2, height=16, width=24, latents=torch.randn(4, 4, 8, 8), **STEPS)
    with pytest.raises(ConfigError, match="height must be a positive multiple of the VAE's downsampling factor"):
        pipe(_eeg(), height=15, **STEPS)


def test_callback_on_step_end_sees_every_step_and_may_replace_the_latents(pipe):
    calls = []

    def record(p, step, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents"}
        calls.append((step, int(timestep), tuple(callback_kwargs["latents"].shape)))
        return callback_kwargs

    pipe(_eeg(), num_images_per_eeg=1, height=16, width=24, callback_on_step_end=record, **STEPS)
    assert [c[0] for c in calls] == [0, 1, 2, 3]  # PLMS: S + 1 UNet calls
    assert calls[0][1] > calls[-1][1] and {c[2] for c in calls} == {(2, 4, 8, 12)}

    def zero_at_the_end(p, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 3 else {}

    final = pipe(_eeg(), num_images_per_eeg=1, output_type="latent", callback_on_step_end=zero_at_the_end, **STEPS)
    assert torch.equal(final.images, torch.zeros_like(final.images))
    with pytest.raises(ConfigError, match="callback_on_step_end_tensor_inputs"):
        pipe(_eeg(), callback_on_step_end=record, callback_on_step_end_tensor_inputs=["eps"], **STEPS)


def test_progress_bar_configuration(pipe, capsys):
    pipe.set_progress_bar_config(desc="eeg-to-image", disable=False)
    try:
        pipe(_eeg(1), num_images_per_eeg=1, **STEPS)
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "eeg-to-image" in capsys.readouterr().err
    pipe(_eeg(1), num_images_per_eeg=1, **STEPS)
    assert "eeg-to-image" not in capsys.readouterr().err


def _write_earlier_layout(model, path):
    """The layout stage 2 wrote before the pipeline folder: dreamdiffusion.json + conditioner.safetensors."""
    sizes = model.conditioner.sizes
    settings = {"format": "dreamdiffusion-stage2/1", "encoder": dict(model.conditioner.encoder.config), **sizes,
                "clip_weight": 1.0, "clip_loss": "cosine", "clip_temperature": 0.07}
    path.mkdir(parents=True)
    (path / "dreamdiffusion.json").write_text(json.dumps(settings))
    save_file({k: v.contiguous() for k, v in model.conditioner.state_dict().items()}, str(path / "conditioner.safetensors"))
    model.unet.save_pretrained(path / "unet")
    model.vae.save_pretrained(path / "vae")
    model.noise_scheduler.save_pretrained(path / "scheduler")


def test_an_earlier_folder_loads_and_converts_in_one_line(model, pipe, tmp_path):
    _write_earlier_layout(model, tmp_path / "old")
    old = DreamDiffusionPipeline.from_pretrained(tmp_path / "old", torch_dtype=torch.float32)
    old.save_pretrained(tmp_path / "new")
    new = DreamDiffusionPipeline.from_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / "model_index.json").is_file()
    kwargs = dict(num_images_per_eeg=1, output_type="latent", **STEPS)
    expected = pipe(_eeg(), generator=_gens(3, 4), **kwargs).images
    for loaded in (old, new):
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(loaded(_eeg(), generator=_gens(3, 4), **kwargs).images, expected)


def test_the_authors_checkpoint_loads_into_the_same_pipeline(model, pipe, tmp_path):
    path = write_generation_checkpoint(model, tmp_path / "checkpoint.pth")
    config_dir = write_config_dir(tmp_path / "sd_config", *tiny_sd_configs())
    theirs = DreamDiffusionPipeline.from_original_checkpoint(path, sd_config=config_dir, torch_dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    kwargs = dict(num_images_per_eeg=1, output_type="latent", **STEPS)
    ours = pipe(_eeg(), generator=_gens(3, 4), **kwargs).images
    assert torch.allclose(theirs(_eeg(), generator=_gens(3, 4), **kwargs).images, ours, atol=1e-5)
    theirs.save_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "model_index.json").read_text())["conditioner"][1] == "EEGConditioner"


def test_loading_is_strict_and_says_what_is_wrong(folder, tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        DreamDiffusionPipeline.from_pretrained(tmp_path / "nowhere" / "model")
    broken = tmp_path / "broken"
    DreamDiffusionPipeline.from_pretrained(folder).save_pretrained(broken)
    weights = broken / "conditioner" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["dim_mapper.bias"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="dim_mapper.bias"):
        DreamDiffusionPipeline.from_pretrained(broken)


# ---------------------------------------------------------------------------------------------
# The model card


TRAINING = {"config": {"fidelity": "paper", "trainable": "paper", "epochs": 3, "seed": 2022,
                       "data": {"kind": "imagenet_eeg", "subject": 4, "split_index": 0, "eeg_path": "eeg.pth",
                                "splits_path": "splits.pth", "image_dir": "images", "image_size": 512}},
            "deviations": [{"line": "batch size 4 per device (paper: 25)"}],
            "val": {"exported": {"epoch": "1", "val_loss": "0.4312", "val_clip": "0.2911"},
                    "last": {"epoch": "2", "val_loss": "0.4402"}},
            "eeg_input": {"n_channels": 128, "n_times": 512}}
SELECTION = {"export": "best", "chosen_on": "val", "monitor": "val/loss", "value": 0.4312, "epoch": 1}


def test_the_model_card_says_data_settings_deviations_and_figures(tmp_path):
    (tmp_path / "training.json").write_text(json.dumps(TRAINING))
    (tmp_path / "selection.json").write_text(json.dumps(SELECTION))
    card = model_card.write_model_card(tmp_path).read_text()
    for text in ("ImageNet-EEG (eeg.pth)", "subject 4", "split_index 0 of splits.pth", "| `epochs` | `3` |",
                 "batch size 4 per device (paper: 25)", "| exported epoch | 1 | 0.4312 |", "chosen on val",
                 "None recorded yet", "torch.randn(2, 128, 512)"):
        assert text in card, text
    metrics = {"protocol": {"n_trials": 40, "split": "test", "num_images_per_eeg": 5, "sampler": "plms",
                            "num_inference_steps": 250, "seed": 0},
               "metrics": {"n_way": {"mean": 0.25, "mean_ci95": [0.2, 0.3]}, "ssim": {"mean": 0.18}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert run_cli(model_card.main, [str(tmp_path), "--stage3", str(tmp_path / "metrics.json")]) == 0
    card = (tmp_path / "README.md").read_text()
    assert "| n-way top-k (mean over slots) | 25% | [20%, 30%] |" in card and "| SSIM | 0.18 | – |" in card
    assert run_cli(model_card.main, [str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------------
# docs/python_api.md


def test_the_python_example_of_the_docs_runs(folder, tmp_path, monkeypatch):
    text = (REPO_ROOT / "docs" / "python_api.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    assert len(example.strip().splitlines()) <= 10
    # the example as written, pointed at the tiny folder, on the CPU, at the tiny model's sizes
    for old, new in (('"outputs/stage2/model"', repr(str(folder))), ("torch.float16", "torch.float32"),
                     ('.to("cuda")', '.to("cpu")'), ("height=512, width=512", "height=16, width=24")):
        assert old in example, old
        example = example.replace(old, new)
    monkeypatch.chdir(tmp_path)
    torch.save(_eeg(2), tmp_path / "my_trials.pt")
    namespace = {}
    exec(compile(example, "docs/python_api.md", "exec"), namespace)
    images = namespace["images"]
    assert len(images) == 2 and len(images[0]) == 5 and images[0][0].size == (24, 16)
    assert (tmp_path / "trial0_image0.png").is_file()
