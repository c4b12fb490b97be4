"""The frozen CLIP target loads strictly: incomplete weights are an error, never a random init."""

import pytest
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from dreamdiffusion.clip_embedder import load_clip_image_encoder
from dreamdiffusion.errors import CheckpointError

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
