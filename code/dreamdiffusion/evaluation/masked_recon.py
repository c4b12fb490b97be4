"""Does the MAE learn? Its reconstruction of the hidden samples against the obvious baseline.

Stage 1's loss falls whatever the MAE learns about EEG: predicting the mean, or smoothing across a
gap, already lowers it. What says the encoder has learnt structure is a reconstruction of the hidden
samples that beats what the visible samples give for free - here, linear interpolation in time across
each hidden stretch from the nearest visible samples (a hidden stretch at an edge holds the nearest
visible value). Both are scored by the Pearson correlation with the input over the hidden samples only,
per (window, channel), averaged; stage 1 logs them as `masked_corr` and `interp_corr` in metrics.csv.
"""

from __future__ import annotations

import torch


def hidden_samples(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The MAE's token mask [B, L] (1 = hidden) -> a bool mask over time [B, L * patch_size]."""
    return mask.bool().repeat_interleave(patch_size, dim=1)


def interpolate_hidden(eeg: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """eeg [B, C, T] with its hidden samples [B, T] (bool) replaced by linear interpolation between the
    nearest visible samples before and after (the nearest one alone at an edge); a window with no visible
    sample becomes zeros."""
    b, _, t = eeg.shape
    time = torch.arange(t, device=eeg.device).expand(b, t)
    visible = ~hidden
    # the last visible index at or before t, and the first at or after t (-1 / t where there is none)
    before = torch.where(visible, time, torch.full_like(time, -1)).cummax(dim=1).values
    after = torch.where(visible, time, torch.full_like(time, t)).flip(1).cummin(dim=1).values.flip(1)
    before_ok, after_ok = before >= 0, after < t
    left = torch.where(before_ok, before, after).clamp(0, t - 1)
    right = torch.where(after_ok, after, before).clamp(0, t - 1)
    span = (right - left).clamp(min=1).float()
    weight = torch.where(before_ok & after_ok, (time - left).float() / span, torch.zeros_like(span))
    at_left, at_right = (eeg.gather(2, index[:, None, :].expand_as(eeg)) for index in (left, right))
    out = (1 - weight[:, None, :]) * at_left + weight[:, None, :] * at_right
    return torch.where(visible.any(1)[:, None, None], out, torch.zeros_like(out))


def masked_correlation(prediction: torch.Tensor, eeg: torch.Tensor, hidden: torch.Tensor, eps: float = 1e-8
                       ) -> torch.Tensor:
    """Mean Pearson r over the hidden samples between `prediction` and `eeg` ([B, C, T] each; hidden [B, T]),
    per (window, channel), averaged over those with at least two hidden samples (a scalar, float32)."""
    w = hidden[:, None, :].float()
    n = w.sum(-1, keepdim=True).clamp(min=1)
    x = prediction.float() - (prediction.float() * w).sum(-1, keepdim=True) / n
    y = eeg.float() - (eeg.float() * w).sum(-1, keepdim=True) / n
    r = (w * x * y).sum(-1) / ((w * x * x).sum(-1).sqrt() * (w * y * y).sum(-1).sqrt() + eps)  # [B, C]
    counted = (hidden.sum(-1) >= 2)[:, None].expand_as(r)
    return r[counted].mean() if counted.any() else r.new_zeros(())
