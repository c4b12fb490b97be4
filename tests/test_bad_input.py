"""Bad input never passes silently and never ends in a traceback.

1. the data check reads the content (NaN/Inf, dtypes, channel counts, split entries, empty splits,
   undecodable images) and the datasets the stages build run the same checks;
2. a fuzz suite: seeded mutants of valid real-format files (truncated, retyped, NaN/Inf, keys dropped
   or renamed, shapes changed, images corrupted, split entries mistyped), each through the check
   command and every stage's dataset construction: exit 2 with a sentence, or accepted because valid;
3. the stages validate before work (no folder left holding only config.yaml), stage 2 refuses bad
   data before training, skip_bad_files names what it skips, and a read-only output folder is a
   sentence when run as a non-root user.
"""

import copy
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from dreamdiffusion import dataset as D
from dreamdiffusion.core.errors import DreamDiffusionError, run_cli
from dreamdiffusion.data import imagenet_eeg
from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg, write_synthetic_pretrain_corpus
from dreamdiffusion.evaluation.stage3 import main as stage3_main
from dreamdiffusion.train.stage1 import main as stage1_main
from dreamdiffusion.train.stage2 import main as stage2_main

# ---------------------------------------------------------------------------------------------
# A small valid ImageNet-EEG in the real formats, and ways to break it


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    paths = write_synthetic_imagenet_eeg(root / "data", n_classes=3, images_per_class=3, n_subjects=2,
                                         image_size=16, seed=1, out_of_range_fraction=0.0)
    return {**paths, "content": torch.load(paths["eeg_path"], weights_only=True),
            "splits": torch.load(paths["splits_path"], weights_only=True)}


