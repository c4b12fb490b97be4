"""DreamDiffusion (stage-2 model): what trains, the losses, saving, and the authors' checkpoint format."""

import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, EEGCondition, select_trainable
from dreamdiffusion.models.original_formats import write_generation_checkpoint
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline
from stage2_tiny import (
    IMAGE_SIZE,
    tiny_batch,
    tiny_clip,
    tiny_model,
    tiny_sd,
    tiny_sd_configs,
    write_config_dir,
)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained():
    """A tiny model before and after 3 AdamW steps on the full loss."""
    model = tiny_model(seed=0)
    table = select_trainable(model)
    before = _snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    history = []
    for step in range(3):
        losses = model.training_losses(tiny_batch(seed=step))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.detach() for k, v in losses.items()})
    return model, table, before, history


def test_training_changes_exactly_the_selected_parameters(trained):
    model, table, before, _ = trained
    after = dict(model.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    for name, param in after.items():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    # the selection: the conditioner (minus the unused cls token) and UNet cross-attention + its norm
    assert all(n.startswith(("conditioner.", "unet.")) for n in trainable)
    assert "conditioner.encoder.cls_token" not in trainable
    unet_trainable = {n for n in trainable if n.startswith("unet.")}
    assert unet_trainable and all(".attn2." in n or ".norm2." in n for n in unet_trainable)
    rows = {r["group"]: r for r in table}
    assert rows["vae"]["trainable"] == 0 and rows["clip"]["trainable"] == 0 and rows["unet.other"]["trainable"] == 0
    assert rows["unet.cross_attention (attn2+norm2)"]["frozen"] == 0


def test_norm2_is_selected_by_module_type_not_by_name(trained):
    model = trained[0]
    resnets = [m for m in model.unet.modules() if isinstance(m, ResnetBlock2D)]
    blocks = [m for m in model.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert resnets and blocks
    assert not any(p.requires_grad for m in resnets for p in m.norm2.parameters())  # ResNet norm2: frozen
    assert all(p.requires_grad for m in blocks for p in (*m.norm2.parameters(), *m.attn2.parameters()))
    assert not any(p.requires_grad for m in blocks for p in (*m.norm1.parameters(), *m.attn1.parameters()))


def test_clip_stays_frozen_and_in_eval_mode(trained):
    model, _, before, _ = trained
    model.train()
    assert not model.clip_encoder.training and not model.vae.training
    for name, param in model.clip_encoder.named_parameters():
        assert not param.requires_grad and torch.equal(before[f"clip_encoder.{name}"], param)


def test_loss_terms_are_the_method_written_out():
    """training_losses against the same computation with plain modules and the same random draws:
    diffusion = MSE(UNet(noisy latents, t, EEG context), noise); clip = 1 - cos(CLIP head, CLIP image embedding)."""
    model = tiny_model(seed=9, clip_weight=0.7).train()
    batch = tiny_batch(seed=4)
    torch.manual_seed(123)
    losses = model.training_losses(batch)
    assert set(losses) == {"loss", "diffusion", "clip"}
    torch.manual_seed(123)  # the same draws, in the same order
    with torch.no_grad():
        latents = model.vae.encode(batch["image"]).latent_dist.sample() * model.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents),))
        alpha = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        cond = model.conditioner
        tokens = cond.encoder(batch["eeg"])
        context = cond.dim_mapper(cond.channel_mapper(tokens))
        time = cond.time_cond(context).squeeze(1)
        eps = model.unet(noisy, t, encoder_hidden_states=context, class_labels=time).sample
        diffusion = ((eps - noise) ** 2).mean()
        head = cond.clip_head(tokens).squeeze(1)
        target = model.clip_encoder.model(pixel_values=batch["clip_pixel_values"]).image_embeds
        clip = 1 - F.cosine_similarity(head, target, dim=-1).mean()
    assert torch.allclose(losses["diffusion"], diffusion, atol=1e-6)
    assert torch.allclose(losses["clip"], clip, atol=1e-6)
    assert torch.allclose(losses["loss"], diffusion + 0.7 * clip, atol=1e-6)


def test_contrastive_clip_loss_and_no_clip():
    model = tiny_model(seed=1, clip_loss="contrastive", clip_temperature=0.1)
    losses = model.training_losses(tiny_batch())
    assert torch.isfinite(losses["clip"]) and losses["clip"] > 0
    model = tiny_model(seed=1, clip_weight=0.0)
    losses = model.training_losses(tiny_batch())
    assert losses["clip"] == 0 and torch.equal(losses["loss"], losses["diffusion"])


