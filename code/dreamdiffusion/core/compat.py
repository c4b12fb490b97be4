"""Where the oldest and newest supported library versions differ, decided in one place.

pyproject.toml's lower bounds are tested (`make test-oldest` installs exactly them); the few APIs that
changed between those floors and the newest releases are switched here, by the installed version read
from package metadata (nothing is imported to decide):

    transformers 4.x / 5.x   the PIL CLIP image processor is `CLIPImageProcessor` / `CLIPImageProcessorPil`
                             (5.x's `CLIPImageProcessor` is the torchvision one);
                             a CLIP tokenizer is built from an in-memory vocabulary in 5.x only
                             (both switched in models/clip_embedder.py on `TRANSFORMERS_V5`)
    pytorch-lightning 2.6    `Trainer.fit(weights_only=...)`; older releases have no such argument
    huggingface_hub 1.x      `is_offline_mode()`; 0.x reads the HF_HUB_OFFLINE constant
    scipy 1.15               `bootstrap(rng=...)`; older releases call it `random_state`
"""

from __future__ import annotations

import re
from importlib.metadata import version

import huggingface_hub
from huggingface_hub import constants as hub_constants


def release(distribution: str) -> tuple[int, int]:
    """(major, minor) of an installed distribution, e.g. (4, 44) for transformers 4.44.0."""
    major, minor = re.match(r"(\d+)\.(\d+)", version(distribution)).groups()
    return int(major), int(minor)


TRANSFORMERS_V5 = release("transformers") >= (5, 0)

# Keyword arguments of `Trainer.fit` that make a resume load tensors and plain data only. Before
# Lightning 2.6 `fit` takes no `weights_only`; the resume file is then checked with
# `torch.load(weights_only=True)` before `fit` reads it (train/lightning.py, check_resume_checkpoint),
# so nothing pickled is run on either end.
FIT_WEIGHTS_ONLY: dict[str, bool] = {"weights_only": True} if release("pytorch-lightning") >= (2, 6) else {}

# The name of the random generator argument of scipy's resampling (`scipy.stats.bootstrap`): scipy 1.15
# renamed `random_state` to `rng` (both take a numpy Generator, drawn from the same way).
SCIPY_RNG = "rng" if release("scipy") >= (1, 15) else "random_state"


def is_offline_mode() -> bool:
    """Whether the Hugging Face hub must not be contacted (HF_HUB_OFFLINE=1)."""
    if hasattr(huggingface_hub, "is_offline_mode"):
        return huggingface_hub.is_offline_mode()
    return bool(hub_constants.HF_HUB_OFFLINE)
