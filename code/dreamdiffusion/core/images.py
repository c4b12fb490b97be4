"""Image conversions written once: the model's [-1, 1] tensors to the uint8 pixels saved and scored."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [-1, 1] -> uint8 numpy [..., H, W, 3] (channel last, as PIL and the authors'
    metrics take it): clamped, (x + 1) * 127.5, rounded to the nearest integer."""
    images = images.detach().float().cpu().clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).numpy()
