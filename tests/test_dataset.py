"""The data layer returns exactly what the authors' loading rules (docs/method.md, "Data") give, and rejects bad input with a sentence.

The expected values are computed here independently (plain lists, `np.interp` per channel,
torchvision / PIL / transformers for the images) from the synthetic files of conftest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from dreamdiffusion.config import PairedDataConfig, PretrainDataConfig
from dreamdiffusion.core.errors import DataError, run_cli
from dreamdiffusion.data.common import config_arguments, random_crop_resize
from dreamdiffusion.dataset import (
    CLIP_MEAN,
    CLIP_STD,
    EEGPretrainDataset,
    ImageNetEEGDataset,
    load_image,
    main,
    paired_dataset,
)

# ---------------------------------------------------------------------------------------------
# The authors' rules, written out independently


def expected_trials(eeg_path, splits_path, subject, split, split_index):
    """[(eeg [128, 512] float64, label, image name, subject)] by the authors' rules (docs/method.md, "Data")."""
    content = torch.load(eeg_path, weights_only=True)
    trials = [t for t in content["dataset"] if subject == 0 or t["subject"] == subject]
    listed = torch.load(splits_path, weights_only=True)["splits"][split_index][split]
    out = []
    for i in listed:
        if i < len(trials) and 450 <= trials[i]["eeg"].shape[1] <= 600:
            t = trials[i]
            window = t["eeg"].numpy().astype(np.float64)[:, 20:460]
            src, dst = np.linspace(0.0, 1.0, window.shape[1]), np.linspace(0.0, 1.0, 512)
            eeg = np.stack([np.interp(dst, src, channel) for channel in window])
            out.append((eeg, t["label"], content["images"][t["image"]], t["subject"]))
    return out


CASES = [("splits_path", 1), ("splits_path", 3), ("splits_all_path", 0)]


@pytest.mark.parametrize("split_index", [0, 1])
@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("splits_key,subject", CASES)
def test_items_match_the_authors_rules(synthetic_imagenet_eeg, splits_key, subject, split, split_index):
    paths = synthetic_imagenet_eeg
    ds = ImageNetEEGDataset(paths["eeg_path"], paths[splits_key], split=split, split_index=split_index,
                            subject=subject)
    expected = expected_trials(paths["eeg_path"], paths[splits_key], subject, split, split_index)
    assert len(ds) == len(expected) > 0
    wnids = torch.load(paths["eeg_path"], weights_only=True)["labels"]
    assert ds.wnids == wnids and ds.n_channels == 128 and ds.n_times == 512
    for i, (eeg, label, name, subj) in enumerate(expected):
        item = ds[i]
        assert item["eeg"].dtype == torch.float32 and item["eeg"].shape == (128, 512)
        np.testing.assert_allclose(item["eeg"].numpy(), eeg, rtol=0, atol=1e-5)
        assert (item["label"], item["image_name"], item["subject"], item["index"]) == (label, name, subj, i)
        assert item["wnid"] == wnids[label] and ds.labels[i] == label and ds.image_names[i] == name
        assert "image" not in item


def test_fixture_exercises_every_filter(synthetic_imagenet_eeg):
    paths = synthetic_imagenet_eeg
    # subject 3 misses its final trials, so some "single" positions are past its list
    ds = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], split="train", subject=3)
    assert ds.selection.n_out_of_range > 0
    dropped = sum(ImageNetEEGDataset(paths["eeg_path"], paths["splits_all_path"], split=s, subject=0)
                  .selection.n_length_dropped for s in ("train", "val", "test"))
    assert dropped > 0


