"""Rules every stage's settings obey, checked when a config is built (before any work):

- every float setting is a finite number (`lr=inf`, `guidance_scale=nan` train or sample nothing but
  NaN, and OmegaConf accepts both);
- every seed is an integer in [0, 2**32 - 1], the range Lightning's `seed_everything` and numpy's
  generators take (Lightning replaces a seed outside it with a random one);
- `devices` (Lightning's / Fabric's) is an int >= 1 or -1, "auto", a list of device ids or a string of
  them ("0,1"); `device` (one process) is auto, cpu, cuda, cuda:N or mps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from dreamdiffusion.core.errors import ConfigError

SEED_RANGE = (0, 2**32 - 1)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_DEVICE_IDS = re.compile(r"\d+(,\d+)*,?")


def _leaves(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{where}[{i}]")
    else:
        yield where, node


def check_devices(value: Any, key: str) -> None:
    """Lightning's `devices`: an int >= 1 or -1, "auto", a list of device ids, or a string of ids."""
    ok = (isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)) \
        or (isinstance(value, str) and (value in ("auto", "-1") or _DEVICE_IDS.fullmatch(value) is not None)) \
        or (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
    if not ok:
        raise ConfigError(f"{key} must be >= 1, -1 (all), \"auto\", a list of device ids such as [0, 1] or a string "
                          f"of them such as \"0,1\"; got {value!r}")


def check_values(config: dict[str, Any]) -> None:
    """The rules above over a config as plain data (`OmegaConf.to_container`); a ConfigError names the key."""
    for key, value in _leaves(config):
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number")
        if name == "seed" and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]):
            raise ConfigError(f"{key} must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {value!r}")
        if name == "device" and isinstance(value, str) and not _DEVICE.fullmatch(value):
            raise ConfigError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    for key in ("devices", "trainer.devices"):
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            check_devices(node, key)
