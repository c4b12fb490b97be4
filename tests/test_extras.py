"""An optional feature whose extra is missing stops with one sentence naming the extra (exit 2), before
any work. A missing package is simulated with a `None` entry in `sys.modules` (what Python itself
treats as "cannot be imported")."""

import re
import runpy
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the [dev] extra installs tomli there)
    import tomli as tomllib

from dreamdiffusion.core.errors import ConfigError, run_cli
from dreamdiffusion.core.extras import EXTRAS, installed, require_extra
from dreamdiffusion.data import moabb_corpus
from dreamdiffusion.evaluation import stage3
from dreamdiffusion.evaluation.metrics import inception_feature_modules
from dreamdiffusion.models.clip_embedder import load_open_clip
from dreamdiffusion.train import stage1, stage2

REPO = Path(__file__).resolve().parent.parent


def hide(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_a_hidden_module_counts_as_missing_and_a_present_one_as_installed(monkeypatch):
    assert installed("torch")
    hide(monkeypatch, "wandb")
    assert not installed("wandb")
    with pytest.raises(ConfigError, match=r"wandb.enabled=true needs wandb, which is not installed: "
                                          r"pip install 'dreamdiffusion\[wandb\]'"):
        require_extra("wandb", "wandb.enabled=true")


def test_every_extra_names_modules_of_a_pyproject_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert {"all", "dev"} <= set(extras)


@pytest.mark.parametrize("main, argv, module, extra", [
    (stage1.main, ["wandb.enabled=true"], "wandb", "wandb"),
    (stage2.main, ["wandb.enabled=true"], "wandb", "wandb"),
    (stage2.main, ["clip_path=open_clip:ViT-H-14"], "open_clip", "openclip"),
    (stage3.main, ["clip_path=open_clip:ViT-H-14"], "open_clip", "openclip"),
    (stage3.main, ["fid_feature_weights=inception.pth", "metrics=[fid]"], "torch_fidelity", "fid"),
])
def test_a_stage_refuses_a_feature_without_its_extra_before_any_work(main, argv, module, extra, monkeypatch,
                                                                    tmp_path, capsys):
    hide(monkeypatch, module)
    out = tmp_path / "out"
    assert run_cli(main, [*argv, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"pip install 'dreamdiffusion[{extra}]'" in err
    assert not out.exists()


def test_the_same_configs_pass_the_check_when_the_extras_are_installed(tmp_path, capsys):
    # the default paths do not exist here, so the run stops at its own file checks instead
    assert run_cli(stage3.main, ["fid_feature_weights=inception.pth", "metrics=[fid]",
                                 f"output_dir={tmp_path / 'out'}"]) == 2
    assert "dreamdiffusion[fid]" not in capsys.readouterr().err


def test_fid_without_its_extra_from_python(monkeypatch, tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")
    hide(monkeypatch, "torch_fidelity")
    with pytest.raises(ConfigError, match=r"dreamdiffusion\[fid\]"):
        inception_feature_modules(weights)


def test_open_clip_without_its_extra_from_python(monkeypatch, tmp_path):
    hide(monkeypatch, "open_clip")
    with pytest.raises(ConfigError, match=r"clip_path=open_clip:ViT-H-14 needs open_clip.*dreamdiffusion\[openclip\]"):
        load_open_clip("ViT-H-14", tmp_path / "weights.pt")


def test_the_moabb_builder_without_its_extra(monkeypatch, tmp_path, capsys):
    hide(monkeypatch, "moabb", "mne")
    out = tmp_path / "corpus"
    assert run_cli(moabb_corpus.main, ["PhysionetMI", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs moabb and mne, which are not installed: pip install 'dreamdiffusion[moabb]'" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The oldest CI leg's constraints (.ci/oldest_constraints.py)


def _constraints_script():
    return runpy.run_path(str(REPO / ".ci" / "oldest_constraints.py"))


def test_the_oldest_constraints_pin_every_dependency_at_its_lower_bound():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {}
    for line in requirements:
        name = re.match(r"[A-Za-z0-9._-]+", line).group(0)
        if name != project["name"]:
            declared[name] = re.search(r">=\s*([^,;\s]+)", line).group(1)
    assert _constraints_script()["floors"]() == declared
    assert declared["torch"] == "2.6.0" and declared["transformers"].startswith("4.")


def test_a_dependency_without_a_lower_bound_is_refused(tmp_path, capsys):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.6.0", "numpy"]\n')
    with pytest.raises(SystemExit) as exit_info:
        _constraints_script()["floors"](pyproject)
    assert exit_info.value.code == 2
    assert "'numpy' has no '>=' lower bound" in capsys.readouterr().err
