"""The frozen CLIP image encoder whose embeddings the EEG representation is aligned to (stage 2).

The paper uses OpenAI's CLIP ViT-L/14 (`openai/clip-vit-large-patch14`): the projected image
embedding (`image_embeds`, 768-d) of the image the subject saw. Loaded from a local transformers
folder (a full `CLIPModel` folder works: only its vision tower and projection are read); a hub id
is used only when the hub is reachable (HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import CLIPVisionModelWithProjection

from .errors import CheckpointError

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_DOWNLOAD_HINT = (
    "download the transformers folder of openai/clip-vit-large-patch14 (config.json + "
    "model.safetensors; `python code/download_weights.py --only clip` puts it at "
    "pretrains/clip-vit-large-patch14) or point `clip_path` at your copy; pretrains/README.md lists "
    "every file the project expects"
)


def _offline() -> bool:
    return any(os.environ.get(v, "0") not in ("0", "", "false", "False") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_clip_path(path: str | os.PathLike) -> str:
    """The path to hand to `from_pretrained`, or a CheckpointError saying what to download."""
    from .config import resolve_path

    text = str(path)
    local = resolve_path(text)
    if local is not None and (local / "config.json").is_file():
        return str(local)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not local.exists()
    if looks_like_hub_id and not _offline():
        return text
    raise CheckpointError(f"CLIP image encoder not found at {local} (no config.json there): {CLIP_DOWNLOAD_HINT}.")


def load_clip_image_encoder(path: str | os.PathLike = CLIP_HUB_ID) -> CLIPVisionModelWithProjection:
    """A frozen CLIP vision tower with its projection: eval mode, `requires_grad=False`.

    forward(pixel_values [B, 3, S, S] in CLIP's normalisation).image_embeds -> [B, projection_dim]
    """
    source = check_clip_path(path)
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            source, local_files_only=Path(source).exists(), output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:  # transformers raises RuntimeError on size mismatches
        raise CheckpointError(f"could not load the CLIP image encoder from {source}: {err}") from err
    # transformers only *reports* missing or re-initialised weights; a CLIP target with random
    # weights would silently make the alignment loss meaningless, so any of them is an error.
    # Unexpected keys are fine: a full CLIPModel folder also holds the text tower.
    bad = sorted(set(info.get("missing_keys", ())) | {str(k) for k in info.get("mismatched_keys", ())})
    if bad:
        raise CheckpointError(
            f"the CLIP image encoder in {source} lacks or has wrongly shaped weights for {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}: expected a complete CLIP ViT folder ({CLIP_DOWNLOAD_HINT})."
        )
    model.requires_grad_(False)
    return model.eval()
