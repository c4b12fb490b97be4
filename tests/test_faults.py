"""Faults survived: every fault a run can meet besides a bad input file (test_bad_input.py has those)
ends in exit 2 with a sentence and no traceback, or - after the same command is run again (stages 1-2:
with resume=true) - in a complete and correct result.

1. kill points inside every checkpoint and export write (the writer, monkeypatched in a forked child,
   SIGKILLs its own process), then resume;
2. output folders: another stage's, other settings, an export folder, a second run at the same time,
   a stale lock;
3. non-finite values: absurd EEG, infinite or absurd settings, a loss that turns NaN mid-run (the
   last good checkpoint is kept, nothing NaN is written);
4. damaged files of our own: model folders, exports without their completion marker, records,
   generation.jsonl, markers, checkpoints, class names;
5. settings a run cannot use (seeds, devices, bootstrap counts, guidance, path lengths), Ctrl-C,
   missing PNGs regenerated, images of other modes and sizes, the umask, grid row names.
The last test prints the counts (faults injected, survived, tracebacks).
"""

import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamdiffusion.core.errors import ConfigError, run_cli
from dreamdiffusion.core.files import COMPLETE_MARKER, atomic_dir, atomic_write_json, is_complete
from dreamdiffusion.core.run_folder import LOCK, MARKER, FolderClaim, claim
from dreamdiffusion.data.common import open_rgb
from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg
from dreamdiffusion.evaluation.stage3 import main as stage3_main
from dreamdiffusion.models.mae import load_eeg_encoder, save_eeg_encoder
from dreamdiffusion.models.original_formats import save_compvis_checkpoint
from dreamdiffusion.train.stage1 import main as stage1_main
from dreamdiffusion.train.stage2 import main as stage2_main
from stage2_tiny import (
    CLIP_IMAGE_SIZE,
    ENCODER,
    IMAGE_SIZE,
    tiny_clip_model,
    tiny_encoder,
    tiny_sd,
    tiny_sd_configs,
    write_config_dir,
)
from test_stage3 import N_SLOTS, build_world

LEDGER: list[tuple[str, str]] = []  # (fault injected, how the run ended)
TRACEBACKS: list[str] = []  # any traceback seen in a run's output (there must be none)


# ---------------------------------------------------------------------------------------------
# Running a stage: in this process, or in a forked child that may be killed


def _cli(main, argv):
    """(exit code, stderr) of `run_cli(main, argv)` in this process."""
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = run_cli(main, [str(a) for a in argv])
    text = err.getvalue()
    if "Traceback" in text:
        TRACEBACKS.append(text)
    return code, text


def refused(fault, main, argv, *fragments):
    """The run ends in exit 2 with one sentence holding `fragments`, and no traceback."""
    code, err = _cli(main, argv)
    last = err.strip().splitlines()[-1] if err.strip() else ""  # (a library's progress bar may precede it)
    assert code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    LEDGER.append((fault, "exit 2: " + last[7:110]))
    return last


def completed(fault, main, argv):
    code, err = _cli(main, argv)
    assert code == 0, err
    LEDGER.append((fault, "completed"))


def in_child(fn, log):
    """Run `fn()` (returning an exit code) in a forked child writing to `log`; ("killed", signal) or
    ("exit", code). Forked, not spawned: the child has torch and the package imported already."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            torch.set_num_threads(1)
            code = fn()
        except BaseException:  # noqa: BLE001 - reported through the log, as a bug
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    text = Path(log).read_text()
    if "Traceback" in text:
        TRACEBACKS.append(text)
    return ("killed", os.WTERMSIG(status)) if os.WIFSIGNALED(status) else ("exit", os.WEXITSTATUS(status))


def kill_self():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(owner, name, when=lambda *a, **k: True, before=True):
    """Replace `owner.name` so that the call for which `when(*args)` holds SIGKILLs the process (before
    or after the real call)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        hit = when(*args, **kwargs)
        if hit and before:
            kill_self()
        out = real(*args, **kwargs)
        if hit:
            kill_self()
        return out

    setattr(owner, name, wrapper)


def nth(predicate, n):
    """A `when` for kill_on_call: true at the n-th call for which `predicate` holds."""
    count = [0]

    def when(*args, **kwargs):
        if predicate(*args, **kwargs):
            count[0] += 1
            return count[0] == n
        return False

    return when


