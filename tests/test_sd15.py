"""SD1.5 loading without the hub: the configs, CompVis single files, diffusers folders, strictness."""

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.models.dreamdiffusion import time_cond_overrides
from dreamdiffusion.models.original_formats import compvis_key_map, save_compvis_checkpoint
from dreamdiffusion.models.sd15 import SD15_CONFIG_DIR, build_sd15, load_sd15, read_sd15_configs
from stage2_tiny import IMAGE_SIZE, tiny_sd, tiny_sd_configs, write_config_dir

SD15_DIR = SD15_CONFIG_DIR


def test_sd15_configs_are_stable_diffusion_1_5():
    unet, vae, scheduler = read_sd15_configs(SD15_DIR)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["sample_size"] == 64 and unet["attention_head_dim"] == 8 and unet["layers_per_block"] == 2
    assert vae["latent_channels"] == 4 and vae["scaling_factor"] == 0.18215 and vae["block_out_channels"] == [128, 256, 512, 512]
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert scheduler["num_train_timesteps"] == 1000 and scheduler["prediction_type"] == "epsilon"
    assert json.loads((SD15_DIR / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


def _fake_compvis(unet, vae, value_of):
    """A CompVis state dict built from our key map, holding value_of(diffusers tensor)."""
    sd = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    out = {}
    for ours, ldm in compvis_key_map(unet, vae).items():
        group, _, key = ours.partition(".")
        t = value_of(ours, sd[group][key])
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            t = t[:, :, None, None]
        out[ldm] = t
    return out


def test_key_map_is_the_inverse_of_diffusers_converter_at_sd15_size():
    # Full SD1.5 architecture on the meta device (no memory): our map and diffusers' converter agree
    # on every key and shape.
    with torch.device("meta"):
        parts = build_sd15(*read_sd15_configs(SD15_DIR), unet_overrides=time_cond_overrides())
    ldm = _fake_compvis(parts.unet, parts.vae, lambda name, t: t)
    unet_sd = convert_ldm_unet_checkpoint(ldm, dict(parts.unet.config))
    vae_sd = convert_ldm_vae_checkpoint(ldm, dict(parts.vae.config))
    assert len(unet_sd) == 686  # SD1.5's UNet tensors
    assert {k: v.shape for k, v in unet_sd.items()} == {k: v.shape for k, v in parts.unet.state_dict().items()}
    assert {k: v.shape for k, v in vae_sd.items()} == {k: v.shape for k, v in parts.vae.state_dict().items()}


def test_key_map_sends_every_tensor_to_its_place():
    # Unique values: a tensor lands where diffusers' converter puts it, not just somewhere of the right shape.
    parts = tiny_sd()
    counter = iter(range(1, 10**6))
    unique = {}

    def value_of(name, t):
        unique[name] = torch.full(t.shape, float(next(counter)))
        return unique[name]

    ldm = _fake_compvis(parts.unet, parts.vae, value_of)
    unet_sd = convert_ldm_unet_checkpoint(ldm, dict(parts.unet.config))
    vae_sd = convert_ldm_vae_checkpoint(ldm, dict(parts.vae.config))
    ours = {f"unet.{k}": v for k, v in unet_sd.items()} | {f"vae.{k}": v for k, v in vae_sd.items()}
    assert set(ours) == set(unique)
    for k, v in unique.items():
        assert torch.equal(ours[k].reshape(v.shape), v), k


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    config_dir = write_config_dir(root / "configs", *tiny_sd_configs())
    parts = tiny_sd(seed=3)
    unused = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(3),
              "model_ema.decay": torch.tensor(0.999), "betas": torch.linspace(0, 1, 5)}
    ckpt = save_compvis_checkpoint(parts.unet, parts.vae, root / "tiny.ckpt", extra=unused)
    st = save_compvis_checkpoint(parts.unet, parts.vae, root / "tiny.safetensors")
    folder = root / "diffusers"
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.noise_scheduler.save_pretrained(folder / "scheduler")
    return {"config_dir": config_dir, "parts": parts, "ckpt": ckpt, "safetensors": st, "folder": folder}


def _outputs(parts):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, parts.unet.config.cross_attention_dim, generator=g)
    time = torch.randn(2, 4 * parts.unet.config.block_out_channels[0], generator=g)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    with torch.no_grad():
        eps = parts.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=context, class_labels=time).sample
        decoded = parts.vae.decode(latents).sample
        encoded = parts.vae.encode(images).latent_dist.mean
    return eps, decoded, encoded


@pytest.mark.parametrize("kind", ["ckpt", "safetensors", "folder"])
def test_round_trip_gives_identical_outputs(tiny_files, kind):
    loaded = load_sd15(tiny_files[kind], tiny_files["config_dir"], unet_overrides=time_cond_overrides())
    for a, b in zip(_outputs(tiny_files["parts"]), _outputs(loaded)):
        assert torch.equal(a, b)
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_key_mismatches_are_errors_that_name_the_keys(tiny_files, tmp_path):
    parts = tiny_files["parts"]
    extra = save_compvis_checkpoint(parts.unet, parts.vae, tmp_path / "extra.safetensors",
                                    extra={"model.diffusion_model.surprise.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected 1 keys.*surprise"):
        load_sd15(extra, tiny_files["config_dir"], unet_overrides=time_cond_overrides())
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_files["safetensors"]))
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 keys.*out.2.bias"):
        load_sd15(tmp_path / "missing.safetensors", tiny_files["config_dir"])
    # SD1.5's real configs do not fit the tiny file
    with pytest.raises(CheckpointError, match="does not match the UNet/VAE configs"):
        load_sd15(tiny_files["safetensors"], SD15_DIR)


def test_missing_file_says_what_to_download(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found at .*nothing\.ckpt.*v1-5-pruned.*pretrains/README\.md"):
        load_sd15(tmp_path / "nothing.ckpt")
