"""File helpers shared by every stage: atomic writes and checkpoint loading that runs no pickled code.

Atomic writes: outputs are written to a temporary file in the same folder and renamed into place,
so an interrupted run never leaves a half-written file under the final name; a folder (an export)
is written the same way by `atomic_dir`, with a completion marker inside (`COMPLETE_MARKER`). Files
get the user's umask (0666 & ~umask), as a plain `open` would. JSON holds no NaN/Infinity: the
writer puts null in their place and says where, and why, in the file itself.

Safe loading: torch's own `torch.load(weights_only=True)`, which refuses to call anything but
tensor/container constructors. The authors' checkpoints pickle their own config classes
(`config.Config_MBM_EEG`, `config.Config_Generative_Model`), so `safe_torch_load` lets every class a
file names in as an inert attribute holder (`PickledObject`) that refuses to be *called* - so a
pickle that would run `os.system` (or any other function) fails instead.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamdiffusion.core.errors import CheckpointError, ConfigError, DataError, DreamDiffusionError

logger = logging.getLogger(__name__)

# Written last inside a folder `atomic_dir` builds: a folder of ours without it is incomplete.
COMPLETE_MARKER = ".dreamdiffusion_complete.json"

# ---------------------------------------------------------------------------------------------
# Atomic writes


def user_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status), else by setting and
    restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_user_file(path: Path, folder: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give them the mode a plain open/mkdir would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~user_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _as_user_file(tmp_path)  # after the block: some writers replace the file they were given
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_siblings(path: Path) -> None:
    """Temporary folders of `atomic_dir` left by a process that has ended (killed mid-export)."""
    for entry in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        pid = entry.name[len(path.name) + 2:].split(".", 1)[0]
        if entry.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, what: str = "export") -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`. If the block succeeds, write the completion
    marker in it and rename it onto `path` (an earlier `path` is moved aside first and then deleted),
    so `path` is at every moment absent, the earlier complete folder or the new complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    _as_user_file(tmp, folder=True)
    try:
        yield tmp
        atomic_write_json(tmp / COMPLETE_MARKER, {"what": what, "complete": True,
                                                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old.tmp") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: str | os.PathLike) -> bool:
    """True when `folder` was finished by `atomic_dir` (its completion marker is there)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """A usable output folder: not a file, and writable (or creatable) - checked before any work, so a
    run never fails after hours on a folder it cannot write. Returns the path."""

    path = Path(path)
    check_path_name(path, what)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={path} is an existing file, not a folder: choose another {what}")
    existing = path
    while not existing.exists():  # the deepest part that exists decides whether the folder can be made
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}={path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={path} is not writable ({existing} does not allow writing): choose another {what}")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_path_name(path: str | os.PathLike, what: str) -> None:
    """A path the file system can hold: no NUL character, no part longer than its name limit, not
    longer than its path limit (a ConfigError naming `what` instead of an OSError mid-run)."""
    text = str(path)
    if "\0" in text:
        raise ConfigError(f"{what}={text!r} holds a NUL character, which no file name may contain")
    existing = Path(os.path.abspath(text))
    while existing != existing.parent:
        try:
            if existing.exists():
                break
        except OSError:  # ENAMETOOLONG: the very problem looked for here
            pass
        existing = existing.parent
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # no limits to ask for (e.g. not POSIX): the OS will say
        return
    long = [part for part in Path(path).parts if len(os.fsencode(part)) > name_max]
    if long:
        raise ConfigError(f"{what}: the name {long[0][:40]!r}... is {len(os.fsencode(long[0]))} bytes long; this file "
                          f"system allows {name_max} per name - choose a shorter {what}")
    if len(os.fsencode(os.path.abspath(text))) > path_max - 64:  # room for the files written inside
        raise ConfigError(f"{what}={text[:60]}... is {len(os.fsencode(os.path.abspath(text)))} bytes long; this file "
                          f"system allows {path_max} per path (with room for the files inside) - choose a shorter {what}")


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """`obj` with every NaN/Infinity float replaced by None, and where each was ('summary.loss: nan')."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{where or '(value)'}: {obj}"]
    if isinstance(obj, dict):
        out, found = {}, []
        for key, value in obj.items():
            out[key], inner = finite_json(value, f"{where}.{key}" if where else str(key))
            found += inner
        return out, found
    if isinstance(obj, (list, tuple)):
        items = [finite_json(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return [value for value, _ in items], [f for _, inner in items for f in inner]
    return obj, []


def json_text(obj: Any, path: str | os.PathLike = "JSON") -> str:
    """JSON without NaN/Infinity (not JSON; most readers refuse it): such values become null, and a
    dict gets a `non_finite_values` entry saying which were replaced and why."""
    clean, replaced = finite_json(obj)
    if replaced:
        logger.warning("%s: %d value(s) were not finite numbers and are written as null (%s)", path,
                       len(replaced), ", ".join(replaced[:5]))
        if isinstance(clean, dict):
            clean["non_finite_values"] = {"written_as": None, "reason": "not finite numbers (NaN or Infinity), "
                                          "which JSON cannot hold", "where": replaced}
    return json.dumps(clean, indent=2, sort_keys=False, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, path) + "\n")


def read_own_json(path: str | os.PathLike, remedy: str, error: type[DreamDiffusionError] = DataError) -> Any:
    """A JSON file this project wrote, or `error` naming the file and `remedy` (which step to rerun)
    when it is missing or damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise error(f"{path} is missing: {remedy}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path} is damaged ({type(err).__name__}: {err}): {remedy}") from err


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------------------------------------
# Safe unpickling


class PickledObject:
    """Inert stand-in for an object of a class we do not import (e.g. the authors' config classes).

    It only holds the attributes that the pickle stored. `_pickled_class` records the original
    `module.name` so callers can check what it was.
    """

    _pickled_class = "?"

    def __setstate__(self, state: Any) -> None:
        # Objects pickled with a (dict, slots) pair or a plain dict both land here.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unsupported pickled state for {self._pickled_class}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"PickledObject({self._pickled_class}, {self.__dict__!r})"


class _RefuseCall(type):
    """Metaclass of the stand-ins: creating one through NEWOBJ is fine, *calling* it is refused.

    Pickle calls a global through REDUCE (`f(*args)`), which for a stand-in class means a call of
    the metaclass. Plain objects are rebuilt through NEWOBJ + BUILD, which never calls it.
    """

    def __call__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(
            f"refusing to call {cls._pickled_class} while unpickling: the file asks to run code"
        )


# What a checkpoint of ours or the authors' may hold beyond what torch's `weights_only` unpickler allows
# by default: numpy arrays, scalars and dtypes (optimiser states, configs), sets and slices. numpy 2
# renamed `numpy.core` to `numpy._core`; pickles name either, depending on who wrote them. Rebuilding
# a dtype sets the state of an object of its class (numpy.dtypes.Float64DType, ...), so those are listed.
_NUMPY_CORE = (getattr(np, "_core", None) or np.core).multiarray
_PLAIN_DATA = [np.dtype, np.ndarray, frozenset, slice,
               *sorted({type(np.dtype(code)) for code in np.typecodes["All"]}, key=str),
               *((fn, f"{module}.{fn.__name__}") for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for fn in (_NUMPY_CORE._reconstruct, _NUMPY_CORE.scalar))]
_STAND_INS: dict[str, type] = {}


def _stand_in(full_name: str) -> type:
    if full_name not in _STAND_INS:
        name = full_name.rpartition(".")[2]
        _STAND_INS[full_name] = _RefuseCall(name, (PickledObject,), {"_pickled_class": full_name})
    return _STAND_INS[full_name]


def _reason(err: Exception) -> str:
    """torch's refusal without its advice (which suggests weights_only=False: never for a user's file)."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    paragraphs = [p for p in paragraphs if not p.startswith("Check the documentation")] or [text.strip()]
    return re.sub(r"\s*Please use `torch\.serialization.*", "", paragraphs[-1])


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """Load a `torch.save` file without running pickled code: torch's `weights_only=True` unpickler.

    Beyond the tensors and containers torch allows: numpy values (`_PLAIN_DATA`), and every other class
    the file names (listed by `torch.serialization.get_unsafe_globals_in_checkpoint`), allowed as an
    inert `PickledObject` stand-in that refuses to be called - so the authors' pickled config objects
    load as attribute holders, and a pickle that would call `os.system` (or any function) fails.
    Files in torch's pre-1.6 (non-zip) format cannot be listed, so there only torch's defaults and the
    numpy values load. Raises `CheckpointError` naming the file if it is missing, refused or unreadable.
    `mmap`: the tensors stay in the file's pages (read on first use, shared by every process that maps
    the file) instead of being copied into each process's memory; zip-format files only.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_PLAIN_DATA):
            is_zip = zipfile.is_zipfile(path)
            foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path) if is_zip else []
            with torch.serialization.safe_globals([(_stand_in(name), name) for name in foreign]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{what} {path} was refused: {_reason(err)}") from err
    # A damaged or foreign file can make the unpickler fail in many ways (RuntimeError, EOFError,
    # ValueError, ...): all mean "not a readable torch file".
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{what} {path} could not be read as a torch checkpoint: "
                              f"{type(err).__name__}: {err}") from err


def pickled_attrs(obj: Any) -> dict[str, Any]:
    """The attributes of a pickled config object (a `PickledObject` or anything with __dict__)."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    return dict(getattr(obj, "__dict__", {}))
