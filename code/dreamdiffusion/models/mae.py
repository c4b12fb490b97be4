"""Stage 1: the temporally masked autoencoder for EEG (MAE) and its encoder half.

An EEG window [B, C, T] is cut along time into L = T / patch_size tokens; each token holds the
`patch_size` consecutive samples of all C channels and is embedded by a Conv1d (kernel = stride =
patch_size). As in MAE (He et al. 2022), a random subset of tokens is hidden, the encoder sees only
the visible ones (plus a cls token), a lighter decoder fills in mask tokens and predicts the raw
samples of every token, and the loss is the MSE over the hidden tokens only.

Parameter names follow the authors' code (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.N.*` in timm's `Block` layout, `norm.*`), so their stage-1 checkpoints load unchanged:
`load_eeg_encoder` reads our export folder, our Lightning checkpoint or their
`torch.save({"model": ..., "config": ...})` file (`dreamdiffusion.models.original_formats`) without running any
pickled code. docs/method.md, "Stage 1", says what of the authors' model this follows.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.core.files import atomic_path, atomic_write_json
from dreamdiffusion.models import original_formats as original

# Encoder sizes. `large` is the paper's and the authors' code (Config_MBM_EEG). Note: with
# mlp_ratio 1.0 it has 151M parameters, not the 297M the paper quotes (that figure matches
# mlp_ratio 4.0); we follow the code. `small` stands for the ablation's 18.3M encoder, whose exact
# shape was never published: width 512 (head size 64, as in `large`), 12 blocks -> 19.2M.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 1.0},
    "small": {"embed_dim": 512, "depth": 12, "num_heads": 8, "mlp_ratio": 1.0},
}

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "dreamdiffusion.eeg_encoder.v1"
PATCH_EMBED_INITS = ("xavier", "normal")
# Head size assumed when neither a config nor the shapes say how many heads there are (it is the
# head size of both presets and of the authors' encoder: 1024 / 16).
_DEFAULT_HEAD_DIM = 64


def sincos_positions_1d(embed_dim: int, n_tokens: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 1-D sin-cos position embedding: [n_tokens (+1), embed_dim].

    Token i gets [sin(i * w_k), cos(i * w_k)] with w_k = 1 / 10000^(2k / embed_dim), k < embed_dim/2
    (MAE's `get_1d_sincos_pos_embed_from_grid`). With `cls_token`, row 0 is an all-zero slot for it.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for sin-cos positions, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.arange(n_tokens, dtype=np.float64)[:, None] * omega[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return torch.from_numpy(table).float()


class PatchEmbed1D(nn.Module):
    """[B, C, T] -> [B, T / patch_size, embed_dim]: one token per `patch_size` samples of all channels."""

    def __init__(self, n_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv1d(n_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, eeg: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(eeg), "b d l -> b l d")


def _vit_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    # torch's LayerNorm (eps 1e-5) as in the authors' code, not timm's default (eps 1e-6).
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)
    )


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class EEGEncoder(nn.Module):
    """The MAE's encoder: eeg [B, n_channels, n_times] -> tokens [B, n_times / patch_size, embed_dim].

    `forward` sees every token and does not prepend the cls token (the authors' `eeg_encoder`,
    which stage 2 consumes). The MAE uses `embed` and `forward_blocks` around its masking.
    `patch_embed_init` ("xavier" or the authors' "normal") is how a fresh encoder starts; it is not
    part of `config`, which describes the architecture.
    """

    def __init__(
        self,
        n_channels: int = 128,
        n_times: int = 512,
        patch_size: int = 4,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 1.0,
        patch_embed_init: str = "xavier",
    ):
        super().__init__()
        if patch_embed_init not in PATCH_EMBED_INITS:
            raise ValueError(f"patch_embed_init must be one of {PATCH_EMBED_INITS}, got {patch_embed_init!r}")
        if n_times % patch_size:
            raise ValueError(f"n_times ({n_times}) must be a multiple of patch_size ({patch_size})")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        self.config = {
            "n_channels": int(n_channels),
            "n_times": int(n_times),
            "patch_size": int(patch_size),
            "embed_dim": int(embed_dim),
            "depth": int(depth),
            "num_heads": int(num_heads),
            "mlp_ratio": float(mlp_ratio),
        }
        self.n_channels = n_channels
        self.n_times = n_times
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_patches = n_times // patch_size
        self.patch_embed = PatchEmbed1D(n_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos positions (row 0: the cls slot), saved with the weights as in the authors'
        # files. A parameter without gradient, as in MAE: select_trainable's "authors_code" set lets
        # stage 2 train it, as the authors' code does.
        self.pos_embed = nn.Parameter(sincos_positions_1d(embed_dim, self.num_patches)[None], requires_grad=False)
        # Unused: kept only because the authors' encoder-only module carries one, so that the key
        # set of our state dict is theirs. A buffer, so that it never trains.
        self.register_buffer("mask_token", torch.zeros(1, 1, embed_dim))
        self.blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights(patch_embed_init)

    def _init_weights(self, patch_embed_init: str) -> None:
        w = self.patch_embed.proj.weight.data
        if patch_embed_init == "xavier":
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over (channels x patch)
        else:  # the authors' _init_weights gives every Conv1d normal(0, 0.02), overriding xavier
            nn.init.normal_(w, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def embed(self, eeg: torch.Tensor) -> torch.Tensor:
        """eeg [B, C, T] -> [B, L, D] token embeddings plus positions 1..L (no cls token)."""
        if eeg.ndim != 3 or eeg.shape[1] != self.n_channels or eeg.shape[2] != self.n_times:
            raise ValueError(
                f"EEGEncoder expects eeg of shape [B, {self.n_channels}, {self.n_times}], got {tuple(eeg.shape)}"
            )
        return self.patch_embed(eeg) + self.pos_embed[:, 1:, :]

    def forward_blocks(self, tokens: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """[B, N, D] -> [B, N, D] through the transformer blocks and (unless norm=False) the final LayerNorm."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens) if norm else tokens

    def forward(self, eeg: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """eeg [B, C, T] -> tokens [B, L, D]; norm=False skips the final LayerNorm (for pooling first)."""
        return self.forward_blocks(self.embed(eeg), norm=norm)


class MaskedEEGAutoencoder(nn.Module):
    """MAE over time tokens of EEG. `forward(eeg)` -> {"loss", "pred" [B, L, p*C], "mask" [B, L]}.

    mask[b, i] = 1 where token i of sample b was hidden. pred holds, per token, the p time steps x C
    channels of that token in the order of `patchify` (time-major).
    """

    def __init__(
        self,
        n_channels: int = 128,
        n_times: int = 512,
        patch_size: int = 4,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 1.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        patch_embed_init: str = "xavier",
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = EEGEncoder(n_channels, n_times, patch_size, embed_dim, depth, num_heads, mlp_ratio,
                                  patch_embed_init)
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.n_channels = n_channels
        num_patches = self.encoder.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_positions_1d(decoder_embed_dim, num_patches)[None])
        # mlp_ratio of the decoder follows the encoder's, as in the authors' MAEforEEG.
        self.decoder_blocks = _vit_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * n_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_weights)

    # -- tokens <-> signal ------------------------------------------------------------------------

    def patchify(self, eeg: torch.Tensor) -> torch.Tensor:
        """eeg [B, C, T] -> [B, L, p*C]; token i, entry t*C + c = eeg[:, c, i*p + t]."""
        return rearrange(eeg, "b c (l p) -> b l (p c)", p=self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, p*C] -> eeg [B, C, L*p] (inverse of `patchify`)."""
        return rearrange(tokens, "b l (p c) -> b c (l p)", p=self.patch_size, c=self.n_channels)

    # -- the three parts of the MAE ---------------------------------------------------------------

    @staticmethod
    def random_masking(
        tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting noise [B, L]: the lowest int(L*(1-mask_ratio)) stay.

        Returns visible tokens [B, L_keep, D], mask [B, L] (1 = hidden) and ids_restore [B, L].
        """
        b, n_tokens, dim = tokens.shape
        n_keep = int(n_tokens * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, n_tokens, device=tokens.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(b, n_tokens, device=tokens.device)  # float32 even under autocast: it is counted
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(
        self, eeg: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """eeg [B, C, T] -> latent [B, 1 + L_keep, D] (cls first), mask [B, L], ids_restore [B, L]."""
        enc = self.encoder
        tokens = enc.embed(eeg)
        visible, mask, ids_restore = self.random_masking(tokens, mask_ratio, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(visible.shape[0], -1, -1)
        return enc.forward_blocks(torch.cat([cls, visible], dim=1)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + L_keep, D] -> pred [B, L, p*C] for every token (cls dropped)."""
        x = self.decoder_embed(latent)
        b, n_tokens = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n_tokens + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # visible first, then hidden: unshuffle
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, eeg: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per token, averaged over the hidden tokens only: eeg [B, C, T], pred [B, L, p*C], mask [B, L]."""
        per_token = ((pred.float() - self.patchify(eeg).float()) ** 2).mean(dim=-1)
        mask = mask.float()
        n_hidden = mask.sum()
        if n_hidden == 0:  # mask_ratio small enough that nothing is hidden: nothing to predict
            return (per_token * mask).sum()
        return (per_token * mask).sum() / n_hidden

    def forward(
        self, eeg: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """eeg [B, C, T] -> {"loss": scalar, "pred": [B, L, p*C], "mask": [B, L]}.

        `noise` [B, L] fixes which tokens are hidden (the lowest-noise ones stay visible).
        """
        latent, mask, ids_restore = self.forward_encoder(
            eeg, self.mask_ratio if mask_ratio is None else mask_ratio, noise
        )
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.forward_loss(eeg, pred, mask), "pred": pred, "mask": mask}


def build_mae(encoder: dict[str, Any], decoder: dict[str, Any], mask_ratio: float) -> MaskedEEGAutoencoder:
    """An MAE from the `encoder` and `decoder` groups of a stage-1 config (plain dicts)."""
    return MaskedEEGAutoencoder(**encoder, **decoder, mask_ratio=mask_ratio)


def build_encoder(encoder: dict[str, Any]) -> EEGEncoder:
    """A fresh `EEGEncoder` from the `encoder` group of a stage config (a plain dict)."""
    return EEGEncoder(**encoder)


# -------------------------------------------------------------------------------------------------
# Saving and loading the encoder


def save_eeg_encoder(encoder: EEGEncoder, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/model.safetensors` + `out_dir/config.json` (atomically); return `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(out_dir / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT})
    atomic_write_json(out_dir / EXPORT_CONFIG, {"format": EXPORT_FORMAT, **encoder.config})
    return out_dir


def _infer_sizes(state_dict: dict[str, torch.Tensor], attrs: dict[str, Any], where: str) -> dict[str, Any]:
    """Encoder sizes from config attributes (our names) where given, else from the tensor shapes."""
    try:
        proj = state_dict["patch_embed.proj.weight"]  # [embed_dim, n_channels, patch_size]
        pos = state_dict["pos_embed"]  # [1, 1 + L, embed_dim]
        fc1 = state_dict["blocks.0.mlp.fc1.weight"]  # [hidden, embed_dim]
    except KeyError as err:
        raise CheckpointError(f"{where} has no EEG encoder weights: key {err} is missing") from err
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    sizes: dict[str, Any] = {
        "n_channels": int(proj.shape[1]),
        "patch_size": int(proj.shape[2]),
        "embed_dim": int(proj.shape[0]),
        "depth": depth,
        "mlp_ratio": fc1.shape[0] / proj.shape[0],
        "n_times": int((pos.shape[1] - 1) * proj.shape[2]),
    }
    for name in ("n_channels", "patch_size", "embed_dim", "depth", "n_times", "mlp_ratio"):
        if attrs.get(name) is not None:
            sizes[name] = float(attrs[name]) if name == "mlp_ratio" else int(attrs[name])
    if attrs.get("num_heads") is not None:
        sizes["num_heads"] = int(attrs["num_heads"])
    else:
        sizes["num_heads"] = max(1, sizes["embed_dim"] // _DEFAULT_HEAD_DIM)
        warnings.warn(
            f"{where} does not say how many attention heads its encoder has (the shapes cannot); "
            f"assuming {sizes['num_heads']} (head size {_DEFAULT_HEAD_DIM}, as in the authors' encoder)",
            stacklevel=3,
        )
    return sizes


def _key_problems(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    return ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {unexpected}"] if unexpected else []) \
        + ([f"shape mismatches {wrong_shape}"] if wrong_shape else [])


def eeg_encoder_from_state_dict(
    state_dict: dict[str, torch.Tensor], config_attrs: dict[str, Any] | None = None, where: str = "state dict"
) -> EEGEncoder:
    """An `EEGEncoder` (eval mode) holding the encoder weights of `state_dict` (keys WITHOUT prefix).

    Sizes come from `config_attrs` (our argument names: embed_dim, depth, num_heads, patch_size,
    mlp_ratio, n_times, n_channels) where present, else from the tensor shapes. Decoder keys
    (`decoder_*`) and `mask_token` are dropped (the MAE's mask token lives in the decoder's width).
    Any other missing or unexpected key, or a shape that does not match, raises `CheckpointError`.
    """
    attrs = dict(config_attrs or {})
    weights = {
        k: v for k, v in state_dict.items() if not k.startswith("decoder_") and k != "mask_token"
    }
    sizes = _infer_sizes(weights, attrs, where)
    try:
        encoder = EEGEncoder(**sizes)
    except ValueError as err:
        raise CheckpointError(f"{where}: encoder sizes {sizes} are inconsistent: {err}") from err
    expected = {k: v for k, v in encoder.state_dict().items() if k != "mask_token"}
    problems = _key_problems(expected, weights)
    if problems:
        raise CheckpointError(
            f"{where} does not match an EEG encoder of sizes {sizes}: " + "; ".join(problems)
        )
    full = {k: v.float() for k, v in weights.items()}
    full["mask_token"] = encoder.mask_token
    encoder.load_state_dict(full, strict=True)
    return encoder.eval()


def _load_export_folder(path: Path) -> EEGEncoder:
    weights_file, config_file = path / EXPORT_WEIGHTS, path / EXPORT_CONFIG
    for f in (weights_file, config_file):
        if not f.is_file():
            raise CheckpointError(
                f"EEG encoder folder {path} lacks {f.name} (expected {EXPORT_WEIGHTS} + {EXPORT_CONFIG})"
            )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.pop("format", None) != EXPORT_FORMAT:
        raise CheckpointError(f"{config_file} is not an EEG encoder export (format {EXPORT_FORMAT!r} expected)")
    try:
        encoder = EEGEncoder(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file} holds invalid encoder sizes {config}: {err}") from err
    try:
        state = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise CheckpointError(f"{weights_file} could not be read as safetensors: {err}") from err
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_file} does not match {config_file}: {err}") from err
    return encoder.eval()


def load_eeg_encoder(path: str | os.PathLike) -> EEGEncoder:
    """An `EEGEncoder` in eval mode from one of:

    - our export folder (`model.safetensors` + `config.json`, written by `save_eeg_encoder`);
    - an authors' stage-1 checkpoint `{"model": state_dict, "optimizer", "epoch", "config":
      <config.Config_MBM_EEG>}` (read without executing pickled code);
    - our stage-1 Lightning checkpoint (`checkpoints/last.ckpt`);
    - a `.safetensors` file of encoder weights.
    """

    path = Path(path)
    if path.is_dir():
        return _load_export_folder(path)
    if not path.is_file():
        raise CheckpointError(f"EEG encoder not found: {path} (expected an export folder or a checkpoint file)")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} could not be read as safetensors: {err}") from err
        return eeg_encoder_from_state_dict(state, None, where=str(path))
    weights, attrs = original.read_stage1_checkpoint(path)
    return eeg_encoder_from_state_dict(weights, attrs, where=str(path))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
