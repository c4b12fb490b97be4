"""Processes started by a launcher: the `devices` / `num_nodes` that agree with torchrun or SLURM.

Under `torchrun --nproc_per_node N` (or `srun` with `--ntasks-per-node N`) the launcher has already
said how many processes there are; Lightning and Fabric still want `devices` x `num_nodes` to repeat
it and stop with a traceback when they do not. Here the launcher's counts are taken, as Lightning's
own environment plugins detect them: `devices` left at 1 (the default), "auto" or -1 becomes the
launcher's processes per node, `num_nodes` left at 1 its node count. A value that says otherwise
(`devices=4` under `torchrun --nproc_per_node 2`) is a ConfigError naming both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from dreamdiffusion.core.errors import ConfigError

logger = logging.getLogger(__name__)

# `devices` values that leave the count to the launcher: the default, and Lightning's "all of them".
UNSET_DEVICES = (1, -1, "auto", "-1")


@dataclass(frozen=True)
class Launcher:
    name: str  # how the user started the processes, for the messages
    devices: int  # processes per node
    num_nodes: int


def detect_launcher() -> Launcher | None:
    """The launcher that started this process (torchrun, or SLURM's srun), with its process counts;
    None for a plain `python` start (Lightning / Fabric then start the processes themselves)."""
    if TorchElasticEnvironment.detect():
        world = int(os.environ["WORLD_SIZE"])
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return Launcher("torchrun", per_node, max(1, world // per_node))
    if SLURMEnvironment.detect():
        tasks, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_NNODES", "1"))
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or max(1, tasks // nodes)
        return Launcher("SLURM", per_node, nodes)
    return None


def device_count(devices: Any) -> int | None:
    """How many devices a `devices` value names; None for "all of them" (-1, "auto")."""
    if isinstance(devices, int):
        return None if devices == -1 else devices
    if isinstance(devices, str):
        return None if devices in ("auto", "-1") else len([d for d in devices.split(",") if d.strip()])
    return len(devices)


def launcher_devices(devices: Any, num_nodes: int, prefix: str = "") -> tuple[Any, int]:
    """(devices, num_nodes) for Lightning / Fabric: as given when no launcher started this process,
    else the launcher's counts (or the given values where they agree with them). `prefix` names the
    config group in the messages ("trainer." for stages 1 and 2)."""
    launcher = detect_launcher()
    if launcher is None:
        return devices, num_nodes
    if devices not in UNSET_DEVICES and device_count(devices) != launcher.devices:
        raise ConfigError(f"{prefix}devices={devices} but {launcher.name} started {launcher.devices} process(es) per "
                          f"node: leave {prefix}devices out (the launcher's count is taken) or make the two agree")
    if num_nodes != 1 and num_nodes != launcher.num_nodes:
        raise ConfigError(f"{prefix}num_nodes={num_nodes} but {launcher.name} runs on {launcher.num_nodes} node(s): "
                          f"leave {prefix}num_nodes out or make the two agree")
    chosen = launcher.devices if devices in UNSET_DEVICES else devices
    logger.debug("%s started %d process(es) per node on %d node(s): devices=%s, num_nodes=%d", launcher.name,
                launcher.devices, launcher.num_nodes, chosen, launcher.num_nodes)
    return chosen, launcher.num_nodes
