"""The EEG MAE (stage 1 model) and loading encoders: ours and the authors' checkpoint format."""

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.models.mae import (
    ENCODER_PRESETS,
    EEGEncoder,
    MaskedEEGAutoencoder,
    count_parameters,
    eeg_encoder_from_state_dict,
    save_eeg_encoder,
)

TINY = dict(n_channels=8, n_times=64, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.0)
TINY_DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(mask_ratio=0.75, **overrides):
    torch.manual_seed(0)
    return MaskedEEGAutoencoder(**{**TINY, **overrides}, **TINY_DECODER, mask_ratio=mask_ratio)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.1, 0.25])
def test_exact_number_of_hidden_tokens_per_sample(mask_ratio):
    model = tiny_mae(mask_ratio, n_times=512)  # L = 128 tokens, as in the paper
    n_tokens = 128
    out = model(torch.randn(6, 8, 512))
    expected = n_tokens - int(n_tokens * (1 - mask_ratio))  # 96 at 0.75, 13 at 0.1
    assert out["mask"].shape == (6, n_tokens)
    assert out["mask"].sum(dim=1).tolist() == [expected] * 6
    assert len({tuple(m.tolist()) for m in out["mask"]}) == 6  # each sample draws its own mask


def test_loss_ignores_targets_of_visible_tokens():
    model = tiny_mae(0.5).eval()
    eeg = torch.randn(3, 8, 64)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        out = model(eeg, noise=noise)
    pred, mask = out["pred"], out["mask"]
    p = model.patch_size
    visible_b, visible_i = (mask == 0).nonzero()[0].tolist()
    hidden_b, hidden_i = (mask == 1).nonzero()[0].tolist()

    changed_visible = eeg.clone()
    changed_visible[visible_b, :, visible_i * p:(visible_i + 1) * p] += 100.0
    changed_hidden = eeg.clone()
    changed_hidden[hidden_b, :, hidden_i * p:(hidden_i + 1) * p] += 100.0

    loss = model.forward_loss(eeg, pred, mask)
    assert torch.equal(model.forward_loss(changed_visible, pred, mask), loss)
    assert model.forward_loss(changed_hidden, pred, mask) > loss + 1.0
    # The value: mean over hidden tokens of the per-token MSE.
    per_token = ((pred - model.patchify(eeg)) ** 2).mean(-1)
    assert torch.allclose(loss, per_token[mask.bool()].mean())


def test_noise_decides_which_tokens_are_hidden():
    model = tiny_mae(0.75)
    noise = torch.rand(2, 16)
    out = model(torch.randn(2, 8, 64), noise=noise)
    kept = noise.argsort(dim=1)[:, :4]  # int(16 * 0.25) = 4 lowest-noise tokens stay visible
    for b in range(2):
        assert set((out["mask"][b] == 0).nonzero().flatten().tolist()) == set(kept[b].tolist())


def test_patchify_round_trip_and_token_order():
    model = tiny_mae()
    eeg = torch.randn(2, 8, 64)
    tokens = model.patchify(eeg)
    assert tokens.shape == (2, 16, 4 * 8)
    # token i, entry t * C + c = sample i * p + t of channel c (the 4 time steps x all channels)
    assert tokens[1, 5, 2 * 8 + 3] == eeg[1, 3, 5 * 4 + 2]
    assert torch.equal(model.unpatchify(tokens), eeg)


def test_encoder_forward_has_no_cls_token_and_presets_have_their_sizes():
    encoder = EEGEncoder(**TINY)
    assert encoder(torch.randn(2, 8, 64)).shape == (2, 16, 32)
    assert encoder.num_patches == 16 and encoder.embed_dim == 32 and encoder.config == TINY
    assert ENCODER_PRESETS["large"] == {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 1.0}
    small = EEGEncoder(**ENCODER_PRESETS["small"])
    assert 17e6 < count_parameters(small) < 20e6  # the ablation's "small" encoder: 18.3M
    names = set(small.state_dict())
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.weight",
            "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias"} <= names
    with pytest.raises(ValueError, match="expects eeg of shape"):
        encoder(torch.randn(2, 7, 64))


