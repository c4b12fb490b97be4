"""Stage 3 at scale, through the real script in subprocesses: killed with SIGKILL at a random moment and
re-run, and sharded over 2 CPU processes (gloo) - the images byte-identical to one uninterrupted
process, the metrics identical."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from dreamdiffusion.config import STAGES
from test_stage3 import build_world

SCRIPT = str(STAGES["stage3"].script_path)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("stage3_scale"))
    # more steps and one trial per batch, so that a kill lands in the middle of the run
    world["args"] = [a for a in world["args"] if not a.startswith(("num_inference_steps", "batch_size"))]
    world["args"] += ["num_inference_steps=12", "batch_size=1", "metrics=[n_way,mse,ssim,retrieval]"]
    return world


def _script(world, out, *extra, timeout=300):
    cmd = [sys.executable, SCRIPT, *world["args"], f"output_dir={out}", *extra]
    result = subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["root"] / "uninterrupted"
    return out, _script(world, out)


def _same_images(a, b, n_trials, n_slots):
    for i in range(n_trials):
        for k in range(n_slots + 1):
            assert (a / "images" / f"test{i}-{k}.png").read_bytes() == (b / "images" / f"test{i}-{k}.png").read_bytes(), (i, k)


def _scores(report):
    return json.dumps({"metrics": report["metrics"], "trials": report["trials"]}, sort_keys=True)


def test_sigkill_then_rerun_gives_the_uninterrupted_images_and_metrics(world, uninterrupted):
    reference, report = uninterrupted
    n = report["protocol"]["n_trials"]
    out = world["root"] / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, *world["args"], f"output_dir={out}"], env=ENV, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        records = list((out / "records").glob("test*.json")) if (out / "records").is_dir() else []
        if len(records) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "records").glob("test*.json")))
    assert 2 <= done < n, done  # killed in the middle
    resumed = _script(world, out)
    _same_images(out, reference, n, report["protocol"]["num_images_per_eeg"])
    assert _scores(resumed) == _scores(report)


def test_two_processes_shard_the_trials_and_match_one(world, uninterrupted):
    reference, report = uninterrupted
    out = world["root"] / "two_processes"
    sharded = _script(world, out, "devices=2", "device=cpu", "strategy=ddp")
    _same_images(out, reference, report["protocol"]["n_trials"], report["protocol"]["num_images_per_eeg"])
    assert _scores(sharded) == _scores(report)
    assert json.loads((out / "generation.json").read_text())["world_size"] == 2
