"""Launching like Lightning: under torchrun / SLURM the stages take the launcher's process counts
(`devices` need not repeat them), a contradiction is one sentence and exit 2, and Fabric's refusal of
a setting is a sentence too. The real thing: stage 3 under `torchrun --nproc_per_node 2` on the CPU
(gloo) without `devices=`, its images byte-identical to one process's."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from dreamdiffusion.config import STAGES
from dreamdiffusion.core.errors import ConfigError, run_cli
from dreamdiffusion.core.launch import Launcher, detect_launcher, launcher_devices
from dreamdiffusion.evaluation import stage3
from dreamdiffusion.train import stage1
from dreamdiffusion.train.lightning import build_trainer
from test_stage3 import build_world

LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                      "NODE_RANK", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME",
                      "SLURM_PROCID")
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES},
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}


@pytest.fixture
def env(monkeypatch):
    """No launcher in the environment, whatever runs the tests (torchrun's and SLURM's variables unset)."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _as_torchrun(env, world, per_node):
    env.setenv("TORCHELASTIC_RUN_ID", "test")  # what torch.distributed.is_torchelastic_launched() reads
    for name, value in (("WORLD_SIZE", world), ("LOCAL_WORLD_SIZE", per_node), ("RANK", 0), ("LOCAL_RANK", 0)):
        env.setenv(name, str(value))


def test_without_a_launcher_the_settings_are_kept(env):
    assert detect_launcher() is None
    assert launcher_devices(4, 2) == (4, 2) and launcher_devices("auto", 1) == ("auto", 1)


def test_torchrun_counts_are_taken_and_a_contradiction_is_a_sentence(env):
    _as_torchrun(env, world=4, per_node=2)
    assert detect_launcher() == Launcher("torchrun", 2, 2)
    assert launcher_devices(1, 1) == (2, 2)  # the defaults: the launcher's counts
    assert launcher_devices("auto", 2) == (2, 2) and launcher_devices(-1, 1) == (2, 2)
    assert launcher_devices([0, 1], 1) == ([0, 1], 2) and launcher_devices("0,1", 1) == ("0,1", 2)  # agreeing ids
    with pytest.raises(ConfigError, match=r"trainer.devices=4 but torchrun started 2 process\(es\) per node"):
        launcher_devices(4, 1, "trainer.")
    with pytest.raises(ConfigError, match=r"num_nodes=3 but torchrun runs on 2 node\(s\)"):
        launcher_devices(1, 3)


def test_slurm_counts_are_taken(env):
    for name, value in (("SLURM_NTASKS", "4"), ("SLURM_NNODES", "2"), ("SLURM_NTASKS_PER_NODE", "2(x2)"),
                        ("SLURM_JOB_NAME", "train")):
        env.setenv(name, value)
    assert detect_launcher() == Launcher("SLURM", 2, 2) and launcher_devices(1, 1) == (2, 2)
    with pytest.raises(ConfigError, match=r"devices=8 but SLURM started 2"):
        launcher_devices(8, 2)
    env.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's rule: an interactive allocation launches nothing
    assert detect_launcher() is None


def test_the_stage_trainer_takes_the_world_size_from_torchrun(env, tmp_path):
    _as_torchrun(env, world=2, per_node=2)
    cfg = STAGES["stage1"].build_config(overrides=["trainer.accelerator=cpu"])
    trainer = build_trainer(cfg, tmp_path, [])
    assert trainer.world_size == 2 and trainer.num_devices == 2 and trainer.num_nodes == 1
    # a contradiction stops the stage CLI before any work: one sentence, exit 2
    assert run_cli(stage1.main, ["trainer.devices=3", f"output_dir={tmp_path / 'never'}"]) == 2
    assert not (tmp_path / "never").exists()


def test_fabrics_refusal_of_a_setting_is_a_sentence(world, tmp_path, capsys):
    code = run_cli(stage3.main, [*world["args"], f"output_dir={tmp_path / 'out'}", "devices=2", "device=cpu",
                                 "strategy=no_such_strategy", "phase=generate"])
    err = capsys.readouterr().err
    assert code == 2 and "invalid launch settings" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# The real launcher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("launch"))
    world["args"] = [*world["args"], "metrics=[n_way,mse]", "device=cpu"]
    return world


def _torchrun(world, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(STAGES["stage3"].script_path), *world["args"], f"output_dir={out}", *extra]
    return subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_torchrun_two_processes_without_devices_match_one_process(world):
    one = world["root"] / "one_process"
    report = stage3.main([*world["args"], f"output_dir={one}"])
    two = world["root"] / "torchrun"
    result = _torchrun(world, two)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads((two / "generation.json").read_text())["world_size"] == 2
    n_trials, n_slots = report["protocol"]["n_trials"], report["protocol"]["num_images_per_eeg"]
    for i in range(n_trials):
        for k in range(n_slots + 1):
            assert (one / "images" / f"test{i}-{k}.png").read_bytes() == (two / "images" / f"test{i}-{k}.png").read_bytes()
    metrics = [json.loads((run / "metrics.json").read_text())["metrics"] for run in (one, two)]
    assert metrics[0] == metrics[1]


def test_torchrun_with_contradicting_devices_stops_with_a_sentence(world):
    result = _torchrun(world, world["root"] / "contradiction", "devices=3")
    assert result.returncode != 0
    assert "error: devices=3 but torchrun started 2 process(es) per node" in result.stderr, result.stderr[-3000:]