def test_window_and_length_parameters(synthetic_imagenet_eeg):
    """Non-default window / n_times / length limits follow the same rules."""
    paths = synthetic_imagenet_eeg
    ds = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], split="train", subject=1,
                            time_window=(10, 110), n_times=64, min_trial_length=0, max_trial_length=10_000)
    content = torch.load(paths["eeg_path"], weights_only=True)
    trials = [t for t in content["dataset"] if t["subject"] == 1]
    listed = torch.load(paths["splits_path"], weights_only=True)["splits"][0]["train"]
    assert len(ds) == len(listed)
    window = trials[listed[0]]["eeg"].numpy().astype(np.float64)[:, 10:110]
    want = np.stack([np.interp(np.linspace(0, 99, 64), np.arange(100), ch) for ch in window])
    np.testing.assert_allclose(ds[0]["eeg"].numpy(), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Images


def test_images_and_clip_inputs(synthetic_imagenet_eeg):
    from dreamdiffusion.models.clip_embedder import clip_pil_processor_class

    paths = synthetic_imagenet_eeg
    ds = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], paths["image_dir"], split="test",
                            subject=1, image_size=32)
    small = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], paths["image_dir"], split="test",
                               subject=1, image_size=20, clip_image_size=24)
    processor = clip_pil_processor_class()()  # OpenAI CLIP ViT-L/14: 224 shortest side, bicubic, centre crop
    assert tuple(processor.image_mean) == pytest.approx(CLIP_MEAN) and tuple(processor.image_std) == pytest.approx(CLIP_STD)
    for i in range(len(ds)):
        item = ds[i]
        path = paths["image_dir"] / item["wnid"] / f"{item['image_name']}.JPEG"
        original = Image.open(path).convert("RGB")
        pixels = torch.from_numpy(np.array(original)).permute(2, 0, 1).float()
        # the files are 32 px, so at image_size 32 the image is the file mapped to [-1, 1]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        torch.testing.assert_close(item["image"], pixels / 255 * 2 - 1, atol=1e-6, rtol=0)
        resized = TF.resize(pixels / 255 * 2 - 1, [20, 20], antialias=True)
        torch.testing.assert_close(small[i]["image"], resized, atol=1e-5, rtol=0)
        assert small[i]["image"].min() >= -1 and small[i]["image"].max() <= 1
        want = processor(images=original, return_tensors="pt")["pixel_values"][0]
        assert item["clip_pixel_values"].shape == (3, 224, 224)
        torch.testing.assert_close(item["clip_pixel_values"], want, atol=1e-5, rtol=0)
        assert small[i]["clip_pixel_values"].shape == (3, 24, 24)
    assert torch.equal(load_image(ds.image_path(0), 32), ds[0]["image"])


def test_clip_inputs_come_from_the_alignment_targets_own_preprocessing(synthetic_imagenet_eeg):
    """An OpenCLIP-style target brings its own transform: the dataset applies it to the original file."""
    paths = synthetic_imagenet_eeg
    seen = []

    def transform(img):
        seen.append(img.size)
        return torch.full((3, 7, 7), float(len(seen)))

    ds = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], paths["image_dir"], split="test", subject=1,
                            image_size=16, clip_transform=transform)
    item = ds[0]
    assert torch.equal(item["clip_pixel_values"], torch.full((3, 7, 7), 1.0))
    assert seen == [(32, 32)]  # the original 32 px file, not the 16 px training image


def test_augmentation_is_a_random_crop_resized_back(synthetic_imagenet_eeg):
    paths = synthetic_imagenet_eeg
    common = dict(eeg_path=paths["eeg_path"], splits_path=paths["splits_path"], image_dir=paths["image_dir"],
                  split="train", subject=1, image_size=32, crop_ratio=0.2)
    plain = ImageNetEEGDataset(**common)[0]
    torch.manual_seed(0)
    always = ImageNetEEGDataset(**common, augment=True, crop_probability=1.0)
    side = 32 - int(0.2 * 32)
    for _ in range(3):
        item = always[0]
        assert not torch.equal(item["image"], plain["image"])
        torch.testing.assert_close(item["clip_pixel_values"], plain["clip_pixel_values"], atol=0, rtol=0)
        errors = [(TF.resize(TF.crop(plain["image"], top, left, side, side), [32, 32], antialias=True)
                   - item["image"]).abs().max().item()
                  for top in range(32 - side + 1) for left in range(32 - side + 1)]
        assert min(errors) < 1e-5
    never = ImageNetEEGDataset(**common, augment=True, crop_probability=0.0)
    assert torch.equal(never[0]["image"], plain["image"])
    not_training = ImageNetEEGDataset(**common, augment=False, crop_probability=1.0)
    assert torch.equal(not_training[0]["image"], plain["image"])
    half = ImageNetEEGDataset(**common, augment=True, crop_probability=0.5)
    n_cropped = sum(not torch.equal(half[0]["image"], plain["image"]) for _ in range(40))
    assert 8 <= n_cropped <= 32


def _crop_by_hand(image, crop_size):
    """The train-time crop as this project wrote it before adopting torchvision's transforms: top, then
    left, from torch's global RNG; the square resized back (bilinear, antialiased)."""
    size = image.shape[-1]
    top = int(torch.randint(0, image.shape[-2] - crop_size + 1, (1,)))
    left = int(torch.randint(0, size - crop_size + 1, (1,)))
    square = image[None, :, top:top + crop_size, left:left + crop_size]
    return torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True)[0]


