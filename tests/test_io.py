"""Atomic writes and checkpoint loading that never runs pickled code."""

import os
import sys
import types

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