def _check(eeg, splits, images, subject=1):
    """The check command's exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run_cli(D.main, ["check", "--eeg", str(eeg), "--splits", str(splits), "--images", str(images),
                                "--subject", str(subject)])
    return code, out.getvalue(), err.getvalue()


def _variant(tmp_path, base, content=None, splits=None):
    """Copies of the EEG and splits files, changed."""
    eeg, split_file = tmp_path / "eeg.pth", tmp_path / "splits.pth"
    torch.save(content if content is not None else base["content"], eeg)
    torch.save(splits if splits is not None else base["splits"], split_file)
    return eeg, split_file


def _first_trial(content, subject=1, split="train", splits=None):
    """(file index, position) of the first trial of `split` for `subject`."""
    positions = [i for i, t in enumerate(content["dataset"]) if t["subject"] == subject]
    position = splits["splits"][0][split][0]
    return positions[position], position


def test_nan_inside_the_window_is_an_error_naming_the_trial_and_outside_a_note(base, tmp_path):
    content = copy.deepcopy(base["content"])
    index, _ = _first_trial(content, splits=base["splits"])
    content["dataset"][index]["eeg"][3, 100] = float("nan")
    code, out, err = _check(*_variant(tmp_path, base, content), base["image_dir"])
    assert code == 2
    assert f"dataset[{index}] (item 0 of split 'train') holds NaN or Inf inside the time window [20, 460)" in out + err
    content = copy.deepcopy(base["content"])
    content["dataset"][index]["eeg"][3, 5] = float("inf")  # before sample 20: never used
    code, out, _ = _check(*_variant(tmp_path, base, content), base["image_dir"])
    assert code == 0 and f"note: dataset[{index}] (item 0 of split 'train') holds NaN/Inf outside the time" in out


def test_integer_eeg_and_mistyped_fields_are_errors_not_conversions(base, tmp_path):
    content = copy.deepcopy(base["content"])
    content["dataset"][2]["eeg"] = content["dataset"][2]["eeg"].round().to(torch.int64)
    code, _, err = _check(*_variant(tmp_path, base, content), base["image_dir"])
    assert code == 2 and "trial 2 'eeg' has dtype torch.int64, expected floating point" in err
    content = copy.deepcopy(base["content"])
    content["dataset"][1]["label"] = 1.0
    code, _, err = _check(*_variant(tmp_path, base, content), base["image_dir"])
    assert code == 2 and "trial 1's 'label' is 1.0 (float), expected an integer" in err
    splits = copy.deepcopy(base["splits"])
    splits["splits"][0]["val"][1] = "7"
    code, _, err = _check(*_variant(tmp_path, base, splits=splits), base["image_dir"])
    assert code == 2 and "splits[0]['val'][1] is '7' (str), expected an integer" in err


def test_the_summary_says_what_channels_it_found(base, tmp_path):
    content = copy.deepcopy(base["content"])
    for trial in content["dataset"]:
        if trial["subject"] == 2:
            trial["eeg"] = trial["eeg"][:64]
    code, out, _ = _check(*_variant(tmp_path, base, content), base["image_dir"], subject=2)
    assert code == 0 and "subject 2: 9 trials, 64 channels" in out and "subject 1: 9 trials, 128 channels" in out
    content["dataset"][0]["eeg"] = content["dataset"][0]["eeg"][:32]  # one trial of subject 1 differs
    code, out, err = _check(*_variant(tmp_path, base, content), base["image_dir"], subject=1)
    assert "subject 1: 9 trials, 32 (x 1), 128 (x 8) channels" in out


def test_a_split_that_keeps_no_trial_is_an_error(base, tmp_path):
    splits = copy.deepcopy(base["splits"])
    splits["splits"][0]["test"] = [10_000, 20_000]  # no position of the subject's trials
    code, out, _ = _check(*_variant(tmp_path, base, splits=splits), base["image_dir"])
    assert code == 2 and "split 'test' of" in out and "keeps no trial of subject 1" in out


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(b""), "cannot be decoded"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be decoded"),
    (lambda p: p.write_text("not an image at all"), "cannot be decoded"),
])
def test_every_image_is_decoded_once(base, tmp_path, damage, why):
    images = tmp_path / "images"
    shutil.copytree(base["image_dir"], images)
    victim = next(images.rglob("*.JPEG"))
    damage(victim)
    code, out, _ = _check(base["eeg_path"], base["splits_path"], images)
    assert code == 2 and f"image {victim} {why}" in out
    with pytest.raises(DreamDiffusionError, match="cannot be decoded|could not be read"):  # a stage refuses it too
        for split in ("train", "val", "test"):
            D.ImageNetEEGDataset(base["eeg_path"], base["splits_path"], images, split=split, subject=1)


# ---------------------------------------------------------------------------------------------
# The fuzz suite


@contextmanager
def _deadline(seconds: int):
    def hang(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _eeg_mutants(content, rng):
    """(name, mutated content or raw bytes) of the EEG file."""
    trials = len(content["dataset"])
    for key in ("dataset", "labels", "images"):
        c = dict(content)
        del c[key]
        yield f"drop {key}", c
        c = dict(content)
        c[key + "_x"] = c.pop(key)
        yield f"rename {key}", c
    for value in ({}, "trials", torch.zeros(3), []):
        yield f"dataset = {type(value).__name__}", {**content, "dataset": value}
    yield "labels hold ints", {**content, "labels": list(range(len(content["labels"])))}
    yield "images is a tensor", {**content, "images": torch.zeros(2)}
    eeg_values = [lambda e: e.to(torch.int32), lambda e: e > 0, lambda e: e[0], lambda e: e[None], lambda e: e.numpy(),
                  lambda e: e.tolist(), lambda e: e.double(), lambda e: e[:, :0], lambda e: e[:0], lambda e: e[:64],
                  lambda e: e[:, :12], lambda e: e.half()]
    field_values = [-1, 10**6, 1.5, "2", torch.tensor(1.0), True, None, torch.tensor([1, 2])]
    for n in range(150):
        c = copy.deepcopy(content)
        i = int(rng.integers(trials))
        kind = n % 6
        if kind == 0:
            del c["dataset"][i][["eeg", "image", "label", "subject"][n % 4]]
            yield f"trial {i} lost a key", c
        elif kind == 1:
            c["dataset"][i]["eeg"] = eeg_values[n % len(eeg_values)](c["dataset"][i]["eeg"])
            yield f"trial {i} eeg changed ({n % len(eeg_values)})", c
        elif kind in (2, 3):
            e = c["dataset"][i]["eeg"]
            t = int(rng.integers(e.shape[1]))
            e[int(rng.integers(e.shape[0])), t] = [float("nan"), float("inf"), -float("inf")][n % 3]
            yield f"trial {i} non-finite at sample {t}", c
        else:
            key = ["label", "image", "subject"][n % 3]
            c["dataset"][i][key] = field_values[n % len(field_values)]
            yield f"trial {i} {key} = {field_values[n % len(field_values)]!r}", c


def _split_mutants(splits, rng):
    yield "no splits key", {"other": splits["splits"]}
    yield "splits is a dict", {"splits": {"0": splits["splits"][0]}}
    yield "splits empty", {"splits": []}
    yield "split entry is a list", {"splits": [list(splits["splits"][0]["train"])]}
    for name in ("train", "val", "test"):
        s = copy.deepcopy(splits)
        del s["splits"][0][name]
        yield f"no {name} split", s
        s = copy.deepcopy(splits)
        s["splits"][0][name] = "0,1,2"
        yield f"{name} is a string", s
        s = copy.deepcopy(splits)
        s["splits"][0][name] = [10**6]
        yield f"{name} keeps nothing", s
    for n in range(30):
        s = copy.deepcopy(splits)
        name = ["train", "val", "test"][n % 3]
        k = int(rng.integers(len(s["splits"][0][name])))
        s["splits"][0][name][k] = ["3", 2.0, -5, None, torch.tensor(1), True, [1], 10**9][n % 8]
        yield f"{name}[{k}] = {s['splits'][0][name][k]!r}", s


def _file_mutants(path, rng):
    data = path.read_bytes()
    yield "empty file", b""
    for n in range(6):
        yield f"truncated to {n}/7", data[: len(data) * n // 7]
    yield "random bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    yield "a json file", b'{"dataset": []}'

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo fuzz-pickle-ran",))

    buffer = io.BytesIO()
    torch.save({"dataset": [], "labels": [], "images": [], "x": RunsCode()}, buffer)
    yield "a pickle that calls a function", buffer.getvalue()


def _outcome(eeg, splits, images):
    """("accepted" | "refused", problem) of one mutant, through the check and every split's dataset."""
    with _deadline(30):
        code, out, err = _check(eeg, splits, images)
        if code not in (0, 2) or (code == 2 and "error:" not in err) or "Traceback" in err:
            return "traceback", f"check exited {code}: {err[-300:]}"
        datasets_ok = True
        for split in ("train", "val", "test"):
            try:
                ds = D.ImageNetEEGDataset(eeg, splits, images, split=split, subject=1)
                ds[len(ds) - 1]
            except DreamDiffusionError:
                datasets_ok = False
            except Exception as exc:  # noqa: BLE001 - any other exception is what the suite hunts for
                return "traceback", f"{split}: {type(exc).__name__}: {exc}"
        if code == 0 and not datasets_ok:
            return "traceback", "the check accepted data a stage's dataset refused"
        if code == 2 and datasets_ok and "keeps no trial" not in out + err and "missing image" not in out:
            pass  # the check may refuse a split a stage does not use (all three are built here)
        return ("accepted" if code == 0 else "refused"), ""