@pytest.mark.parametrize("seed", [0, 1, 2022])
def test_the_train_crop_is_the_hand_written_one_to_the_bit(synthetic_imagenet_eeg, seed):
    """torchvision's RandomCrop + Resize draw the same positions from the same stream and give the same
    floats; through the dataset (crop probability 0.5) the same items come out for a seed."""
    image = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    for size, crop_size in ((512, 410), (64, 52), (64, 1)):
        image_at = TF.resize(image, [size, size], antialias=True)
        torch.manual_seed(seed)
        ours = [random_crop_resize(size, crop_size)(image_at) for _ in range(3)] + [torch.rand(1)]
        torch.manual_seed(seed)
        by_hand = [_crop_by_hand(image_at, crop_size) for _ in range(3)] + [torch.rand(1)]  # the stream goes on alike
        assert all(torch.equal(a, b) for a, b in zip(ours, by_hand)), (size, crop_size)
    paths = synthetic_imagenet_eeg
    common = dict(eeg_path=paths["eeg_path"], splits_path=paths["splits_path"], image_dir=paths["image_dir"],
                  split="train", subject=1, image_size=32, clip_image_size=32, crop_ratio=0.2)
    plain = ImageNetEEGDataset(**common)[0]["image"]
    augmented = ImageNetEEGDataset(**common, augment=True, crop_probability=0.5)
    torch.manual_seed(seed)
    items = [augmented[0]["image"] for _ in range(8)]
    torch.manual_seed(seed)
    by_hand = [_crop_by_hand(plain, 32 - int(0.2 * 32)) if float(torch.rand(1)) < 0.5 else plain for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(items, by_hand))


def test_from_config(synthetic_imagenet_eeg):
    paths = synthetic_imagenet_eeg
    cfg = OmegaConf.structured(PairedDataConfig(
        eeg_path=str(paths["eeg_path"]), splits_path=str(paths["splits_path"]), image_dir=str(paths["image_dir"]),
        subject=2, split_index=1, image_size=32, clip_image_size=32))
    ds = ImageNetEEGDataset.from_config(cfg, "val")
    direct = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], paths["image_dir"], split="val",
                                split_index=1, subject=2, image_size=32, clip_image_size=32)
    assert ds.image_names == direct.image_names and len(ds) > 0
    assert torch.equal(ds[0]["eeg"], direct[0]["eeg"]) and torch.equal(ds[0]["image"], direct[0]["image"])
    assert ImageNetEEGDataset.from_config(cfg, "train", augment=True).augment
    eeg_only = paired_dataset(cfg, "val", load_images=False)
    assert eeg_only.image_dir is None and "image" not in eeg_only[0] and torch.equal(eeg_only[0]["eeg"], direct[0]["eeg"])
    # every field of the group is an argument of the dataset, by name (kind and things_eeg2 choose the dataset)
    taken = set(config_arguments(cfg, ImageNetEEGDataset))
    assert taken == set(cfg) - {"kind", "things_eeg2"}
    assert all(getattr(ds, name) == cfg[name] for name in ("split_index", "subject", "n_times", "image_size",
                                                             "clip_image_size", "crop_probability"))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture()
def eeg_content(synthetic_imagenet_eeg):
    return torch.load(synthetic_imagenet_eeg["eeg_path"], weights_only=True)


def test_missing_files_name_the_path_and_the_readme(synthetic_imagenet_eeg, tmp_path):
    paths = synthetic_imagenet_eeg
    for kwargs, missing in [
        (dict(eeg_path=tmp_path / "eeg_5_95_std.pth", splits_path=paths["splits_path"]), "eeg_5_95_std.pth"),
        (dict(eeg_path=paths["eeg_path"], splits_path=tmp_path / "splits.pth"), "splits.pth"),
        (dict(eeg_path=paths["eeg_path"], splits_path=paths["splits_path"], image_dir=tmp_path / "nope"), "nope"),
    ]:
        with pytest.raises(DataError, match="not found") as err:
            ImageNetEEGDataset(**kwargs, subject=1)
        assert str(tmp_path / missing) in str(err.value) and "datasets/README.md" in str(err.value)


