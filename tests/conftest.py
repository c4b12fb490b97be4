"""Shared test settings: everything runs offline on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the test models are tiny, and with two OpenMP threads per process on a
# 2-core machine (worse with the 2-process DDP test or any other load) torch spends its time in
# spin-waits - one test went from 4 s to over 300 s. Set before torch is imported; subprocesses
# inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Synthetic data in the real formats (dreamdiffusion.data.synthetic), shared by every area's tests.

SYNTHETIC_IMAGENET_EEG = dict(
    n_classes=4,
    images_per_class=5,
    n_subjects=3,
    n_channels=128,
    image_size=32,
    seed=0,
    out_of_range_fraction=0.25,  # many trials outside 450..600, so the length filter acts
    n_splits=2,
    dropped_final_trials=3,  # subject 3 misses its last trials: some "single" positions are invalid
)


@pytest.fixture(scope="session")
def synthetic_imagenet_eeg(tmp_path_factory):
    """A tiny ImageNet-EEG in the real formats: 4 classes x 5 images (32 px), 3 subjects, 128 channels.

    Returns the dict of `write_synthetic_imagenet_eeg`: root, eeg_path, splits_path (the "single"
    file), splits_all_path, image_dir, class_names_path. Treat the files as read-only.
    """
    from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg

    return write_synthetic_imagenet_eeg(tmp_path_factory.mktemp("imagenet_eeg"), **SYNTHETIC_IMAGENET_EEG)


@pytest.fixture(scope="session")
def synthetic_pretrain_corpus(tmp_path_factory):
    """12 unpaired recordings (32/64/128 channels, 300..1200 samples) below `<root>/sub-XX/`.

    Returns the root folder (a Path). Treat the files as read-only.
    """
    from dreamdiffusion.data.synthetic import write_synthetic_pretrain_corpus

    root = tmp_path_factory.mktemp("pretrain_eeg")
    write_synthetic_pretrain_corpus(root, n_files=12, length_range=(300, 1200), seed=0)
    return root