def test_fuzz_the_data_files(base, tmp_path, record_property):
    rng = np.random.default_rng(2024)
    counts = {"accepted": 0, "refused": 0, "traceback": 0}
    failures = []
    cases = [("eeg", name, m) for name, m in _eeg_mutants(base["content"], rng)]
    cases += [("splits", name, m) for name, m in _split_mutants(base["splits"], rng)]
    cases += [("eeg", f"file: {name}", m) for name, m in _file_mutants(base["eeg_path"], rng)]
    cases += [("splits", f"file: {name}", m) for name, m in _file_mutants(base["splits_path"], rng)]
    for n, (target, name, mutant) in enumerate(cases):
        eeg, splits = tmp_path / f"eeg{n}.pth", tmp_path / f"splits{n}.pth"
        shutil.copyfile(base["eeg_path"], eeg)
        shutil.copyfile(base["splits_path"], splits)
        path = eeg if target == "eeg" else splits
        if isinstance(mutant, bytes):
            path.write_bytes(mutant)
        else:
            torch.save(mutant, path)
        kind, why = _outcome(eeg, splits, base["image_dir"])
        counts[kind] += 1
        if kind == "traceback":
            failures.append(f"{target} / {name}: {why}")
        eeg.unlink()
        splits.unlink()
    record_property("fuzz_data_files", counts)
    print("fuzz (data files):", len(cases), "mutants", counts)
    assert not failures, failures
    assert len(cases) >= 200 and counts["refused"] > 150 and counts["accepted"] > 5


