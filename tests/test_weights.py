"""code/download_weights.py (dreamdiffusion.tools.weights): offline it says what to place where, and --check
confirms files that are there; the paths are the config defaults."""

from dreamdiffusion.config import Stage2Config, Stage3Config
from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.tools.weights import WEIGHTS, main


def test_offline_it_says_what_to_place_where(tmp_path, capsys):
    assert run_cli(main, ["--root", str(tmp_path), "--only", "classifier", "--only", "clip"]) == 2  # offline in tests
    out = capsys.readouterr().out
    assert "vit_h_14_swag-80465313.pth" in out and "pretrains/classifiers/vit_h_14_swag_e2e_v1.pth" in out
    assert "openai/clip-vit-large-patch14" in out
    target = tmp_path / WEIGHTS["classifier"].path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    assert run_cli(main, ["--root", str(tmp_path), "--check", "--only", "classifier"]) == 0


def test_a_damaged_manifest_is_named(tmp_path, capsys):
    from dreamdiffusion.tools.weights import MANIFEST

    (tmp_path / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    for text in ("{\n", "[1, 2]"):
        (tmp_path / MANIFEST).write_text(text)
        assert run_cli(main, ["--root", str(tmp_path), "--check", "--only", "classifier"]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / MANIFEST) in err and "Traceback" not in err


def test_the_paths_are_the_config_defaults():
    assert WEIGHTS["classifier"].path == Stage3Config.classifier_weights
    assert WEIGHTS["sd15"].path == Stage2Config.sd_path == Stage3Config.oracle_sd_path
    assert WEIGHTS["clip"].path == Stage2Config.clip_path == Stage3Config.clip_path
    from dreamdiffusion.evaluation.recon import FEATURE_METRICS

    # the reconstruction metrics' files carry the names recon.py expects
    for key, metric in (("lpips", "alexnet2"), ("inception", "inception"), ("effnet", "effnet"), ("swav", "swav")):
        assert WEIGHTS[key].path.endswith(FEATURE_METRICS[metric].weights_file)