def _structured_corpus(folder, n_files=64, n_channels=8, seed=0):
    """Channels share one of three slow rhythms with per-channel phase; a little noise."""
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        n_times = int(rng.integers(96, 200))
        t = np.arange(n_times) / 64
        freq = rng.integers(1, 4)
        phase = rng.uniform(0, 2 * np.pi, (n_channels, 1))
        eeg = np.sin(2 * np.pi * freq * t + phase) + 0.05 * rng.standard_normal((n_channels, n_times))
        np.save(folder / f"rec_{i:03d}.npy", eeg.astype(np.float32))


def test_tiny_mae_learns_a_structured_corpus(tmp_path):
    from dreamdiffusion.dataset import EEGPretrainDataset

    _structured_corpus(tmp_path)
    dataset = EEGPretrainDataset(tmp_path, n_channels=8, n_times=64, scale=1.0)
    torch.manual_seed(0)
    model = MaskedEEGAutoencoder(**{**TINY, "embed_dim": 64}, decoder_embed_dim=32, decoder_depth=1,
                                 decoder_num_heads=2, mask_ratio=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    # 8 random crops of every file, read once (the file reading is not what is tested).
    windows = torch.cat([batch["eeg"] for _ in range(8) for batch in DataLoader(dataset, batch_size=64)])
    losses = []
    for _ in range(400):
        loss = model(windows[torch.randint(0, len(windows), (32,))])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    # 0.5 is what predicting zero scores on these unit sine waves: the model must beat it clearly.
    assert last < 0.35 and last < 0.3 * first, (first, last)


# -------------------------------------------------------------------------------------------------
# Loading encoders


def _authors_state_dict(dim=32, depth=2, n_channels=8, patch=4, n_tokens=16, dec_dim=16, seed=0):
    """Random weights under the authors' MAEforEEG key names (encoder and decoder)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, n_tokens + 1, dim), "mask_token": r(1, 1, dec_dim),
          "patch_embed.proj.weight": r(dim, n_channels, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for prefix, width, n_blocks in (("blocks", dim, depth), ("decoder_blocks", dec_dim, 1)):
        for i in range(n_blocks):
            b = f"{prefix}.{i}."
            sd.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                       b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                       b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                       b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                       b + "mlp.fc1.weight": r(width, width), b + "mlp.fc1.bias": r(width),
                       b + "mlp.fc2.weight": r(width, width), b + "mlp.fc2.bias": r(width)})
    sd.update({"decoder_embed.weight": r(dec_dim, dim), "decoder_embed.bias": r(dec_dim),
               "decoder_pos_embed": r(1, n_tokens + 1, dec_dim), "decoder_norm.weight": r(dec_dim),
               "decoder_norm.bias": r(dec_dim), "decoder_pred.weight": r(patch * n_channels, dec_dim),
               "decoder_pred.bias": r(patch * n_channels)})
    return sd


def _reference_encoder(sd, eeg, depth, num_heads):
    """The authors' eeg_encoder forward written out: patches + positions 1..L, blocks, final norm."""
    x = F.conv1d(eeg, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:]
    b, n, d = x.shape
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / (d // num_heads) ** 0.5).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-5)


def _save_authors_checkpoint(path, sd, config_attrs):
    """torch.save as the authors do, with an object of `config.Config_MBM_EEG`, then forget `config`."""
    fake = types.ModuleType("config")

    class Config_MBM_EEG:  # noqa: N801 - the authors' class name
        pass

    Config_MBM_EEG.__module__, Config_MBM_EEG.__qualname__ = "config", "Config_MBM_EEG"
    fake.Config_MBM_EEG = Config_MBM_EEG
    sys.modules["config"] = fake
    try:
        cfg = Config_MBM_EEG()
        cfg.__dict__.update(config_attrs)
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        torch.save({"model": sd, "optimizer": optimizer.state_dict(), "epoch": 499, "config": cfg}, path)
    finally:
        del sys.modules["config"]


def test_authors_checkpoint_loads_and_matches_reference_forward(tmp_path):
    from dreamdiffusion import load_eeg_encoder

    sd = _authors_state_dict()
    path = tmp_path / "checkpoint.pth"
    # num_heads 4 cannot be read off the shapes (the fallback would say 32 // 64 -> 1): the config decides.
    _save_authors_checkpoint(path, sd, {"embed_dim": 32, "depth": 2, "num_heads": 4, "patch_size": 4,
                                        "mlp_ratio": 1.0, "mask_ratio": 0.1, "lr": 2.5e-4,
                                        "output_path": "/data/results"})
    assert "config" not in sys.modules
    encoder = load_eeg_encoder(path)
    assert not encoder.training
    assert encoder.config == {**TINY, "num_heads": 4}
    eeg = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = encoder(eeg)
    assert out.shape == (3, 16, 32)
    assert torch.allclose(out, _reference_encoder(sd, eeg, depth=2, num_heads=4), atol=1e-5)


def test_authors_checkpoint_without_config_sizes_from_shapes(tmp_path):
    from dreamdiffusion import load_eeg_encoder

    sd = _authors_state_dict(dim=128, depth=1)  # 128 / 64 = 2 heads assumed
    path = tmp_path / "checkpoint.pth"
    _save_authors_checkpoint(path, sd, {})
    with pytest.warns(UserWarning, match="assuming 2"):
        encoder = load_eeg_encoder(path)
    assert encoder.config == {**TINY, "embed_dim": 128, "depth": 1, "num_heads": 2}
    eeg = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(eeg), _reference_encoder(sd, eeg, depth=1, num_heads=2), atol=1e-5)


_CALLED = []


def _would_run(marker):
    _CALLED.append(marker)
    return marker


class _Payload:
    def __reduce__(self):
        return (_would_run, ("ran",))


def test_checkpoint_whose_pickle_calls_a_function_is_refused(tmp_path):
    from dreamdiffusion import load_eeg_encoder

    path = tmp_path / "evil.pth"
    torch.save({"model": _authors_state_dict(), "config": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refus"):
        load_eeg_encoder(path)
    assert _CALLED == []


def test_wrong_keys_and_shapes_are_listed():
    sd = _authors_state_dict()
    attrs = {"num_heads": 4}
    extra = {**sd, "head.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \['head.weight'\]"):
        eeg_encoder_from_state_dict(extra, attrs)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.attn.proj.bias'\]"):
        eeg_encoder_from_state_dict(missing, attrs)
    wrong = {**sd, "norm.bias": torch.zeros(31)}
    with pytest.raises(CheckpointError, match="norm.bias: file"):
        eeg_encoder_from_state_dict(wrong, attrs)
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.2.attn.proj.bias'"):
        eeg_encoder_from_state_dict(sd, {"num_heads": 4, "depth": 3})  # the config says 3 blocks, the file 2
    with pytest.raises(CheckpointError, match="shape mismatches"):
        eeg_encoder_from_state_dict(sd, {"num_heads": 4, "embed_dim": 64})


def test_export_round_trip(tmp_path):
    from dreamdiffusion import load_eeg_encoder

    torch.manual_seed(0)
    encoder = EEGEncoder(**TINY)
    save_eeg_encoder(encoder, tmp_path / "eeg_encoder")
    assert sorted(p.name for p in (tmp_path / "eeg_encoder").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_eeg_encoder(tmp_path / "eeg_encoder")
    eeg = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.equal(loaded(eeg), encoder.eval()(eeg))
    with pytest.raises(CheckpointError, match="lacks config.json"):
        (tmp_path / "eeg_encoder" / "config.json").unlink()
        load_eeg_encoder(tmp_path / "eeg_encoder")
