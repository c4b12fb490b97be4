"""The frozen image encoders EEG is aligned to (stage 2) and images are compared in (stage 3).

The paper uses OpenAI's CLIP ViT-L/14 (`openai/clip-vit-large-patch14`): the projected image
embedding (`image_embeds`, 768-d) of the image the subject saw. THINGS-EEG work uses OpenCLIP
ViT-H/14 instead. Both are wrapped as an `ImageEmbedder`, which carries its library's own
preprocessing, so the tensors fed to it are exactly what the library would make of the image:

    spec                                  loaded by                     preprocessing
    a transformers CLIP folder            CLIPVisionModelWithProjection  the classic PIL processor
      (a full CLIPModel folder works)                                    (`clip_pil_processor_class`)
    "open_clip:<model name>" + weights    open_clip.create_model_and_transforms   its `preprocess`

A hub id is used only when the hub is reachable (HF_HUB_OFFLINE unset, `core.compat.is_offline_mode`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPTokenizer, CLIPTokenizerFast, CLIPVisionModelWithProjection

from dreamdiffusion.core.compat import TRANSFORMERS_V5, is_offline_mode
from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.extras import OPEN_CLIP_PREFIX, require_extra

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
# openai/clip-vit-large-patch14's vision tower and projection (transformers CLIPVisionConfig), for
# random-weight stand-ins at the real size (benchmarks, the rehearsal, the parameter-count test).
CLIP_VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
CLIP_DOWNLOAD_HINT = (
    "download the transformers folder of openai/clip-vit-large-patch14 (config.json + "
    "model.safetensors; `python code/download_weights.py --only clip` puts it at "
    "pretrains/clip-vit-large-patch14) or point `clip_path` at your copy; pretrains/README.md lists "
    "every file the project expects"
)

logger = logging.getLogger(__name__)


class ImageEmbedder(nn.Module):
    """A frozen image tower with its own preprocessing.

    `preprocess(image)`: a PIL image -> float [3, S, S], as its library prepares it.
    `forward(pixel_values [B, 3, S, S])` -> projected image embeddings [B, projection_dim] (not
    normalised; stage 2 aligns to these). `embed(images)`: PIL images -> L2-normalised [N, D].
    """

    def __init__(self, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor], projection_dim: int,
                 image_size: int, name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self._preprocess = preprocess
        self.projection_dim = int(projection_dim)
        self.image_size = int(image_size)
        self.name = name
        self.eval()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image.convert("RGB"))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> ImageEmbedder:
        return super().train(False)  # frozen networks never leave eval mode

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        param = next(self.parameters())
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(img) for img in images[start:start + batch_size]])
            out.append(F.normalize(self(pixels.to(param.device, param.dtype)).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.projection_dim)


class TransformersCLIP(ImageEmbedder):
    """transformers' CLIPVisionModelWithProjection; `forward` returns its `image_embeds`."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds

    @classmethod
    def from_model(cls, model: nn.Module, name: str = "transformers CLIP") -> TransformersCLIP:
        size = model.config.image_size
        return cls(model, ProcessorTransform(size), model.config.projection_dim, size, name)


class OpenCLIPImage(ImageEmbedder):
    """An OpenCLIP model's image tower; `forward` returns `encode_image` (projected)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class ProcessorTransform:
    """A PIL image -> float [3, size, size] through `clip_image_processor(size)` (picklable, so
    DataLoader workers can use it)."""

    def __init__(self, size: int = 224):
        self.size = int(size)
        self.processor = clip_image_processor(self.size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # A PIL image is channels-last; told so, transformers 4.x does not guess channels-first for
        # an image 1 or 3 pixels high.
        return self.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"][0]

    def __repr__(self) -> str:  # stable across runs: part of the stage-2 CLIP cache's key
        return f"ProcessorTransform({self.size}, {type(self.processor).__name__})"


def clip_pil_processor_class() -> type:
    """transformers' classic CLIP image processor, which works on PIL images: `CLIPImageProcessor` in
    4.x, `CLIPImageProcessorPil` in 5.x (where `CLIPImageProcessor` is the torchvision one)."""
    if not TRANSFORMERS_V5:
        return CLIPImageProcessor
    # imported here, not at the top - the PIL processor's module exists in transformers v5 only
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil


def clip_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]], max_length: int):
    """CLIP's byte-level BPE tokenizer (the `tokenizers` one) from an in-memory vocabulary and merges:
    transformers 5.x builds it from them, 4.x reads them as `vocab.json` + `merges.txt` (same ids)."""
    if TRANSFORMERS_V5:
        return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizerFast.from_pretrained(folder, model_max_length=max_length)


def clip_image_processor(size: int = 224):
    """OpenAI CLIP's preprocessing at `size`: bicubic resize of the shortest side (PIL, 8-bit), centre
    crop, OpenAI mean/std (`clip_pil_processor_class`)."""
    return clip_pil_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def check_clip_path(path: str | os.PathLike) -> str:
    """The path to hand to `from_pretrained`, or a CheckpointError saying what to download."""
    text = str(path)
    local = Path(text)
    if (local / "config.json").is_file():
        return str(local)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not local.exists()
    if looks_like_hub_id and not is_offline_mode():
        return text
    raise CheckpointError(f"CLIP image encoder not found at {local} (no config.json there): {CLIP_DOWNLOAD_HINT}.")


def load_clip_image_encoder(path: str | os.PathLike = CLIP_HUB_ID, weights: str | os.PathLike | None = None
                            ) -> ImageEmbedder:
    """A frozen image embedder (eval mode, `requires_grad=False`) from a transformers CLIP folder (or
    hub id), or from "open_clip:<model name>" with its weights file."""
    if str(path).startswith(OPEN_CLIP_PREFIX):
        return load_open_clip(str(path)[len(OPEN_CLIP_PREFIX):], weights)

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
    # transformers' own loading report (a table of these keys) is captured by core/logs.py: one line here.
    unused = info.get("unexpected_keys", ())
    if unused:
        towers = sorted({k.split(".")[0] for k in unused})
        logger.info("CLIP image encoder from %s (%d weights of %s not used)", source, len(unused), ", ".join(towers))
    return TransformersCLIP.from_model(model, name=f"transformers CLIP {source}")


def load_open_clip(model_name: str, weights: str | os.PathLike | None,
                   model_config: str | os.PathLike | None = None) -> OpenCLIPImage:
    """An OpenCLIP model (e.g. "ViT-H-14", THINGS-EEG's usual image encoder) from a local weights file,
    with OpenCLIP's own eval preprocessing. `model_config`: a json of an architecture OpenCLIP does not
    ship (registered with `open_clip.add_model_config`)."""
    require_extra("openclip", f"clip_path={OPEN_CLIP_PREFIX}{model_name}")
    import open_clip  # imported here, not at the top - OpenCLIP is optional (the openclip extra, only for `open_clip:` targets)

    if model_config is not None:
        open_clip.add_model_config(str(model_config))
    if model_name not in open_clip.list_models():
        raise ConfigError(f"OpenCLIP has no model '{model_name}' (e.g. ViT-H-14, ViT-L-14, ViT-B-32)")
    if weights is None or not Path(weights).is_file():
        raise CheckpointError(f"OpenCLIP '{model_name}' needs its weights file (clip_weights), not found: {weights}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
    except (RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"could not load OpenCLIP '{model_name}' from {weights}: {err}") from err
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    embed_dim = open_clip.get_model_config(model_name)["embed_dim"]
    return OpenCLIPImage(model, preprocess, embed_dim, size, f"OpenCLIP {model_name} ({weights})")
