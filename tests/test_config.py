"""The config layer: strict keys and types, file/override precedence, saving, path resolution."""

import pytest
from omegaconf import OmegaConf

from dreamdiffusion.config import (
    REPO_ROOT,
    Stage1Config,
    Stage2Config,
    Stage3Config,
    build_config,
    load_saved_config,
    parse_args,
    resolve_path,
    save_config,
)
from dreamdiffusion.core.errors import ConfigError, run_cli


def test_the_defaults_files_only_restate_the_schema():
    """The stage defaults files show the most-changed settings; they must not change a default
    (the paper's values live in the schema and are checked against the manifest in test_fidelity)."""
    from dreamdiffusion.config import STAGES

    for stage in STAGES.values():
        bare = OmegaConf.to_container(build_config(stage.schema))
        with_file = OmegaConf.to_container(stage.build_config())
        assert bare == with_file, stage.name


def test_resolved_makes_path_fields_absolute_and_keeps_specs(tmp_path):
    from dreamdiffusion.config import resolved

    cfg = build_config(Stage3Config, overrides=["classifier=timm:resnet50", "clip_path=openai/clip-vit-large-patch14",
                                                f"model={tmp_path}", "lpips_weights=null"])
    paths = resolved(cfg)
    assert paths.data.eeg_path == str(REPO_ROOT / "datasets" / "eeg_5_95_std.pth")  # nested groups too
    assert paths.output_dir == str(REPO_ROOT / "outputs" / "stage3") and paths.model == str(tmp_path)
    assert paths.classifier == "timm:resnet50"  # a library spec, not a path
    assert paths.clip_path == "openai/clip-vit-large-patch14"  # a hub id (no such local folder)
    assert paths.lpips_weights is None and cfg.output_dir == "outputs/stage3"  # the original is unchanged
    local = resolved(build_config(Stage3Config, overrides=["classifier=pretrains/demo/classifier"]))
    assert local.classifier == str(REPO_ROOT / "pretrains" / "demo" / "classifier")


def test_precedence_defaults_then_files_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("batch_size: 7\nencoder:\n  depth: 3\n")
    b = tmp_path / "b.yaml"
    b.write_text("encoder:\n  depth: 5\n")
    cfg = build_config(Stage1Config, [a, b], ["encoder.num_heads=2"])
    assert (cfg.batch_size, cfg.encoder.depth, cfg.encoder.num_heads) == (7, 5, 2)
    cfg = build_config(Stage1Config, [a, b], ["encoder.depth=9"])
    assert cfg.encoder.depth == 9


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("not_a_field=1", "not_a_field"),
        ("encoder.depth=deep", "encoder.depth"),
        ("encoder.unknown=3", "encoder.unknown"),
        ("mask_ratio", "key=value"),
    ],
)
def test_unknown_key_or_wrong_type_names_it(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(Stage1Config, [], [override])
    assert fragment in str(err.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        build_config(Stage1Config, [bad])
    assert "learning_rate" in str(err.value) and str(bad) in str(err.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(Stage1Config, [tmp_path / "nope.yaml"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = build_config(Stage2Config, [], ["lr=0.001", "data.subject=0"])
    path = save_config(cfg, tmp_path / "out")
    assert path.name == "config.yaml"
    again = load_saved_config(Stage2Config, path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_print_config_prints_and_returns_none(capsys):
    assert parse_args(Stage3Config, ["--print-config", "n_way=10"], default_file=None) is None
    assert "n_way: 10" in capsys.readouterr().out


def test_cli_exit_code_two_on_bad_config(capsys):
    def main(argv=None):
        parse_args(Stage1Config, argv, default_file=None)

    assert run_cli(main, ["nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_paths_resolve_against_the_repo_root(tmp_path):
    assert resolve_path("datasets/x.pth") == REPO_ROOT / "datasets" / "x.pth"
    assert resolve_path(tmp_path) == tmp_path
    assert resolve_path(None) is None


def test_stage_default_files_are_valid():
    for schema, name in [
        (Stage1Config, "stage1_pretrain.yaml"),
        (Stage2Config, "stage2_finetune.yaml"),
        (Stage3Config, "stage3_eval.yaml"),
    ]:
        build_config(schema, default_file=REPO_ROOT / "configs" / name)