def test_missing_keys_are_named(synthetic_imagenet_eeg, eeg_content, tmp_path):
    splits = synthetic_imagenet_eeg["splits_path"]
    no_labels = {k: v for k, v in eeg_content.items() if k != "labels"}
    torch.save(no_labels, tmp_path / "a.pth")
    with pytest.raises(DataError, match="no key 'labels'"):
        ImageNetEEGDataset(tmp_path / "a.pth", splits, subject=1)
    broken = dict(eeg_content, dataset=[dict(t) for t in eeg_content["dataset"]])
    del broken["dataset"][5]["eeg"]
    torch.save(broken, tmp_path / "b.pth")
    with pytest.raises(DataError, match="trial 5 of 'dataset' has no key 'eeg'"):
        ImageNetEEGDataset(tmp_path / "b.pth", splits, subject=1)
    torch.save({"folds": []}, tmp_path / "splits.pth")
    with pytest.raises(DataError, match="no key 'splits'"):
        ImageNetEEGDataset(synthetic_imagenet_eeg["eeg_path"], tmp_path / "splits.pth", subject=1)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_a_pickle_that_runs_code_is_refused(synthetic_imagenet_eeg, eeg_content, tmp_path):
    torch.save(dict(eeg_content, labels=_RunsCode()), tmp_path / "evil.pth")
    with pytest.raises(DataError, match="refus"):
        ImageNetEEGDataset(tmp_path / "evil.pth", synthetic_imagenet_eeg["splits_path"], subject=1)


def test_unknown_split_subject_and_split_index(synthetic_imagenet_eeg):
    paths = synthetic_imagenet_eeg
    with pytest.raises(DataError, match="split 'validation' is not in .*holds: train, val, test"):
        ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], split="validation", subject=1)
    with pytest.raises(DataError, match=r"split_index 5 is out of range: .* holds 2 splits"):
        ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], split_index=5, subject=1)
    with pytest.raises(DataError, match=r"subject 9 has no trials .*subjects present: \[1, 2, 3\]"):
        ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], subject=9)


def test_missing_image_is_an_error_never_a_substitute(synthetic_imagenet_eeg, tmp_path):
    paths = synthetic_imagenet_eeg
    images = tmp_path / "images"
    shutil.copytree(paths["image_dir"], images)
    ds = ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], images, split="train", subject=1,
                            image_size=32, clip_image_size=32)
    gone = images / ds.wnids[ds.labels[0]] / f"{ds.image_names[0]}.JPEG"
    gone.unlink()
    with pytest.raises(DataError, match="image not found") as err:
        ds[0]
    assert str(gone) in str(err.value)
    with pytest.raises(DataError, match="1 image\\(s\\) of split 'train' not found") as err:
        ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], images, split="train", subject=1)
    assert str(gone) in str(err.value)
    with pytest.raises(DataError, match="image not found"):
        load_image(gone, 32)


