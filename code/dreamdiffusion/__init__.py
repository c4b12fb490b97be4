"""DreamDiffusion: images from EEG through Stable Diffusion 1.5 (Bai et al., ECCV 2024).

The heavy submodules are imported on first use, so `import dreamdiffusion` stays cheap:
`from dreamdiffusion import load_eeg_encoder, DreamDiffusion, DreamDiffusionPipeline`.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "EEGEncoder": "models.mae",
    "MaskedEEGAutoencoder": "models.mae",
    "load_eeg_encoder": "models.mae",
    "DreamDiffusion": "models.dreamdiffusion",
    "EEGCondition": "models.dreamdiffusion",
    "EEGConditioner": "models.dreamdiffusion",
    "DreamDiffusionPipeline": "models.pipeline",
    "load_classifier": "models.classifier",
    "n_way_top_k_accuracy": "evaluation.metrics",
    "ImageNetEEGDataset": "dataset",
    "EEGPretrainDataset": "dataset",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dreamdiffusion' has no attribute {name!r}")
