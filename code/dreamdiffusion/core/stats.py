"""Pearson's r, written once. Each function correlates rows (an image's pixels, a network's features,
a channel's samples) and gives 0 for a constant row, where r is undefined.

Three forms, because their callers need them and each keeps the numbers it has always produced:
per pair of rows (`pearson_r`: the pixel metrics), every row of one set against every row of another
(`pearson_r_all_pairs`, from `unit_rows`: two-way identification and the correlation distance), and
on the training device in float32 (`pearson_r_torch`: stage 1's reconstruction monitor).
"""

from __future__ import annotations

import numpy as np
import torch


def pearson_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each pair of rows of `a` and `b` ([N, D] each, any numeric dtype): float64 [N]."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a**2).sum(axis=1) * (b**2).sum(axis=1))
    return np.divide((a * b).sum(axis=1), denom, out=np.zeros(len(a)), where=denom > 0)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """[N, D] -> float64 [N, D], each row centred and scaled to length 1 (a constant row stays 0):
    the dot product of two such rows is their Pearson r."""
    x = x.astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def pearson_r_all_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """r[i, j] = Pearson r of a[i] and b[j], for a [M, D] and b [N, D]: float64 [M, N]."""
    return unit_rows(a) @ unit_rows(b).T


def pearson_r_torch(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson r along the last axis of two same-shape tensors, in float32 on their device: [...].

    `eps` is added to the product of the norms (a constant row gives 0 without a division by zero)."""
    x = x.float() - x.float().mean(-1, keepdim=True)
    y = y.float() - y.float().mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + eps)