def _image_mutants(path, rng):
    data = path.read_bytes()
    yield "zero bytes", lambda p: p.write_bytes(b"")
    for n in range(1, 5):
        yield f"truncated to {n}/5", lambda p, n=n: p.write_bytes(data[: len(data) * n // 5])
    yield "random bytes", lambda p: p.write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    yield "text", lambda p: p.write_text("hello")
    yield "a PNG named .JPEG", lambda p: Image.open(io.BytesIO(data)).save(p, format="PNG")
    yield "grayscale", lambda p: Image.open(io.BytesIO(data)).convert("L").save(p, format="JPEG")
    yield "1 x 1 pixel", lambda p: Image.new("RGB", (1, 1)).save(p, format="JPEG")
    yield "RGBA PNG", lambda p: Image.open(io.BytesIO(data)).convert("RGBA").save(p, format="PNG")
    yield "deleted", lambda p: p.unlink()
    yield "a folder", lambda p: (p.unlink(), p.mkdir())
    yield "flipped bytes", lambda p: p.write_bytes(bytes(b ^ 0xFF if i % 97 == 50 else b for i, b in enumerate(data)))


def test_fuzz_the_images(base, tmp_path):
    rng = np.random.default_rng(7)
    counts = {"accepted": 0, "refused": 0, "traceback": 0}
    failures = []
    originals = sorted(base["image_dir"].rglob("*.JPEG"))
    cases = [(victim, name, damage) for victim in originals[::3] for name, damage in _image_mutants(victim, rng)]
    for n, (victim, name, damage) in enumerate(cases):
        images = tmp_path / f"images{n}"
        shutil.copytree(base["image_dir"], images)
        damage(images / victim.relative_to(base["image_dir"]))
        kind, why = _outcome(base["eeg_path"], base["splits_path"], images)
        counts[kind] += 1
        if kind == "traceback":
            failures.append(f"{victim.name} / {name}: {why}")
        shutil.rmtree(images)
    print("fuzz (images):", len(cases), "mutants", counts)
    assert not failures, failures
    assert counts["refused"] >= len(originals[::3]) * 7 and counts["accepted"] >= len(originals[::3]) * 3


def _npy_mutants(rng):
    good = (rng.standard_normal((8, 300)) * 10).astype(np.float32)

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=True)
        return buffer.getvalue()

    yield "empty file", b"", False
    for n in (1, 2, 4):
        yield f"truncated to {n}/5", npy(good)[: len(npy(good)) * n // 5], False
    yield "1-D", npy(good[0]), False
    yield "3-D", npy(good[None]), False
    yield "NaN", npy(np.where(rng.random(good.shape) < 0.01, np.nan, good)), False
    yield "Inf", npy(np.where(rng.random(good.shape) < 0.01, np.inf, good)), False
    yield "int16", npy(good.astype(np.int16)), False
    yield "complex", npy(good.astype(np.complex64)), False
    yield "bool", npy(good > 0), False
    yield "an object array", npy(np.array([good, "x"], dtype=object)), False
    yield "1 sample", npy(good[:, :1]), False
    yield "0 channels", npy(good[:0]), False
    yield "random bytes", rng.integers(0, 256, 1000, dtype=np.uint8).tobytes(), False
    yield "float16", npy(good.astype(np.float16)), True
    yield "float64, 3 channels", npy(good[:3].astype(np.float64)), True
    yield "200 channels", npy(np.tile(good, (25, 1))), True
    yield "shorter than the crop", npy(good[:, :40]), True


@pytest.mark.parametrize("skip", [False, True])
def test_fuzz_the_pretraining_corpus(tmp_path, skip):
    """Every kind of bad .npy is refused with a sentence naming the file, or skipped and named."""
    rng = np.random.default_rng(3)
    failures = []
    for n, (name, data, valid) in enumerate(_npy_mutants(rng)):
        root = tmp_path / f"corpus{n}"
        write_synthetic_pretrain_corpus(root, n_files=2, channel_counts=(8,), length_range=(300, 400), seed=n)
        (root / "bad.npy").write_bytes(data)
        try:
            with _deadline(20):
                ds = D.EEGPretrainDataset(root, n_channels=8, n_times=64, skip_bad_files=skip)
                assert len(ds) == 2 + valid and (ds.skipped == [] if valid else ds.skipped[0][0].name == "bad.npy")
                ds[len(ds) - 1]
        except DreamDiffusionError as err:
            if valid or skip or "bad.npy" not in str(err):
                failures.append(f"{name}: refused: {err}")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            if not valid and not skip:
                failures.append(f"{name}: accepted a bad file")
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# The stages: validate before work, stage 2 under bad data, skip_bad_files, permissions


def test_stage3_checks_n_way_and_images_before_writing_anything(base, tmp_path, capsys):
    import timm

    from dreamdiffusion.models.classifier import save_local_classifier
    from dreamdiffusion.models.pipeline import DreamDiffusionPipeline
    from stage2_tiny import ENCODER, tiny_model

    model_dir = tmp_path / "model"
    DreamDiffusionPipeline.from_model(tiny_model(seed=0, clip=None)).save_pretrained(model_dir)
    save_local_classifier(timm.create_model("test_resnet", num_classes=6), tmp_path / "clf", "test_resnet",
                          {"num_classes": 6}, 16, [0.5] * 3, [0.5] * 3)
    args = [f"model={model_dir}", f"data.eeg_path={base['eeg_path']}", f"data.splits_path={base['splits_path']}",
            f"data.image_dir={base['image_dir']}", "data.subject=1", f"data.n_times={ENCODER['n_times']}",
            f"classifier={tmp_path / 'clf'}", "classifier_weights=null", "clip_path=null", "metrics=[n_way]",
            "num_inference_steps=1", "num_images_per_eeg=1", "progress_bar=false"]
    out = tmp_path / "never_written"
    assert run_cli(stage3_main, [*args, f"output_dir={out}", "n_way=50"]) == 2
    assert "need top_k <= n_way <= the classifier's 6 classes" in capsys.readouterr().err and not out.exists()
    images = tmp_path / "images"
    shutil.copytree(base["image_dir"], images)
    test_split = D.ImageNetEEGDataset(base["eeg_path"], base["splits_path"], split="test", subject=1)
    imagenet_eeg.image_path(images, test_split.image_names[0]).write_bytes(b"")  # an image stage 3 uses
    assert run_cli(stage3_main, [*args, f"output_dir={out}", "n_way=5", f"data.image_dir={images}"]) == 2
    assert "cannot be decoded" in capsys.readouterr().err and not out.exists()
    (tmp_path / "a_file").write_text("x")
    assert run_cli(stage3_main, [*args, f"output_dir={tmp_path / 'a_file'}", "n_way=5"]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def stage2_world(tmp_path_factory, base):
    from dreamdiffusion.models.mae import save_eeg_encoder
    from dreamdiffusion.models.original_formats import save_compvis_checkpoint
    from stage2_tiny import (
        CLIP_IMAGE_SIZE,
        ENCODER,
        tiny_clip_model,
        tiny_encoder,
        tiny_sd,
        tiny_sd_configs,
        write_config_dir,
    )

    root = tmp_path_factory.mktemp("stage2_bad")
    sd = tiny_sd(seed=0)
    sd_file = save_compvis_checkpoint(sd.unet, sd.vae, root / "sd.safetensors")
    tiny_clip_model().save_pretrained(root / "clip")
    return [f"sd_path={sd_file}", f"sd_config_dir={write_config_dir(root / 'sd_cfg', *tiny_sd_configs())}",
            f"clip_path={root / 'clip'}", f"eeg_encoder_path={save_eeg_encoder(tiny_encoder(), root / 'enc')}",
            "data.subject=1", "data.image_size=16", f"data.clip_image_size={CLIP_IMAGE_SIZE}",
            f"data.n_times={ENCODER['n_times']}", "epochs=1", "batch_size=4", "trainer.accelerator=cpu",
            "trainer.num_workers=0", "trainer.progress_bar=false"]


@pytest.mark.parametrize("damage, message", [
    ("nan", "holds NaN or Inf inside the time window"),
    ("int", "expected floating point"),
    ("split", "expected an integer"),
    ("image", "cannot be decoded"),
])
def test_stage2_refuses_bad_data_before_training(base, stage2_world, tmp_path, capsys, damage, message):

    content, splits = copy.deepcopy(base["content"]), copy.deepcopy(base["splits"])
    images = base["image_dir"]
    index, _ = _first_trial(content, splits=base["splits"])
    if damage == "nan":
        content["dataset"][index]["eeg"][0, 200] = float("nan")
    elif damage == "int":
        content["dataset"][index]["eeg"] = content["dataset"][index]["eeg"].long()
    elif damage == "split":
        splits["splits"][0]["train"][0] = "1"
    else:
        images = tmp_path / "images"
        shutil.copytree(base["image_dir"], images)
        next(images.rglob("*.JPEG")).write_bytes(b"\xff\xd8\xff")
    eeg, split_file = _variant(tmp_path, base, content, splits)
    out = tmp_path / "run"
    args = [*stage2_world, f"data.eeg_path={eeg}", f"data.splits_path={split_file}", f"data.image_dir={images}",
            f"output_dir={out}"]
    assert run_cli(stage2_main, args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing written: not even config.yaml


def test_skip_bad_files_names_each_skipped_file(tmp_path, caplog):

    corpus = tmp_path / "corpus"
    write_synthetic_pretrain_corpus(corpus, n_files=6, channel_counts=(8,), length_range=(100, 160), seed=0)
    (corpus / "empty.npy").write_bytes(b"")
    np.save(corpus / "ints.npy", np.zeros((8, 100), dtype=np.int32))
    np.save(corpus / "nan.npy", np.full((8, 100), np.nan, dtype=np.float32))
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.root={corpus}", "data.n_channels=8", "data.n_times=64",
            "encoder.n_channels=8", "encoder.n_times=64", "encoder.embed_dim=16", "encoder.depth=1",
            "encoder.num_heads=2", "decoder.decoder_embed_dim=16", "decoder.decoder_depth=1",
            "decoder.decoder_num_heads=2", "batch_size=4", "epochs=1", "warmup_epochs=0", "trainer.accelerator=cpu",
            "trainer.num_workers=0", "trainer.progress_bar=false", "figure_every_n_epochs=0"]
    assert run_cli(stage1_main, args) == 2  # without skip_bad_files: the first bad file, named
    assert not out.exists()
    import logging

    with caplog.at_level(logging.WARNING, logger="dreamdiffusion.dataset"):
        stage1_main([*args, "data.skip_bad_files=true"])
    skipped = dict(line.split("\t") for line in (out / "skipped_files.txt").read_text().splitlines())
    assert {Path(p).name: why for p, why in skipped.items()} == {
        "empty.npy": "is empty (0 bytes)", "ints.npy": "has dtype int32, expected floating point EEG",
        "nan.npy": "contains NaN or Inf values"}
    assert all(f"skipping {p}" in caplog.text for p in skipped)


def test_a_debug_flag_shows_the_traceback_and_a_bug_keeps_it(capsys):
    from dreamdiffusion.core.errors import DataError

    def bad_input(argv):
        raise DataError("file x.pth has no key 'dataset'")

    assert run_cli(bad_input, []) == 2 and "Traceback" not in capsys.readouterr().err
    assert run_cli(bad_input, ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: file x.pth has no key 'dataset'" in err

    def bug(argv):
        raise ZeroDivisionError("a genuine bug")

    with pytest.raises(ZeroDivisionError):  # not turned into exit 2: the traceback stays (exit 1)
        run_cli(bug, [])


def _without_privileges():
    """A command prefix under which file permissions apply: nothing for a normal user; for root, root
    without capabilities (no CAP_DAC_OVERRIDE: a 0555 folder refuses it, while root-owned 0700 homes,
    pyenv's Pythons in /root among them, stay readable), else user nobody (which needs a checkout and a
    Python that other users can read)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores permissions and setpriv is not available to drop them")
    script = REPO_ROOT / "code" / "stage1_pretrain_eeg.py"
    probe_code = f"open({str(script)!r}).close(); import dreamdiffusion"
    failures = []
    for prefix in (["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--"],
                   ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]):
        probe = subprocess.run([*prefix, sys.executable, "-c", probe_code], capture_output=True, text=True)
        if probe.returncode == 0:
            return prefix
        failures.append(probe.stderr.strip().splitlines()[-1:])
    pytest.skip(f"neither root without capabilities nor user nobody can run this checkout ({failures}); "
                "the test needs one of them")


def test_a_read_only_output_folder_is_a_sentence_for_a_non_root_user():
    prefix = _without_privileges()
    root = Path(tempfile.mkdtemp(prefix="dd_readonly_"))
    try:
        root.chmod(0o755)
        corpus = root / "corpus"
        write_synthetic_pretrain_corpus(corpus, n_files=2, channel_counts=(8,), length_range=(100, 160), seed=0)
        for p in [corpus, *corpus.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        cmd = [*prefix, sys.executable, str(REPO_ROOT / "code" / "stage1_pretrain_eeg.py"),
               f"output_dir={locked / 'run'}", f"data.root={corpus}", "data.n_channels=8", "encoder.n_channels=8"]
        env = {**os.environ, "HOME": str(root), "MPLCONFIGDIR": str(root)}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"output_dir={locked / 'run'} is not writable" in result.stderr and "Traceback" not in result.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_data_module_does_not_unpickle_code(tmp_path):
    """A pickle bomb in place of the EEG file is refused, and its command never runs."""
    marker = tmp_path / "ran"

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "eeg.pth"
    with open(path, "wb") as f:
        pickle.dump({"dataset": Bomb()}, f)
    with pytest.raises(DreamDiffusionError, match="refus"):
        imagenet_eeg.load_imagenet_eeg_file(path)
    assert not marker.exists()
