"""Synthetic data: the real file formats, a block design split by image, deterministic stimuli, and EEG
whose class information and noise spectrum are what the docstrings promise."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SYNTHETIC_IMAGENET_EEG
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.data.synthetic import (
    COLOURS,
    SHAPES,
    TEXTURES,
    StimulusClass,
    SyntheticEEG,
    channel_layout,
    draw_stimulus,
    sample_stimulus_params,
    stimulus_classes,
    visual_parts,
    write_synthetic_imagenet_eeg,
    write_synthetic_pretrain_corpus,
)

N_IMAGES = SYNTHETIC_IMAGENET_EEG["n_classes"] * SYNTHETIC_IMAGENET_EEG["images_per_class"]


def test_eeg_file_format(synthetic_imagenet_eeg):
    content = torch.load(synthetic_imagenet_eeg["eeg_path"], weights_only=True)
    assert set(content) == {"dataset", "labels", "images"}
    wnids, names = content["labels"], content["images"]
    assert len(wnids) == SYNTHETIC_IMAGENET_EEG["n_classes"] and len(names) == N_IMAGES
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids) and len(set(wnids)) == len(wnids)
    for trial in content["dataset"]:
        assert set(trial) == {"eeg", "image", "label", "subject"}
        eeg = trial["eeg"]
        assert isinstance(eeg, torch.Tensor) and eeg.dtype == torch.float32 and eeg.shape[0] == 128
        assert all(type(trial[k]) is int for k in ("image", "label", "subject"))
        assert names[trial["image"]].startswith(wnids[trial["label"]] + "_")
    class_names = json.loads(synthetic_imagenet_eeg["class_names_path"].read_text())
    assert list(class_names) == wnids
    assert all(" " in n for n in class_names.values()) and len(set(class_names.values())) == len(wnids)
    for name in names:
        path = synthetic_imagenet_eeg["image_dir"] / name.split("_")[0] / f"{name}.JPEG"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)


def test_block_design_subjects_and_lengths(synthetic_imagenet_eeg):
    content = torch.load(synthetic_imagenet_eeg["eeg_path"], weights_only=True)
    trials = content["dataset"]
    by_subject = {s: [t for t in trials if t["subject"] == s] for s in (1, 2, 3)}
    assert [len(v) for v in by_subject.values()] == [N_IMAGES, N_IMAGES, N_IMAGES - 3]
    session = [t["image"] for t in by_subject[1]]
    assert sorted(session) == list(range(N_IMAGES))  # every image once
    for subject_trials in by_subject.values():
        assert [t["image"] for t in subject_trials] == session[:len(subject_trials)]
        labels = [t["label"] for t in subject_trials]
        runs = [k for n, k in enumerate(labels) if n == 0 or labels[n - 1] != k]
        assert len(runs) == len(set(runs)) == SYNTHETIC_IMAGENET_EEG["n_classes"]  # one block per class
        # standardised per channel over all of the subject's samples
        stacked = torch.cat([t["eeg"] for t in subject_trials], dim=1).double()
        assert stacked.mean(dim=1).abs().max() < 1e-4
        assert (stacked.std(dim=1, correction=0) - 1).abs().max() < 1e-4
    lengths = np.array([t["eeg"].shape[1] for t in trials])
    outside = (lengths < 450) | (lengths > 600)
    assert 0.1 < outside.mean() < 0.45 and lengths.min() >= 400 and lengths.max() <= 650


def test_splits_are_by_image(synthetic_imagenet_eeg):
    content = torch.load(synthetic_imagenet_eeg["eeg_path"], weights_only=True)
    trials = content["dataset"]
    session = [t["image"] for t in trials if t["subject"] == 1]
    single = torch.load(synthetic_imagenet_eeg["splits_path"], weights_only=True)["splits"]
    every = torch.load(synthetic_imagenet_eeg["splits_all_path"], weights_only=True)["splits"]
    assert len(single) == len(every) == 2 and single[0] != single[1]
    for s_split, a_split in zip(single, every):
        assert list(s_split) == list(a_split) == ["train", "val", "test"]
        assert sorted(sum(s_split.values(), [])) == list(range(N_IMAGES))
        assert sorted(sum(a_split.values(), [])) == list(range(len(trials)))
        images = {}
        for name in s_split:
            images[name] = {session[i] for i in s_split[name]}
            assert images[name] == {trials[i]["image"] for i in a_split[name]}
            assert {trials[i]["label"] for i in a_split[name]} == set(range(SYNTHETIC_IMAGENET_EEG["n_classes"]))
        assert not (images["train"] & images["val"] or images["train"] & images["test"]
                    or images["val"] & images["test"])
        assert s_split["train"] != sorted(s_split["train"])  # listed in shuffled order, like the real files


def test_writer_is_deterministic(tmp_path):
    small = dict(n_classes=2, images_per_class=3, n_subjects=1, image_size=16)
    a = write_synthetic_imagenet_eeg(tmp_path / "a", seed=3, **small)
    b = write_synthetic_imagenet_eeg(tmp_path / "b", seed=3, **small)
    c = write_synthetic_imagenet_eeg(tmp_path / "c", seed=4, **small)
    load = lambda p: torch.load(p["eeg_path"], weights_only=True)["dataset"]  # noqa: E731
    assert all(torch.equal(x["eeg"], y["eeg"]) for x, y in zip(load(a), load(b)))
    assert not torch.equal(load(a)[0]["eeg"], load(c)[0]["eeg"])
    files = sorted(p.relative_to(a["image_dir"]) for p in a["image_dir"].rglob("*.JPEG"))
    assert len(files) == 6
    assert all((a["image_dir"] / f).read_bytes() == (b["image_dir"] / f).read_bytes() for f in files)
    assert any((a["image_dir"] / f).read_bytes() != (c["image_dir"] / f).read_bytes() for f in files)


# ---------------------------------------------------------------------------------------------
# Stimuli


def test_stimulus_classes():
    classes = stimulus_classes(256)
    assert len(set(classes)) == 256 and len({c.name for c in classes}) == 256
    assert StimulusClass("circle", "red", "striped").name == "red striped circle"
    assert StimulusClass("circle", "red", "plain").name == "red circle"
    first = stimulus_classes(8)
    assert {c.shape for c in first} == set(SHAPES) and len({c.colour for c in first}) == 8
    with pytest.raises(ConfigError, match="n_classes"):
        stimulus_classes(257)
    with pytest.raises(ConfigError, match="unknown shape 'blob'"):
        draw_stimulus(("blob", "red", "plain"))


def test_draw_stimulus():
    params = sample_stimulus_params(np.random.default_rng(0))
    a = np.asarray(draw_stimulus(("circle", "blue", "plain"), 48, params))
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, np.asarray(draw_stimulus(("circle", "blue", "plain"), 48, params)))
    cy, cx = int(params.cy * 48), int(params.cx * 48)
    assert np.abs(a[cy, cx].astype(int) - COLOURS["blue"]).max() <= 2  # the shape has its class colour
    assert not np.array_equal(a, np.asarray(draw_stimulus(("circle", "blue", "plain"), 48, seed=1)))
    background = np.asarray(draw_stimulus(("circle", "blue", "plain"), 48,
                                          params.__class__(**{**params.__dict__, "radius": 1e-3})))
    for shape in SHAPES:
        for texture in TEXTURES:
            img = np.asarray(draw_stimulus((shape, "blue", texture), 48, params))
            area = (np.abs(img.astype(int) - background).sum(-1) > 30).mean()
            assert 0.05 < area < 0.6, (shape, texture, area)
            if texture != "plain":  # a texture puts a second colour inside the shape
                assert not np.array_equal(img, np.asarray(draw_stimulus((shape, "blue", "plain"), 48, params)))


# ---------------------------------------------------------------------------------------------
# EEG


def _psd(x: np.ndarray, sfreq: float = 1000.0):
    spectrum = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    return np.fft.rfftfreq(x.shape[-1], 1 / sfreq), spectrum.mean(axis=0)


def test_background_spectrum():
    gen = SyntheticEEG(n_channels=64, seed=0)
    x = np.concatenate([gen.background(2000, subject=1, rng=np.random.default_rng(i)) for i in range(4)], axis=1)
    np.testing.assert_allclose(x.std(axis=1), 1.0, atol=0.02)
    posterior = channel_layout(64)[:, 1] < -0.4
    freqs, power = _psd(x[posterior].reshape(-1, 2000))
    band = lambda lo, hi: power[(freqs >= lo) & (freqs < hi)].mean()  # noqa: E731
    alpha_freq = gen.subject(1).alpha_freq
    assert band(alpha_freq - 1, alpha_freq + 1) > 3 * band(14, 18)  # alpha peak
    assert band(15, 25) > 2 * band(60, 80)  # 1/f: power falls with frequency
    assert band(0, 4.5) < 1e-6 * band(5, 95) and band(96, 500) < 1e-6 * band(5, 95)  # 5..95 Hz band


def test_signal_strength_zero_is_background_only():
    gen = SyntheticEEG(n_channels=16, signal_strength=0.0, seed=1)
    parts = [(("class", 0), 1.0)]
    trial = gen.trial(parts, 500, subject=2, rng=np.random.default_rng(5))
    assert np.array_equal(trial, gen.background(500, subject=2, rng=np.random.default_rng(5)))
    strong = SyntheticEEG(n_channels=16, signal_strength=2.0, seed=1)
    assert not np.array_equal(strong.trial(parts, 500, 2, np.random.default_rng(5)), trial)


def test_eeg_carries_class_information():
    """Nearest class mean on held-out trials: well above chance, far from perfect, across subjects too."""
    gen = SyntheticEEG(n_channels=64, signal_strength=2.0, seed=0)
    classes = stimulus_classes(4)
    rng = np.random.default_rng(0)

    def trials(subject, n):
        x, y = [], []
        for k, stim in enumerate(classes):
            for _ in range(n):
                parts = [(("shape", stim.shape), 1.0), (("colour", stim.colour), 1.0), (("class", k), 1.0),
                         (("image", int(rng.integers(1000))), 0.5)]
                x.append(gen.trial(parts, 460, subject, rng)[:, 20:460].reshape(64, 44, 10).mean(-1).ravel())
                y.append(k)
        return np.array(x), np.array(y)

    x_train, y_train = trials(1, 20)
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(4)])
    accuracy = {}
    for subject in (1, 2):
        x_test, y_test = trials(subject, 15)
        predicted = ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        accuracy[subject] = (predicted == y_test).mean()
    assert 0.5 < accuracy[1] < 0.95 and 0.5 < accuracy[2] < 0.95  # chance: 0.25


def test_subjects_differ_but_share_responses():
    gen = SyntheticEEG(n_channels=64, seed=0)
    parts = [(("class", 3), 1.0)]
    a = gen.evoked(parts, 500, 1, np.random.default_rng(0))
    b = gen.evoked(parts, 500, 2, np.random.default_rng(0))
    other = gen.evoked([(("class", 4), 1.0)], 500, 1, np.random.default_rng(0))
    corr = lambda u, v: np.corrcoef(u.ravel(), v.ravel())[0, 1]  # noqa: E731
    assert 0.3 < corr(a, b) < 0.999 and abs(corr(a, other)) < corr(a, b)


def test_pretrain_corpus(synthetic_pretrain_corpus):
    files = sorted(synthetic_pretrain_corpus.rglob("*.npy"))
    assert len(files) == 12 and all(re.fullmatch(r"sub-\d\d", f.parent.name) for f in files)
    arrays = [np.load(f) for f in files]
    assert all(a.dtype == np.float32 and a.ndim == 2 and np.isfinite(a).all() for a in arrays)
    assert {a.shape[0] for a in arrays} <= {32, 64, 128} and len({a.shape[0] for a in arrays}) > 1
    assert all(300 <= a.shape[1] <= 1200 for a in arrays)
    assert all(8 < a.std() < 40 for a in arrays)  # amplitude 10: the authors' scale 0.1 gives ~1


def test_the_corpus_visual_share_adds_visual_recordings_and_zero_changes_nothing(tmp_path):
    corpus = dict(n_files=6, channel_counts=(32,), length_range=(300, 400), seed=3)
    plain = write_synthetic_pretrain_corpus(tmp_path / "plain", **corpus)
    zero = write_synthetic_pretrain_corpus(tmp_path / "zero", visual_share=0.0, **corpus)
    half = write_synthetic_pretrain_corpus(tmp_path / "half", visual_share=0.5, **corpus)
    same = [np.array_equal(np.load(a), np.load(b)) for a, b in zip(plain, zero)]
    assert all(same)  # 0: exactly today's files
    # a share: that many recordings (of the same length and channels) carry other evoked responses
    changed = [not np.array_equal(np.load(a), np.load(b)) for a, b in zip(plain, half)]
    assert sum(changed) == 3 and all(np.load(a).shape == np.load(b).shape for a, b in zip(plain, half))
    # a visual event: one shape, colour and texture in any combination, random drawing features, no label
    parts = visual_parts(np.random.default_rng(0), image_weight=0.5)
    kinds = [key[0] for key, _ in parts]
    assert kinds[:3] == ["shape", "colour", "texture"] and kinds.count("feature") == 6 and "class" not in kinds
    assert parts[0][0][1] in SHAPES and parts[1][0][1] in COLOURS and parts[2][0][1] in TEXTURES
    with pytest.raises(ConfigError, match="visual_share must be in"):
        write_synthetic_pretrain_corpus(tmp_path / "bad", visual_share=1.5, **corpus)
