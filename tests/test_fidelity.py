"""fidelity=paper | authors_code: what trains at SD1.5 size in each mode, what the authors' mode changes in
training, and the deviations manifest (its values, what runs write, docs/method.md)."""

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamdiffusion.config import REPO_ROOT, STAGES, deviations
from dreamdiffusion.core import fidelity
from dreamdiffusion.models.clip_embedder import CLIP_VIT_L14_VISION, TransformersCLIP
from dreamdiffusion.models.dreamdiffusion import DreamDiffusion, select_trainable, time_cond_overrides
from dreamdiffusion.models.mae import ENCODER_PRESETS, EEGEncoder
from dreamdiffusion.models.sd15 import build_sd15, read_sd15_configs
from dreamdiffusion.tools.docs import deviations_table
from stage2_tiny import tiny_batch, tiny_model

# Measured with the authors' own modules at SD1.5 size (docs/method.md, "What trains").
PAPER_SET = 198_330_697
AUTHORS_SET = 198_511_945  # the paper set + pos_embed (132,096) + CLIP's layer_norm2 (49,152)
AUTHORS_OPTIMISER = 198_532_169  # + cls/mask tokens (2,048) + VAE ResNet norm2 (18,176), which never change


@pytest.fixture(scope="module")
def sd15_model():
    """SD1.5 + CLIP ViT-L/14 + the large encoder on the meta device: real sizes, no memory."""
    with torch.device("meta"):
        sd = build_sd15(*read_sd15_configs(), unet_overrides=time_cond_overrides())
        clip = TransformersCLIP.from_model(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION)))
        return DreamDiffusion.build(EEGEncoder(**ENCODER_PRESETS["large"]), sd, clip_encoder=clip)


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_parameter_counts_of_both_modes_at_sd15_size(sd15_model):
    model = sd15_model
    table = select_trainable(model, "paper")
    assert _trainable(model) == sum(r["trainable"] for r in table) == PAPER_SET
    assert model.clip_target == "frozen"
    select_trainable(model, "authors_code")
    assert _trainable(model) == AUTHORS_SET
    assert model.clip_target == "drifting"
    extra = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    pos_embed = extra.pop("conditioner.encoder.pos_embed")
    clip_norms = sum(v for n, v in extra.items() if n.startswith("clip_encoder.") and ".layer_norm2." in n)
    assert (pos_embed, clip_norms) == (132_096, 49_152)
    assert not any(n.startswith("clip_encoder.") and ".layer_norm2." not in n for n in extra)
    # what else their optimiser holds never changes: no gradient reaches the tokens or the VAE
    tokens = model.conditioner.encoder.cls_token.numel() + model.conditioner.encoder.mask_token.numel()
    vae_norm2 = sum(p.numel() for m in model.vae.modules() if isinstance(m, ResnetBlock2D) for p in m.norm2.parameters())
    assert AUTHORS_SET + tokens + vae_norm2 == AUTHORS_OPTIMISER
    select_trainable(model, "paper")
    assert _trainable(model) == PAPER_SET