def test_check_command(synthetic_imagenet_eeg, tmp_path, capsys):
    paths = synthetic_imagenet_eeg
    argv = ["check", "--eeg", str(paths["eeg_path"]), "--splits", str(paths["splits_path"]),
            "--images", str(paths["image_dir"]), "--subject", "3", "--split-index", "1"]
    assert run_cli(main, argv) == 0
    out = capsys.readouterr().out
    for subject, n in ((1, 20), (2, 20), (3, 17)):  # what the file holds, per subject
        assert f"subject {subject}: {n} trials, 128 channels" in out
    expected = {s: ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], split=s, split_index=1, subject=3)
                for s in ("train", "val", "test")}
    for name, ds in expected.items():
        sel = ds.selection
        assert (f"{name:>5}: {sel.n_listed} listed, {sel.n_out_of_range} not a position of subject 3's trials, "
                f"{sel.n_length_dropped} dropped by the length filter, {len(ds)} kept") in out
    assert "0 missing" in out and out.rstrip().endswith("ok")

    images = tmp_path / "images"
    shutil.copytree(paths["image_dir"], images)
    ds = expected["test"]
    gone = [images / ds.wnids[ds.labels[i]] / f"{ds.image_names[i]}.JPEG" for i in range(2)]
    for p in gone:
        p.unlink(missing_ok=True)
    argv[argv.index("--images") + 1] = str(images)
    assert run_cli(main, argv) == 2
    captured = capsys.readouterr()
    for p in gone:
        assert f"missing image {p}" in captured.out
    assert "problem(s) found" in captured.err and "missing image" in captured.err

    # the module's own entry point exits with code 2 on a data error
    proc = subprocess.run([sys.executable, "-m", "dreamdiffusion.dataset", "check", "--eeg", str(tmp_path / "x.pth"),
                           "--splits", str(paths["splits_path"])], capture_output=True, text=True)
    assert proc.returncode == 2 and "EEG file not found" in proc.stderr and "datasets/README.md" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Unpaired EEG (stage 1)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def test_pretrain_crop_interpolation_and_channel_tiling(tmp_path):
    rng = np.random.default_rng(0)
    short = _save(tmp_path / "a" / "short.npy", rng.normal(size=(32, 300)).astype(np.float32))
    odd = _save(tmp_path / "b" / "odd.npy", rng.normal(size=(50, 512)).astype(np.float32))
    # values encode (channel, time), so the crop offsets can be read off the first sample
    channel, time = np.meshgrid(np.arange(200), np.arange(700), indexing="ij")
    big = _save(tmp_path / "c" / "big.npy", (channel * 1000 + time).astype(np.float32))
    exact = _save(tmp_path / "exact.npy", rng.normal(size=(128, 512)).astype(np.float32))
    ds = EEGPretrainDataset(tmp_path, n_channels=128, n_times=512, scale=0.1)
    assert ds.files == sorted([short, odd, big, exact]) and ds.n_skipped == 0
    items = {p.name: ds[i]["eeg"] for i, p in enumerate(ds.files)}
    for eeg in items.values():
        assert eeg.shape == (128, 512) and eeg.dtype == torch.float32

    x = np.load(short).astype(np.float64)
    interp = np.stack([np.interp(np.linspace(0, 1, 512), np.linspace(0, 1, 300), ch) for ch in x])
    np.testing.assert_allclose(items["short.npy"].numpy(), 0.1 * interp[np.arange(128) % 32], atol=1e-5)
    np.testing.assert_allclose(items["odd.npy"].numpy(), 0.1 * np.load(odd)[np.arange(128) % 50], atol=1e-6)
    np.testing.assert_allclose(items["exact.npy"].numpy(), 0.1 * np.load(exact), atol=1e-6)

    torch.manual_seed(0)
    offsets = set()
    for _ in range(8):
        eeg = ds[ds.files.index(big)]["eeg"].numpy() / 0.1
        first = int(round(eeg[0, 0]))
        c0, t0 = divmod(first, 1000)
        assert 0 <= c0 <= 200 - 128 and 0 <= t0 <= 700 - 512
        np.testing.assert_allclose(eeg, np.load(big)[c0:c0 + 128, t0:t0 + 512], rtol=1e-5)
        offsets.add((c0, t0))
    assert len(offsets) > 1


def test_pretrain_bad_files(tmp_path):
    good = _save(tmp_path / "good.npy", np.ones((4, 600), np.float32))
    nan = np.ones((4, 600), np.float32)
    nan[1, 5] = np.nan
    inf = np.ones((4, 600), np.float32)
    inf[2, 7] = np.inf
    bad = [_save(tmp_path / "x" / "rank1.npy", np.ones(600, np.float32)),
           _save(tmp_path / "x" / "rank3.npy", np.ones((2, 4, 600), np.float32)),
           _save(tmp_path / "x" / "nan.npy", nan),
           _save(tmp_path / "x" / "inf.npy", inf)]
    for path in bad:
        with pytest.raises(DataError, match="skip_bad_files") as err:
            EEGPretrainDataset(None, files=[good, path])
        assert str(path) in str(err.value)
    ds = EEGPretrainDataset(tmp_path, n_channels=8, skip_bad_files=True)
    assert ds.files == [good] and ds.n_skipped == 4 and len(ds) == 1
    with pytest.raises(DataError, match="unusable"):
        EEGPretrainDataset(tmp_path / "x", skip_bad_files=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.npy files"):
        EEGPretrainDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="datasets/README.md") as err:
        EEGPretrainDataset(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)


def test_pretrain_corpus_and_config(synthetic_pretrain_corpus):
    cfg = OmegaConf.structured(PretrainDataConfig(root=str(synthetic_pretrain_corpus)))
    ds = EEGPretrainDataset.from_config(cfg)
    assert ds.files == sorted(synthetic_pretrain_corpus.rglob("*.npy")) and len(ds) == 12
    assert len({np.load(f, mmap_mode="r").shape[0] for f in ds.files}) > 1
    batch = torch.stack([ds[i]["eeg"] for i in range(len(ds))])
    assert batch.shape == (12, 128, 512) and torch.isfinite(batch).all()
    assert 0.5 < batch.std().item() < 3.0  # the corpus has std ~10; scale 0.1 brings it to ~1
    subset = EEGPretrainDataset.from_config(cfg, files=ds.files[:3])
    assert subset.files == ds.files[:3]
