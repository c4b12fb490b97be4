"""Optional features and the extra of `pyproject.toml` that installs each.

The core install is what every stage needs; a feature only some runs use comes with an extra:

    extra      installs                 needed by
    wandb      wandb                    wandb.enabled=true (stages 1 and 2)
    fid        torch-fidelity           FID/IS/KID with fid_feature_weights (stage 3)
    openclip   open_clip_torch          clip_path="open_clip:<model name>" (stages 2 and 3)
    moabb      moabb, mne               building the stage-1 corpus from MOABB (prepare_pretrain_data.py)

A run that asks for a feature whose extra is missing stops with one sentence naming the extra
(`ConfigError`, exit 2): the stage scripts check their config with `check_extras` before any work,
and each feature's code calls `require_extra` before it imports the package (for library users).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from dreamdiffusion.core.errors import ConfigError

# extra -> the top-level modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "wandb": ("wandb",),
    "fid": ("torch_fidelity",),
    "openclip": ("open_clip",),
    "moabb": ("moabb", "mne"),
}
# A clip_path of this form names an OpenCLIP model (models/clip_embedder.py)
OPEN_CLIP_PREFIX = "open_clip:"


def installed(module: str) -> bool:
    """Whether a top-level module can be imported (found without importing it; a `None` entry in
    `sys.modules`, as tests use to hide a package, counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a __spec__
        return False


def require_extra(extra: str, feature: str) -> None:
    """A ConfigError naming `pip install 'dreamdiffusion[<extra>]'` when a module of `extra` is missing."""
    missing = [m for m in EXTRAS[extra] if not installed(m)]
    if missing:
        raise ConfigError(f"{feature} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: pip install 'dreamdiffusion[{extra}]' (or pip install -e '.[{extra}]' "
                          "in a checkout)")


def features_in_config(cfg: Any) -> list[tuple[str, str]]:
    """(extra, feature) for each optional feature a stage config turns on."""
    wanted = []
    if cfg.get("wandb") is not None and cfg.wandb.enabled:
        wanted.append(("wandb", "wandb.enabled=true"))
    clip_path = cfg.get("clip_path")
    if clip_path is not None and str(clip_path).startswith(OPEN_CLIP_PREFIX):
        wanted.append(("openclip", f"clip_path={clip_path}"))
    if cfg.get("fid_feature_weights") is not None and "fid" in cfg.get("metrics", ()):
        wanted.append(("fid", "fid_feature_weights (FID/IS/KID)"))
    return wanted


def check_extras(cfg: Any) -> None:
    """Before any work: a ConfigError for the first feature `cfg` turns on whose extra is missing."""
    for extra, feature in features_in_config(cfg):
        require_extra(extra, feature)
