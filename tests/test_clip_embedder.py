"""The frozen CLIP target loads strictly: incomplete weights are an error, never a random init."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.models.clip_embedder import clip_pil_processor_class, load_clip_image_encoder

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=16)


def test_loads_frozen_and_in_eval_mode(tmp_path):
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path)
    model = load_clip_image_encoder(tmp_path)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_a_missing_projection_is_an_error_not_a_random_init(tmp_path):
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="visual_projection"):
        load_clip_image_encoder(tmp_path)


def test_a_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(CheckpointError, match="clip-vit-large-patch14"):
        load_clip_image_encoder(tmp_path / "absent")


def test_transformers_clip_uses_clips_own_processor(tmp_path):
    from PIL import Image

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    embedder = load_clip_image_encoder(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 30, 3), dtype=np.uint8))
    pixels = clip_pil_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(embedder.preprocess(image), pixels[0])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1)
    assert torch.allclose(embedder.embed([image]), expected, atol=1e-6)


def test_an_open_clip_model_with_its_own_preprocessing(tmp_path):
    """The OpenCLIP backend (THINGS-EEG work aligns to OpenCLIP ViT-H/14): a tiny architecture,
    weights from a local file, and exactly open_clip's own embedding of an image."""
    import json

    import open_clip
    from PIL import Image

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "tiny-test-clip.json"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-test-clip")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    embedder = load_clip_image_encoder("open_clip:tiny-test-clip", tmp_path / "weights.pt")
    assert embedder.projection_dim == 16 and embedder.image_size == 32
    assert not any(p.requires_grad for p in embedder.parameters())
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval().encode_image(preprocess(image)[None]), dim=-1)
    assert torch.allclose(embedder.embed([image]), expected, atol=1e-5)
    with pytest.raises(CheckpointError, match="weights file"):
        load_clip_image_encoder("open_clip:tiny-test-clip", tmp_path / "missing.pt")
