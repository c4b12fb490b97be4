"""Which torch device a `device=` setting names."""

from __future__ import annotations

import torch

from dreamdiffusion.core.errors import ConfigError


def resolve_device(name: str, what: str = "device") -> torch.device:
    """`auto` (a GPU when there is one), `cpu`, `cuda`, `cuda:N`; a ConfigError naming `what` otherwise,
    or when a GPU is asked for and torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N, got '{name}'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={name} but no CUDA GPU is available (use auto or cpu)")
    return device