def digest(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).is_file()}


def no_nan_json(folder):
    """No JSON file of the folder holds NaN or Infinity (strict parse)."""
    def refuse(constant):
        raise AssertionError(f"non-finite JSON constant {constant}")

    for path in Path(folder).rglob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# Stage 1


S1 = {"data.n_channels": 8, "data.n_times": 64, "encoder.n_channels": 8, "encoder.n_times": 64,
      "encoder.embed_dim": 32, "encoder.depth": 1, "encoder.num_heads": 4, "decoder.decoder_embed_dim": 16,
      "decoder.decoder_depth": 1, "decoder.decoder_num_heads": 2, "batch_size": 8, "epochs": 2,
      "warmup_epochs": 1, "lr": 1e-3, "trainer.accelerator": "cpu", "trainer.num_workers": 0,
      "trainer.progress_bar": False, "figure_every_n_epochs": 0, "checkpoint_every_n_epochs": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 recordings (3 optimiser steps per epoch at batch 8), amplitude ~10."""
    folder = tmp_path_factory.mktemp("fault_corpus")
    rng = np.random.default_rng(0)
    for i in range(24):
        eeg = 10 * np.sin(np.arange(100) / 7 + rng.uniform(0, 6, (8, 1))) + rng.standard_normal((8, 100))
        np.save(folder / f"rec{i:02d}.npy", eeg.astype(np.float32))
    return folder


def s1(corpus, out, **extra):
    return [f"{k}={v}" for k, v in {**S1, "data.root": corpus, "output_dir": out, **extra}.items()]


def encoder_of_checkpoint(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model.encoder."):]: v for k, v in state.items() if k.startswith("model.encoder.")}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The encoder of an uninterrupted stage-1 run: a resumed run must end with the same weights."""
    out = tmp_path_factory.mktemp("fault_stage1") / "uninterrupted"
    assert _cli(stage1_main, s1(corpus, out))[0] == 0
    return encoder_of_checkpoint(out / "checkpoints" / "last.ckpt")


def check_stage1_result(out, uninterrupted=None):
    """A finished stage-1 folder: both epochs, its export complete and equal to last.ckpt's encoder
    (and to an uninterrupted run's, when given: resume is exact)."""
    assert is_complete(out / "eeg_encoder") and not (out / LOCK).exists()
    exported = load_eeg_encoder(out / "eeg_encoder").state_dict()
    trained = encoder_of_checkpoint(out / "checkpoints" / "last.ckpt")
    assert all(torch.equal(exported[k], v) for k, v in trained.items() if k in exported)
    if uninterrupted is not None:
        assert all(torch.equal(uninterrupted[k], v) for k, v in trained.items())
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    no_nan_json(out)


def _half_save(path_name, n):
    """torch.save that writes half of the n-th checkpoint named `path_name` and SIGKILLs the process."""
    real = torch.save
    count = [0]

    def save(obj, f, *args, **kwargs):
        if Path(str(f)).name.startswith(f".{path_name}."):
            count[0] += 1
            if count[0] == n:
                buffer = io.BytesIO()
                real(obj, buffer)
                Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                kill_self()
        return real(obj, f, *args, **kwargs)

    torch.save = save


def _is_export_swap(src, dst):  # atomic_dir's final rename: a finished temporary folder onto eeg_encoder/
    return Path(src).is_dir() and Path(src).name.endswith(".tmp") and Path(dst).name == "eeg_encoder"


STAGE1_KILLS = {
    "half of the epoch-2 last.ckpt written": lambda: _half_save("last.ckpt", 2),
    "epoch-2 last.ckpt written, not yet renamed": lambda: kill_on_call(
        os, "replace", nth(lambda src, dst: Path(dst).name == "last.ckpt", 2)),
    "export: weights written, config.json not": lambda: kill_on_call(
        sys.modules["dreamdiffusion.models.mae"], "atomic_write_json"),
    "export: complete in its temporary folder, not renamed": lambda: kill_on_call(os, "replace", _is_export_swap),
}


@pytest.mark.parametrize("kill", sorted(STAGE1_KILLS))
def test_stage1_killed_inside_a_checkpoint_or_export_write_resumes_to_a_complete_result(corpus, uninterrupted, tmp_path,
                                                                                         kill):
    out = tmp_path / "run"

    def child():
        STAGE1_KILLS[kill]()
        return run_cli(stage1_main, s1(corpus, out))

    assert in_child(child, tmp_path / "child.log") == ("killed", signal.SIGKILL)
    assert not (out / "eeg_encoder").exists()  # never half an export under the final name
    if "epoch-2" in kill:  # the previous checkpoint is kept as it was
        assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    completed(f"stage 1 SIGKILL: {kill}; resume=true", stage1_main, s1(corpus, out, resume="true"))
    check_stage1_result(out, uninterrupted)


def test_stage1_killed_while_replacing_an_earlier_export(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert _cli(stage1_main, s1(corpus, out))[0] == 0

    def child():  # the same run again: its new export replaces the earlier one
        kill_on_call(os, "replace", _is_export_swap)
        return run_cli(stage1_main, s1(corpus, out))

    assert in_child(child, tmp_path / "child.log") == ("killed", signal.SIGKILL)
    assert not (out / "eeg_encoder").exists() or is_complete(out / "eeg_encoder")
    completed("stage 1 SIGKILL while replacing an earlier export; resume=true", stage1_main,
              s1(corpus, out, resume="true"))
    check_stage1_result(out, uninterrupted)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the killed run's leftovers are gone


def test_stage1_ctrl_c_is_one_line_and_the_folder_resumes(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "child.log"

    def child():  # Ctrl-C in the second epoch
        from dreamdiffusion.train.stage1 import MAEPretrainModule

        real, calls = MAEPretrainModule.training_step, [0]

        def step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, *args, **kwargs)

        MAEPretrainModule.training_step = step
        return run_cli(stage1_main, s1(corpus, out))

    assert in_child(child, log) == ("exit", 130)
    lines = [line for line in log.read_text().splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in log.read_text()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    LEDGER.append(("stage 1 Ctrl-C mid-epoch", "exit 130: " + lines[0][:90]))
    completed("stage 1 Ctrl-C; resume=true", stage1_main, s1(corpus, out, resume="true"))
    check_stage1_result(out, uninterrupted)


def test_stage1_non_finite_values_stop_the_run_and_keep_the_last_good_checkpoint(corpus, tmp_path):
    absurd = tmp_path / "absurd"
    shutil.copytree(corpus, absurd)
    np.save(absurd / "rec00.npy", np.full((8, 100), 1e30, np.float32))
    refused("stage 1: EEG of values ~1e30", stage1_main, s1(absurd, tmp_path / "a"), "amplitude rule",
            "rec00.npy")
    volts = tmp_path / "volts"
    shutil.copytree(corpus, volts)
    np.save(volts / "rec01.npy", (np.load(corpus / "rec01.npy") * 1e-6).astype(np.float32))
    refused("stage 1: EEG in volts", stage1_main, s1(volts, tmp_path / "v"), "multiplied by 1e6")
    refused("stage 1: lr=inf", stage1_main, s1(corpus, tmp_path / "b", lr="inf"), "lr=inf is not a finite number")
    refused("stage 1: lr=1e30 from the start", stage1_main, s1(corpus, tmp_path / "c", lr=1e30),
            "training stopped at step", "Likely causes", "no epoch had finished")
    assert not (tmp_path / "c" / "eeg_encoder").exists()

    out = tmp_path / "run"
    assert _cli(stage1_main, s1(corpus, out, stop_after_epochs=1))[0] == 0
    kept = digest(out / "checkpoints", ["last.ckpt"])
    err = refused("stage 1: data.scale=1e30 from the second epoch", stage1_main,
                  s1(corpus, out, resume="true", overwrite="true", **{"data.scale": 1e30}),
                  "training stopped at step 3 (epoch 1)", "the training loss is not finite", "is kept")
    assert "last.ckpt" in err and digest(out / "checkpoints", ["last.ckpt"]) == kept
    no_nan_json(out)
    completed("stage 1 after the NaN stop: resume with the earlier settings", stage1_main,
              s1(corpus, out, resume="true", overwrite="true"))
    check_stage1_result(out)


def test_stage1_folders_of_other_runs_are_refused_before_anything_is_written(corpus, tmp_path):
    out = tmp_path / "run"
    assert _cli(stage1_main, s1(corpus, out))[0] == 0
    files = ["config.yaml", "metrics.json", "results.md", "checkpoints/last.ckpt", MARKER]
    before = digest(out, files)
    refused("stage 1 rerun with another lr", stage1_main, s1(corpus, out, lr=2e-3), "made with lr=0.001, not 0.002",
            "overwrite=true")
    refused("stage 2 pointed at a stage-1 folder", stage2_main, [f"output_dir={out}"], "belongs to a stage 1 run")
    refused("stage 3 pointed at a stage-1 folder", stage3_main, [f"output_dir={out}", "phase=score"],
            "belongs to a stage 1 run")
    refused("stage 1 pointed at its own export", stage1_main, s1(corpus, out / "eeg_encoder"), "is an export folder")
    assert digest(out, files) == before  # config.yaml included
    (out / MARKER).unlink()  # a folder written before markers: its files still say whose it is
    refused("stage 2 pointed at a stage-1 folder without a marker", stage2_main, [f"output_dir={out}"],
            "belongs to a stage 1 run")
    (out / MARKER).write_text("{not json")
    refused("stage 1 rerun over a damaged marker", stage1_main, s1(corpus, out), MARKER, "is damaged")
    (out / MARKER).unlink()
    completed("stage 1 rerun over an unmarked folder of its own (adopted)", stage1_main, s1(corpus, out))
    assert json.loads((out / MARKER).read_text())["stage"] == "stage1"
    completed("stage 1 with overwrite=true and another lr", stage1_main, s1(corpus, out, lr=2e-3, overwrite="true"))
    assert json.loads((out / MARKER).read_text())["settings"]["lr"] == 2e-3
    check_stage1_result(out)


def _slow_run(argv):
    """Stage 1 whose run holds its folder 3 s longer (so that a run started with it finds it taken)."""
    stage1 = sys.modules["dreamdiffusion.train.stage1"]
    real_check = stage1.check_config

    def slow_check(cfg):
        time.sleep(3)
        return real_check(cfg)

    stage1.check_config = slow_check
    return run_cli(stage1_main, argv)


def test_a_second_run_on_a_folder_is_refused_and_a_stale_lock_is_taken_over(corpus, tmp_path):
    out = tmp_path / "run"
    # two runs started at the same moment: one runs, the other is refused with a sentence
    read, write = os.pipe()
    pids = []
    for n in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(tmp_path / f"run{n}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                os.read(read, 1)  # both wait for the start
                code = _slow_run(s1(corpus, out))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    os.write(write, b"go")
    codes = sorted(os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in pids)
    logs = [(tmp_path / f"run{n}.log").read_text() for n in range(2)]
    assert codes == [0, 2] and not any("Traceback" in text for text in logs), logs
    assert any("is in use by another run" in text for text in logs)
    LEDGER.append(("two stage-1 runs started on one output_dir", "one completed, the other exit 2"))
    check_stage1_result(out)

    # a run holding the folder (here: a process that claimed it and waits)
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        with claim(FolderClaim(out, None, False), "stage1"):
            os.write(ready[1], b"1")
            os.read(release[0], 1)
        os._exit(0)
    os.read(ready[0], 1)
    refused("stage 1 on a folder another live run holds", stage1_main, s1(corpus, out, resume="true"),
            "is in use by another run", f"pid {pid}")
    os.write(release[1], b"1")
    os.waitpid(pid, 0)
    assert not (out / LOCK).exists()  # released on exit

    # a lock left by a run that was killed: stale, taken over
    pid = os.fork()
    if pid == 0:
        with claim(FolderClaim(out, None, False), "stage1"):
            kill_self()
    os.waitpid(pid, 0)
    assert json.loads((out / LOCK).read_text())["pid"] == pid
    completed("stage 1 on a folder whose lock's process was killed", stage1_main, s1(corpus, out, resume="true"))
    assert not (out / LOCK).exists()


def test_damaged_stage1_files_are_sentences(corpus, tmp_path):
    out = tmp_path / "run"
    assert _cli(stage1_main, s1(corpus, out))[0] == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    refused("stage 1 resume from a truncated last.ckpt", stage1_main, s1(corpus, out, resume="true"),
            "cannot be read as a Lightning checkpoint")


# ---------------------------------------------------------------------------------------------
# Stage 2


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_stage2")
    data = write_synthetic_imagenet_eeg(root / "data", n_classes=4, images_per_class=5, n_subjects=1,
                                        image_size=IMAGE_SIZE, seed=0)
    sd = tiny_sd(seed=0)
    sd_file = save_compvis_checkpoint(sd.unet, sd.vae, root / "sd" / "tiny-v1-5.safetensors")
    tiny_clip_model().save_pretrained(root / "clip")
    encoder = save_eeg_encoder(tiny_encoder(), root / "eeg_encoder")
    args = [f"data.eeg_path={data['eeg_path']}", f"data.splits_path={data['splits_path']}",
            f"data.image_dir={data['image_dir']}", "data.subject=1", f"data.image_size={IMAGE_SIZE}",
            f"data.clip_image_size={CLIP_IMAGE_SIZE}", f"data.n_times={ENCODER['n_times']}", f"sd_path={sd_file}",
            f"sd_config_dir={write_config_dir(root / 'sd_config', *tiny_sd_configs())}", f"clip_path={root / 'clip'}",
            f"eeg_encoder_path={encoder}", "batch_size=4", "epochs=2", "val_every_n_epochs=1",
            "sample_every_n_epochs=0", "n_val_samples=2", "val_inference_steps=2", "memory_check=false",
            "trainer.accelerator=cpu", "trainer.num_workers=0", "trainer.progress_bar=false",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    return {"root": root, "args": args, "encoder": encoder}


def s2(world2, out, *extra):
    return [*world2["args"], f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def stage2_run(world2):
    out = world2["root"] / "finished"
    assert _cli(stage2_main, s2(world2, out))[0] == 0
    return out


def check_stage2_result(out, uninterrupted=None):
    """A finished stage-2 folder: its model/ complete, loadable, and exported from the checkpoint its
    selection.json names (and equal to an uninterrupted run's export, when given)."""
    from dreamdiffusion.evaluation.generation import load_model

    model = out / "model"
    assert is_complete(model) and not (out / LOCK).exists()
    selection = json.loads((model / "selection.json").read_text())
    chosen = out / "checkpoints" / ("best.ckpt" if selection["export"] == "best" else "last.ckpt")
    assert torch.load(chosen, map_location="cpu", weights_only=True)["epoch"] == selection["epoch"]
    assert json.loads((model / "training.json").read_text())["config"]["epochs"] == 2
    pipe, _, recorded = load_model(model, None)
    assert "val" in recorded
    conditioner = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
    weight = conditioner["model.conditioner.dim_mapper.weight"]
    assert torch.equal(pipe.conditioner.dim_mapper.weight.detach().cpu(), weight)
    if uninterrupted is not None:
        reference = load_model(uninterrupted / "model", None)[0].conditioner.state_dict()
        assert all(torch.equal(reference[k], v) for k, v in pipe.conditioner.state_dict().items())
    no_nan_json(out)


STAGE2_KILLS = {
    "export: UNet written, VAE not (the issue's case)": lambda: kill_on_call(
        sys.modules["diffusers"].AutoencoderKL, "save_pretrained"),
    "export: weights written, selection.json not": lambda: kill_on_call(
        sys.modules["dreamdiffusion.train.stage2"], "atomic_write_json",
        lambda path, obj: Path(path).name == "selection.json"),
    "half of the epoch-2 last.ckpt written": lambda: _half_save("last.ckpt", 2),
}


@pytest.mark.parametrize("kill", sorted(STAGE2_KILLS))
def test_stage2_killed_inside_a_checkpoint_or_export_write_resumes_to_a_complete_result(world2, stage2_run, tmp_path,
                                                                                         kill):
    out = tmp_path / "run"

    def child():
        STAGE2_KILLS[kill]()
        return run_cli(stage2_main, s2(world2, out))

    assert in_child(child, tmp_path / "child.log") == ("killed", signal.SIGKILL)
    assert not (out / "model").exists()
    refused(f"stage 3 on the model of a stage-2 run killed ({kill})", stage3_main,
            [*world2["args"][:3], f"model={out / 'model'}", f"output_dir={tmp_path / 'eval'}", "phase=generate"],
            f"model={out / 'model'} not found")
    completed(f"stage 2 SIGKILL: {kill}; resume=true", stage2_main, s2(world2, out, "resume=true"))
    # killed in its export, the run had finished training: its export is the uninterrupted run's
    check_stage2_result(out, stage2_run if kill.startswith("export") else None)


def test_stage2_non_finite_values_and_settings_it_cannot_use(world2, tmp_path):
    refused("stage 2: clip_temperature=0", stage2_main, s2(world2, tmp_path / "a", "clip_loss=contrastive",
                                                          "clip_temperature=0"), "clip_temperature must be > 0")
    refused("stage 2: val_inference_steps=0", stage2_main, s2(world2, tmp_path / "b", "val_inference_steps=0"),
            "val_inference_steps must be in [1, 1000]")
    refused("stage 2: lr=nan", stage2_main, s2(world2, tmp_path / "c", "lr=nan"), "lr=nan is not a finite number")
    refused("stage 2: devices=abc", stage2_main, s2(world2, tmp_path / "d", "trainer.devices=abc"),
            "trainer.devices must be")
    out = tmp_path / "e"
    refused("stage 2: lr=1e30 trains a NaN model", stage2_main, s2(world2, out, "lr=1e30"),
            "training stopped at step", "Nothing was exported")
    assert not (out / "model").exists() and not [p for p in out.iterdir() if p.name.startswith(".model")]
    no_nan_json(out)
    for name in "abcd":
        assert not (tmp_path / name).exists()  # refused before anything is written


def test_stage2_refuses_an_incomplete_or_damaged_encoder_export(world2, tmp_path):
    run = tmp_path / "stage1_run"  # an encoder export inside a run folder, without its completion marker
    save_eeg_encoder(tiny_encoder(), run / "eeg_encoder")
    atomic_write_json(run / MARKER, {"stage": "stage1", "settings": None})
    refused("stage 2 on an encoder export without its completion marker", stage2_main,
            s2(world2, tmp_path / "a", f"eeg_encoder_path={run / 'eeg_encoder'}"), "incomplete", "resume=true")
    broken = tmp_path / "broken"
    shutil.copytree(world2["encoder"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    refused("stage 2 on a truncated encoder weight file", stage2_main,
            s2(world2, tmp_path / "b", f"eeg_encoder_path={broken}"), "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Stage 3


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("fault_stage3"))
    world["args"] += ["max_trials=3", "metrics=[n_way,mse,retrieval]"]
    return world


def s3(world3, out, *extra):
    return [*world3["args"], f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def stage3_run(world3):
    out = world3["root"] / "finished"
    assert _cli(stage3_main, s3(world3, out))[0] == 0
    return out


def images_of(out):
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_stage3_refuses_other_folders_and_changed_settings_before_writing(world3, stage3_run, stage2_run, tmp_path):
    files = ["config.yaml", "metrics.json", "results.md", "generation.json"]
    before = digest(stage3_run, files)
    refused("stage 3 rerun with another seed", stage3_main, s3(world3, stage3_run, "seed=7"),
            "made with seed=2022, not 7")
    refused("stage 3 rerun with another sampler", stage3_main, s3(world3, stage3_run, "sampler=ddim"),
            "made with sampler='plms', not 'ddim'")
    assert digest(stage3_run, files) == before  # config.yaml is not rewritten by a refused run
    stage2_files = ["config.yaml", "metrics.json", "results.md", "checkpoints/last.ckpt"]
    before = digest(stage2_run, stage2_files)
    refused("stage 3 pointed at a stage-2 folder", stage3_main, s3(world3, stage2_run), "belongs to a stage 2 run")
    refused("stage 3 pointed at a stage-2 model export", stage3_main, s3(world3, stage2_run / "model"),
            "is an export folder")
    assert digest(stage2_run, stage2_files) == before


@pytest.mark.parametrize("setting, message", [
    ("seed=-1", "seed must be an integer in [0, 4294967295]"),
    ("seed=99999999999", "seed must be an integer in [0, 4294967295]"),
    ("devices=abc", "devices must be"),
    ("device=gpu0", "device must be auto, cpu, cuda"),
    ("bootstrap_samples=0", "bootstrap_samples must be >= 1"),
    ("guidance_scale=nan", "guidance_scale=nan is not a finite number"),
    ("precision=fp8", "precision must be one of"),
    ("output_dir=" + "x" * 300, "allows 255 per name"),
])
def test_stage3_settings_it_cannot_use_are_sentences_before_any_work(world3, tmp_path, setting, message):
    out = tmp_path / "run"
    argv = s3(world3, out, setting) if not setting.startswith("output_dir") else [*world3["args"], setting]
    refused(f"stage 3: {setting[:40]}", stage3_main, argv, message)
    assert not out.exists()


def test_stage3_regenerates_missing_or_damaged_trials_on_resume(world3, stage3_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stage3_run, out)
    (out / MARKER).unlink()  # a copy is a folder of its own (written before markers: adopted)
    reference = images_of(stage3_run)
    (out / "images" / "test1-2.png").unlink()
    png = out / "images" / "test2-0.png"
    png.write_bytes(png.read_bytes()[:100])
    (out / "records" / "test0.json").write_text("{damaged")
    completed("stage 3 rerun after a deleted PNG, a truncated PNG and a damaged record", stage3_main, s3(world3, out))
    assert images_of(out) == reference  # regenerated byte-identical
    for name in ("metrics.json", "generation.jsonl"):
        no_nan_json(out)
        assert (out / name).is_file()


def test_stage3_damaged_files_of_our_own_are_sentences(world3, stage3_run, tmp_path):
    out = tmp_path / "scored"
    shutil.copytree(stage3_run, out)
    (out / MARKER).unlink()
    (out / "generation.jsonl").write_text('{"index": 0\n')
    refused("stage 3 score with a damaged generation.jsonl", stage3_main, s3(world3, out, "phase=score"),
            "generation.jsonl", "phase=generate")

    def damaged_model(name, damage):
        model = tmp_path / name
        shutil.copytree(world3["root"] / "model", model)
        damage(model)
        return s3(world3, tmp_path / f"eval_{name}", f"model={model}", "phase=generate")

    def truncate(model):
        weights = next((model / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:300])

    def unknown_schedule(model):
        config = model / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "beta_schedule": "no_such_schedule"}))

    refused("stage 3 on a model folder with a truncated UNet file", stage3_main, damaged_model("trunc", truncate),
            "trunc", "rerun stage 2")
    refused("stage 3 on a model folder with a broken model_index.json", stage3_main,
            damaged_model("index", lambda m: (m / "model_index.json").write_text("{")), "rerun stage 2")
    refused("stage 3 on a model folder with an unknown noise schedule", stage3_main,
            damaged_model("sched", unknown_schedule), "rerun stage 2")
    refused("stage 3 on a model folder with a broken selection.json", stage3_main,
            damaged_model("sel", lambda m: (m / "selection.json").write_text("[1,")), "selection.json")
    run = tmp_path / "stage2_run"  # a model export in a run folder without its completion marker
    shutil.copytree(world3["root"] / "model", run / "model")
    atomic_write_json(run / MARKER, {"stage": "stage2", "settings": None})
    refused("stage 3 on a stage-2 export without its completion marker", stage3_main,
            s3(world3, tmp_path / "eval_inc", f"model={run / 'model'}"), "incomplete", COMPLETE_MARKER)


def test_stage3_refuses_eeg_of_an_absurd_scale_before_writing(world3, tmp_path):
    content = torch.load(world3["data"]["eeg_path"], weights_only=True)
    for trial in content["dataset"]:
        trial["eeg"] = trial["eeg"] * 1e30
    torch.save(content, tmp_path / "eeg.pth")
    out = tmp_path / "run"
    refused("stage 3: EEG of values ~1e30", stage3_main, s3(world3, out, f"data.eeg_path={tmp_path / 'eeg.pth'}"),
            "amplitude rule")
    assert not out.exists()


def test_stage3_class_names_shorter_than_the_classifier(world3, tmp_path):
    classifier = tmp_path / "classifier"
    shutil.copytree(world3["root"] / "classifier", classifier)
    meta = json.loads((classifier / "classifier.json").read_text())
    (classifier / "classifier.json").write_text(json.dumps({**meta, "class_names": meta["class_names"][:4]}))
    refused("stage 3 with a classifier whose class names are fewer than its classes", stage3_main,
            s3(world3, tmp_path / "run", f"classifier={classifier}"), "4 class names for a model of 10 classes")


def test_stage3_ctrl_c_is_one_line_and_the_rerun_completes(world3, stage3_run, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "child.log"

    def child():
        generation = sys.modules.get("dreamdiffusion.evaluation.generation") or __import__(
            "dreamdiffusion.evaluation.generation", fromlist=["save_png"])
        real, calls = generation.save_png, [0]

        def save(path, array):
            calls[0] += 1
            if calls[0] == N_SLOTS + 3:  # in the second trial
                os.kill(os.getpid(), signal.SIGINT)
            return real(path, array)

        generation.save_png = save
        return run_cli(stage3_main, s3(world3, out))

    assert in_child(child, log) == ("exit", 130)
    text = log.read_text()
    assert len([line for line in text.splitlines() if "interrupted" in line]) == 1 and "Traceback" not in text
    LEDGER.append(("stage 3 Ctrl-C during generation", "exit 130, one line"))
    completed("stage 3 after Ctrl-C: the same command again", stage3_main, s3(world3, out))
    assert images_of(out) == images_of(stage3_run)


def test_stage3_scores_images_by_their_mode_and_refuses_mixed_sizes(stage3_run, world3, tmp_path):
    eight, sixteen = tmp_path / "eight" / "images", tmp_path / "sixteen" / "images"
    for folder in (eight, sixteen):
        shutil.copytree(stage3_run / "images", folder)
    grey = np.asarray(Image.open(eight / "test0-1.png").convert("L"))
    Image.fromarray(grey).save(eight / "test0-1.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen / "test0-1.png")  # the same picture, 16-bit
    assert Image.open(sixteen / "test0-1.png").mode.startswith("I")
    assert np.array_equal(np.asarray(open_rgb(sixteen / "test0-1.png")), np.asarray(open_rgb(eight / "test0-1.png")))
    reports = []
    for folder in (eight, sixteen):
        code, err = _cli(stage3_main, s3(world3, folder.parent / "scores", "phase=score", f"images_dir={folder}",
                                          "metrics=[mse,ssim]"))
        assert code == 0, err
        reports.append(json.loads((folder.parent / "scores" / "metrics.json").read_text())["metrics"])
    assert reports[0] == reports[1]
    LEDGER.append(("stage 3 scoring a 16-bit PNG", "scored as its 8-bit picture"))
    mixed = tmp_path / "mixed" / "images"
    shutil.copytree(stage3_run / "images", mixed)
    for k in range(N_SLOTS + 1):
        Image.open(mixed / f"test1-{k}.png").resize((32, 32)).save(mixed / f"test1-{k}.png")
    refused("stage 3 scoring trials of different sizes", stage3_main,
            s3(world3, tmp_path / "mixed" / "scores", "phase=score", f"images_dir={mixed}", "metrics=[mse]"),
            "the images of trial 1 are 32x32 but those of trial 0 are 16x16")


# ---------------------------------------------------------------------------------------------
# Files and names


def test_files_follow_the_umask_and_json_holds_no_nan(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"loss": float("nan"), "rows": [1.0, float("inf")]})
        with atomic_dir(tmp_path / "export") as folder:
            (folder / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o750
    saved = json.loads((tmp_path / "a.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["loss"] is None and saved["rows"] == [1.0, None]
    assert saved["non_finite_values"]["where"] == ["loss: nan", "rows[1]: inf"]
    LEDGER.append(("a NaN and an Inf written to JSON", "written as null, with where and why"))
    LEDGER.append(("files written under umask 027", "0640 files, 0750 export folder"))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ""])
def test_grid_row_names_are_plain_names(tmp_path, name):
    from dreamdiffusion.tools.grid import load_grid

    (tmp_path / "grid.yaml").write_text("title: t\noutputs: out\nresults: res\n")
    (tmp_path / "row.yaml").write_text(f"name: '{name}'\nlabel: a row\n")
    with pytest.raises(ConfigError, match="is not a plain name"):
        load_grid(tmp_path)
    LEDGER.append((f"grid row named {name!r}", "ConfigError (exit 2 from the CLI)"))


def test_zz_fault_counts():
    """The summary: every fault injected above was survived, with no traceback."""
    assert LEDGER and not TRACEBACKS, TRACEBACKS[:1]
    print(f"\nfault suite: {len(LEDGER)} faults injected, {len(LEDGER)} survived, {len(TRACEBACKS)} tracebacks")
    for fault, outcome in LEDGER:
        print(f"  - {fault}: {outcome}")
