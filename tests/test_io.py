"""Atomic writes and checkpoint loading that never runs pickled code."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.core.files import PickledObject, atomic_path, safe_torch_load
from dreamdiffusion.models.original_formats import pickled_attrs


def _fake_module_class(module_name, class_name, attrs):
    """A class defined in a throw-away module, as the authors' `config.Config_*` would be."""
    module = types.ModuleType(module_name)
    cls = type(class_name, (), {"__module__": module_name})
    setattr(module, class_name, cls)
    sys.modules[module_name] = module
    obj = cls()
    obj.__dict__.update(attrs)
    return obj


def test_unknown_class_becomes_an_inert_attribute_holder(tmp_path):
    cfg = _fake_module_class("config", "Config_MBM_EEG", {"embed_dim": 8, "mask_ratio": 0.1})
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "config": cfg, "epoch": 2}, path)
    del sys.modules["config"]  # the loader must not need the authors' config.py

    loaded = safe_torch_load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert isinstance(loaded["config"], PickledObject)
    assert loaded["config"]._pickled_class == "config.Config_MBM_EEG"
    assert pickled_attrs(loaded["config"]) == {"embed_dim": 8, "mask_ratio": 0.1}


class _CallsAFunction:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_pickle_that_calls_a_function_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _CallsAFunction()}, path)
    with pytest.raises(CheckpointError, match="refus"):
        safe_torch_load(path)


class _Calls:
    """Pickles as a call of `fn(*args)` (pickle's REDUCE), as a malicious file would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    """Pickles that would run code (each would create `marker`) or call what is not a data constructor."""
    code = f"open({str(marker)!r}, 'w').close()"
    yield "os.system", _Calls(os.system, f"touch {marker}")
    yield "builtins.eval", _Calls(eval, code)
    yield "builtins.exec", _Calls(exec, code)
    yield "subprocess.Popen", _Calls(subprocess.Popen, ["touch", str(marker)])
    yield "builtins.__import__", _Calls(__import__, "os")
    yield "builtins.getattr", _Calls(getattr, 1, "real")
    yield "torch.load", _Calls(torch.load, str(marker))
    yield "numpy.save", _Calls(np.save, str(marker), np.zeros(1))
    yield "an unknown class called", _Calls(_fake_module_class("evil_config", "Thing", {}).__class__)


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "pre-1.6 format"])
def test_every_pickle_that_calls_a_function_is_refused_and_runs_nothing(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    for name, payload in _payloads(marker):
        path = tmp_path / "evil.pth"
        torch.save({"model": {"w": torch.ones(1)}, "payload": payload}, path,
                   _use_new_zipfile_serialization=not legacy_format)
        with pytest.raises(CheckpointError, match="refus"):
            safe_torch_load(path)
        assert not marker.exists(), name


def test_plain_data_loads_as_it_was_saved(tmp_path):
    """Tensors, numpy values, sets, slices and optimiser states: what checkpoints and data files hold."""
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2,), 0.5)
    optimizer = torch.optim.AdamW([weight], betas=(0.9, 0.95))
    optimizer.step()
    saved = {"w": torch.randn(3, 2), "half": torch.arange(4, dtype=torch.bfloat16), "p": torch.nn.Parameter(torch.ones(2)),
             "array": np.arange(6.0).reshape(2, 3), "int": np.int64(3), "float": np.float32(0.5), "names": np.array(["a", "bc"]),
             "set": {1, 2}, "frozenset": frozenset([3]), "slice": slice(1, 5, 2), "complex": 1 + 2j, "bytes": b"\x00\x01",
             "size": torch.Size([2, 3]), "device": torch.device("cpu"), "dtype": torch.float16,
             "optimizer": optimizer.state_dict()}
    torch.save(saved, tmp_path / "plain.pth")
    loaded = safe_torch_load(tmp_path / "plain.pth")
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype, key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(loaded[key], value) and loaded[key].dtype == value.dtype, key
        elif key != "optimizer":
            assert loaded[key] == value and type(loaded[key]) is type(value), key
    assert loaded["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    for name, value in saved["optimizer"]["state"][0].items():
        assert torch.equal(loaded["optimizer"]["state"][0][name], value), name


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        safe_torch_load(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        safe_torch_load(junk)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
