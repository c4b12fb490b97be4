"""File helpers shared by every stage: atomic writes and checkpoint loading that runs no pickled code.

Atomic writes: outputs are written to a temporary file in the same folder and renamed into place,
so an interrupted run never leaves a half-written file under the final name.

Safe loading: `torch.load(weights_only=True)` refuses any pickled object of a class it does not
know. The authors' checkpoints pickle their own config classes (`config.Config_MBM_EEG`,
`config.Config_Generative_Model`), so `safe_torch_load` uses an unpickler that rebuilds tensors
and plain containers, turns every unknown class into an inert attribute holder
(`PickledObject`), and refuses to *call* anything that is not on a short list of tensor/container
constructors - so a pickle that would run `os.system` (or any other function) fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dreamdiffusion.core.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------------------
# Atomic writes


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
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """A usable output folder: not a file, and writable (or creatable) - checked before any work, so a
    run never fails after hours on a folder it cannot write. Returns the path."""

    path = Path(path)
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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


# Callables that rebuild tensors, containers and numbers - and nothing else.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("collections", "defaultdict"): __import__("collections").defaultdict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
if hasattr(torch._tensor, "_rebuild_from_type_v2"):
    _SAFE_GLOBALS[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
if hasattr(torch._utils, "_rebuild_device_tensor_from_numpy"):
    _SAFE_GLOBALS[("torch._utils", "_rebuild_device_tensor_from_numpy")] = (
        torch._utils._rebuild_device_tensor_from_numpy
    )
try:  # numpy scalars/arrays appear in optimiser states and configs
    import numpy as np

    # numpy 2 moved `numpy.core` to `numpy._core`; pickles name either, depending on who wrote them.
    _np_multiarray = getattr(np, "_core", None) or np.core
    for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        _SAFE_GLOBALS[(_mod, "_reconstruct")] = _np_multiarray.multiarray._reconstruct
        _SAFE_GLOBALS[(_mod, "scalar")] = _np_multiarray.multiarray.scalar
    _SAFE_GLOBALS[("numpy", "dtype")] = np.dtype
    _SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
except Exception:  # pragma: no cover - numpy is a hard dependency
    pass

_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = _RefuseCall(name, (PickledObject,), {"_pickled_class": f"{module}.{name}"})
    return _STAND_INS[key]


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and (name in _TORCH_DTYPES or name.endswith("Storage")):
            return getattr(torch, name)
        if module == "torch.storage" and name == "UntypedStorage":
            return torch.UntypedStorage
        return _stand_in(module, name)


class _SafePickleModule:
    """A `pickle_module` for `torch.load`: torch subclasses our `Unpickler` for tensor storages."""

    Unpickler = _SafeUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "dreamdiffusion_safe_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _SafeUnpickler(file, **kwargs).load()


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a `torch.save` file without running pickled code.

    Plain tensor files go through `weights_only=True`. Files that pickle objects of unknown
    classes (the authors' configs) are retried with our unpickler, which rebuilds those objects
    as `PickledObject`s. Raises `CheckpointError` naming the file if it is missing or if its
    pickle asks to call a function.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # an unknown class; the safe unpickler below turns it into a PickledObject
    except Exception as err:  # not a torch file at all
        raise CheckpointError(f"{what} {path} could not be read as a torch checkpoint: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SafePickleModule)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{what} {path} was refused: {err}") from err
    # A damaged or foreign file can make the unpickler fail in many ways (UnicodeDecodeError,
    # EOFError, struct.error, ...): all mean "not a readable torch file".
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