def test_shapes_follow_the_configs():
    model = tiny_model(seed=2)
    condition = model.encode_eeg(tiny_batch(2)["eeg"])
    assert condition.context.shape == (2, 77, model.unet.config.cross_attention_dim)
    assert condition.time_embedding.shape == (2, 4 * model.unet.config.block_out_channels[0])
    assert condition.clip_embedding.shape == (2, model.clip_encoder.projection_dim)
    assert model.vae_scale_factor * model.latent_size == IMAGE_SIZE
    latents = model.encode_images(tiny_batch(2)["image"])
    assert latents.shape == (2, model.latent_channels, model.latent_size, model.latent_size)
    assert model.decode_latents(latents).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def _noise_inputs(model, n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, model.latent_channels, model.latent_size, model.latent_size, generator=g)
    return latents, torch.tensor([3, 700][:n]), tiny_batch(n, seed=seed)["eeg"]


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(seed=4).eval()
    with torch.no_grad():  # perturb the trainable parts so a reload of fresh weights would show
        for p in model.conditioner.parameters():
            p.add_(0.01 * torch.randn_like(p))
    DreamDiffusionPipeline.from_model(model).save_pretrained(tmp_path / "model")
    loaded = DreamDiffusion.from_pretrained(tmp_path / "model")
    inputs = _noise_inputs(model)
    with torch.no_grad():
        assert torch.equal(model.predict_noise(*inputs), loaded.predict_noise(*inputs))
    assert loaded.clip_encoder is None and loaded.conditioner.sizes == model.conditioner.sizes
    assert loaded.conditioner.encoder.config == model.conditioner.encoder.config
    with pytest.raises(CheckpointError, match="not a DreamDiffusion model folder"):
        DreamDiffusion.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# The authors' generation checkpoint


def _authors_checkpoint(tmp_path, model, extra_keys=None):
    """Their LatentDiffusion state dict (key names of code/dc_ldm), their pickled
    config.Config_Generative_Model, and parts we skip (their CLIP image embedder, schedule buffers,
    the EMA counter); the class's module is gone when the file is read."""
    extra = {"image_embedder.transformer.vision_model.post_layernorm.weight": torch.ones(4),
             "betas": torch.linspace(1e-4, 2e-2, 1000), "model_ema.num_updates": torch.tensor(0), **(extra_keys or {})}
    return write_generation_checkpoint(model, tmp_path / "checkpoint.pth", extra=extra)


def _reference_eps(model, latents, timesteps, eeg):
    """Their forward written out with plain ops on the same weights (not through EEGConditioner)."""
    cond = model.conditioner
    tokens = cond.encoder(eeg)
    w = {k: v for k, v in cond.state_dict().items()}
    x = F.conv1d(tokens, w["channel_mapper.0.weight"], w["channel_mapper.0.bias"])
    x = F.conv1d(x, w["channel_mapper.1.weight"], w["channel_mapper.1.bias"])
    context = F.linear(x, w["dim_mapper.weight"], w["dim_mapper.bias"])
    t = F.conv1d(context, w["time_cond.0.weight"], w["time_cond.0.bias"])
    t = F.conv1d(t, w["time_cond.1.weight"], w["time_cond.1.bias"])
    t = F.linear(t, w["time_cond.2.weight"], w["time_cond.2.bias"]).squeeze(1)
    return model.unet(latents, timesteps, encoder_hidden_states=context, class_labels=t).sample


@pytest.fixture(scope="module")
def authors_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors")
    model = tiny_model(seed=6, clip=tiny_clip(6)).eval()
    config_dir = write_config_dir(tmp / "sd_config", *tiny_sd_configs())
    return tmp, model, config_dir


def test_from_original_checkpoint_reproduces_their_outputs(authors_setup):
    tmp, model, config_dir = authors_setup
    path = _authors_checkpoint(tmp, model)
    assert "config" not in sys.modules
    loaded = DreamDiffusion.from_original_checkpoint(path, sd_config=config_dir)
    latents, timesteps, eeg = _noise_inputs(model)
    with torch.no_grad():
        expected = _reference_eps(model, latents, timesteps, eeg)
        assert torch.allclose(loaded.predict_noise(latents, timesteps, eeg), expected, atol=1e-6, rtol=0)
        clip_expected = model.conditioner.clip_head(model.conditioner.encoder(eeg)).squeeze(1)
        assert torch.allclose(loaded.encode_eeg(eeg).clip_embedding, clip_expected, atol=1e-6, rtol=0)
        assert torch.equal(loaded.decode_latents(latents), model.decode_latents(latents))
    assert isinstance(loaded.encode_eeg(eeg), EEGCondition)


def test_from_original_checkpoint_rejects_unknown_keys(authors_setup):
    tmp, model, config_dir = authors_setup
    path = _authors_checkpoint(tmp, model, extra_keys={"model.diffusion_model.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="mystery"):
        DreamDiffusion.from_original_checkpoint(path, sd_config=config_dir)
    path = _authors_checkpoint(tmp, model, extra_keys={"cond_stage_model.dim_mapper.extra": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="dim_mapper.extra"):
        DreamDiffusion.from_original_checkpoint(path, sd_config=config_dir)


def test_time_conditioning_needs_the_identity_class_embedding():
    from dreamdiffusion.core.errors import ConfigError
    from dreamdiffusion.models.dreamdiffusion import EEGConditioner

    sd = tiny_sd(time_cond=False)
    model = tiny_model(seed=7)
    with pytest.raises(ConfigError, match="class_embed_type='identity'"):
        DreamDiffusion(model.conditioner, sd.unet, sd.vae, sd.noise_scheduler)
    assert isinstance(model.conditioner, EEGConditioner)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=8)
        select_trainable(model)
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.train()
        torch.manual_seed(0)
        model.training_losses(tiny_batch(seed=8))["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None and torch.allclose(grad, grads[1][name], atol=1e-6), name