def _train(model, trainable, steps=2):
    select_trainable(model, trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        loss = model.training_losses(tiny_batch(seed=step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}


def test_the_paper_mode_keeps_clip_and_positions_fixed():
    changed = _train(tiny_model(seed=3), "paper")
    assert not any(v for n, v in changed.items() if n.startswith("clip_encoder."))
    assert not changed["conditioner.encoder.pos_embed"]


def test_the_authors_mode_lets_the_clip_target_drift_and_trains_the_positions():
    model = tiny_model(seed=3)
    changed = _train(model, "authors_code")
    clip = {n: v for n, v in changed.items() if n.startswith("clip_encoder.")}
    assert all(v for n, v in clip.items() if ".layer_norm2." in n)  # trained through the CLIP loss
    assert not any(v for n, v in clip.items() if ".layer_norm2." not in n)  # the rest of CLIP stays
    assert changed["conditioner.encoder.pos_embed"]
    assert not changed["conditioner.encoder.cls_token"]  # in their optimiser, but no gradient reaches it
    assert not model.clip_encoder.training  # still in eval mode: only its norms move


def test_authors_patch_embedding_init_is_normal_0_02():
    torch.manual_seed(0)
    normal = EEGEncoder(embed_dim=256, depth=1, num_heads=4, patch_embed_init="normal").patch_embed.proj.weight
    torch.manual_seed(0)
    xavier = EEGEncoder(embed_dim=256, depth=1, num_heads=4).patch_embed.proj.weight
    assert normal.std().item() == pytest.approx(0.02, rel=0.05)
    fan_in, fan_out = 128 * 4, 256
    assert xavier.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.05)


def test_pool_before_norm_is_the_authors_order():
    model = tiny_model(seed=4, global_pool=True, pool_before_norm=True)
    enc = model.conditioner.encoder
    eeg = tiny_batch(2)["eeg"]
    with torch.no_grad():
        features = enc(eeg, norm=False)
        expected = model.conditioner.dim_mapper(enc.norm(features.mean(1, keepdim=True)))
        assert torch.allclose(model.encode_eeg(eeg).context, expected, atol=1e-6)
        model.conditioner.pool_before_norm = False
        paper = model.conditioner.dim_mapper(enc.norm(features).mean(1, keepdim=True))
        assert torch.allclose(model.encode_eeg(eeg).context, paper, atol=1e-6)
        assert not torch.allclose(expected, paper, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The manifest


def _value(cfg, key):
    return OmegaConf.select(cfg, key)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_fidelity_authors_code_sets_every_authors_value_the_manifest_has(stage):
    cfg = STAGES[stage].build_config(overrides=["fidelity=authors_code"])
    for d in fidelity.DEVIATIONS:
        if stage in d.stages and d.key and d.authors_value is not fidelity.UNSET:
            assert fidelity._same(_value(cfg, d.key), d.authors_value), d.key
            assert not d.applies(cfg) or (d.paper_value is not fidelity.UNSET
                                          and not fidelity._same(d.paper_value, d.authors_value)), d.id


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_the_defaults_are_the_paper_where_it_speaks(stage):
    """The defaults follow the paper; where they follow the authors instead, the manifest says so."""
    cfg = STAGES[stage].build_config()
    for d in fidelity.DEVIATIONS:
        if stage not in d.stages or d.key is None or (d.when and not d.when(cfg)):
            continue
        value = _value(cfg, d.key)
        if d.default_source == "paper":
            assert fidelity._same(value, d.paper_value), (d.key, value)
        elif d.default_source == "authors":
            assert fidelity._same(value, d.authors_value), (d.key, value)
        else:
            assert d.default_source == "ours" and d.ours, d.id


def test_a_run_lists_the_deviations_of_its_own_config():
    paper = STAGES["stage1"].build_config()
    authors = STAGES["stage1"].build_config(overrides=["fidelity=authors_code"])
    line = "mask_ratio 0.75: paper 0.75, authors' code 0.1"
    assert any(d["line"].startswith(line) for d in deviations(paper))
    assert any(d["line"].startswith("mask_ratio 0.1: paper 0.75, authors' code 0.1") for d in deviations(authors))
    assert not any(d["id"] == "stage1_epochs" for d in deviations(paper))  # 500 = 500 = 500
    short = STAGES["stage1"].build_config(overrides=["epochs=20"])
    assert any(d["line"].startswith("epochs 20: paper 500, authors' code 500") for d in deviations(short))


def test_docs_method_md_holds_the_generated_table():
    text = (REPO_ROOT / "docs" / "method.md").read_text()
    start, end = text.index("<!-- deviations:start -->\n"), text.index("<!-- deviations:end -->")
    assert text[start + len("<!-- deviations:start -->\n"):end] == deviations_table(), \
        "regenerate the table: python -m dreamdiffusion.tools.docs"
