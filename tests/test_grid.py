"""The grid runner behind the paper table and `make demo`: what it plans from the row files, the
dry run, skipping finished runs, refusing a finished run made with other settings."""

import pytest

from conftest import REPO_ROOT
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.tools.grid import GridRunner, dry_run, load_grid, plan, results_markdown, summarise

PAPER = REPO_ROOT / "configs" / "paper_table"


def test_the_paper_table_plans_the_papers_ablation_on_real_data():
    spec, rows = load_grid(PAPER)
    assert [r.name for r in rows] == ["full", "model1", "model2", "model3", "model4", "model5", "model6"]
    runs = {r.name: r for r in plan(spec, rows)}
    # each stage-1 encoder once, shared by the rows that use it; the paper's settings otherwise
    assert sorted(n for n in runs if n.startswith("stage1/")) == ["stage1/mask025_large", "stage1/mask050_large",
                                                                  "stage1/mask075_large"]
    assert "mask_ratio=0.25" in runs["stage1/mask025_large"].args and runs["stage1/mask075_large"].epochs == 500
    assert runs["stage2/full"].epochs == 300
    full, model1, model2 = (runs[f"stage2/{n}"].args for n in ("full", "model1", "model2"))
    assert any(a.endswith("stage1/mask075_large/eeg_encoder") for a in full) and "clip_weight=0" not in full
    assert "eeg_encoder_path=null" in model1 and "clip_weight=0" in model1
    assert "configs/presets/encoder_small.yaml" in model2
    assert any(a.endswith("stage2/full/model") for a in runs["stage3/full"].args)
    probe = runs["probe/mask075_large"].args
    assert probe[probe.index("--eeg") + 1].endswith("datasets/eeg_5_95_std.pth") and "4" in probe
    text = dry_run(plan(spec, rows))
    assert text.count("# stage3/") == 7 and "stage2_finetune_sd.py" in text and "to run" in text
    assert {r.paper_top1 for r in rows if r.paper_top1} == {45.8, 19.7}


def test_extra_overrides_reach_every_run_of_their_stage():
    spec, rows = load_grid(PAPER)
    runs = plan(spec, rows[:2], extra={"stage2": ["trainer.devices=4"], "stage3": ["devices=4"]})
    assert all("trainer.devices=4" in r.args for r in runs if r.phase == "stage2")
    assert all("devices=4" in r.args for r in runs if r.phase == "stage3")


def _tiny_grid(tmp_path, body=""):
    folder = tmp_path / "grid"
    folder.mkdir()
    (folder / "grid.yaml").write_text(f"title: t\noutputs: {tmp_path / 'out'}\nresults: {tmp_path / 'res'}\n"
                                      "encoders: {}\nprobe: false\n" + body)
    (folder / "a.yaml").write_text("name: a\nlabel: row a\nencoder: null\nstage3:\n  overrides: ['seed={seed}']\n")
    return folder


def test_placeholders_are_filled_from_the_context_and_a_missing_one_is_named(tmp_path):
    spec, rows = load_grid(_tiny_grid(tmp_path))
    runs = plan(spec, rows, {"seed": "7"})
    assert "seed=7" in next(r for r in runs if r.phase == "stage3").args
    with pytest.raises(ConfigError, match=r"placeholder \{seed\}"):
        plan(spec, rows, {})


def test_a_bad_row_file_names_the_file_and_the_key(tmp_path):
    folder = _tiny_grid(tmp_path)
    (folder / "b.yaml").write_text("name: b\nlabel: row b\nencodr: x\n")
    with pytest.raises(ConfigError, match=r"b\.yaml.*encodr"):
        load_grid(folder)
    (folder / "b.yaml").write_text("name: b\nlabel: row b\nencoder: nowhere\n")
    with pytest.raises(ConfigError, match="encoder 'nowhere'"):
        load_grid(folder)


def test_broken_yaml_a_list_a_bad_stage3_key_and_no_jobs_are_sentences(tmp_path, capsys):
    import importlib.util

    from dreamdiffusion.core.errors import run_cli

    spec_ = importlib.util.spec_from_file_location("paper_table", REPO_ROOT / "code" / "paper_table.py")
    paper_table = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(paper_table)

    folder = _tiny_grid(tmp_path)
    (folder / "b.yaml").write_text("name: b\n  label: [\n")
    with pytest.raises(ConfigError, match=r"b\.yaml is not valid YAML"):
        load_grid(folder)
    (folder / "b.yaml").write_text("- name: b\n")
    with pytest.raises(ConfigError, match=r"b\.yaml must be a mapping of RowSpec keys"):
        load_grid(folder)
    (folder / "b.yaml").unlink()
    spec, rows = load_grid(folder)
    with pytest.raises(ConfigError, match="no_such_key"):
        plan(spec, rows, {"seed": "1"}, extra={"stage3": ["no_such_key=1"]})
    assert run_cli(paper_table.main, ["--jobs", "0", "--dry-run"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_finished_runs_are_skipped_and_a_changed_one_is_refused(tmp_path):
    from dreamdiffusion.config import STAGES, save_config
    from dreamdiffusion.tools.grid import _split_args

    spec, rows = load_grid(_tiny_grid(tmp_path))
    runs = plan(spec, rows, {"seed": "7"})
    stage3 = next(r for r in runs if r.phase == "stage3")
    stage3.output_dir.mkdir(parents=True)
    save_config(STAGES["stage3"].build_config(*_split_args(stage3.args)), stage3.output_dir)
    (stage3.output_dir / "metrics.json").write_text("{}")
    runner = GridRunner(runs, progress=False, log=lambda _: None)
    assert [r.name for r in runner.skipped] == ["stage3/a"] and not runner.pending["stage3"]
    changed = plan(spec, rows, {"seed": "8"})
    with pytest.raises(ConfigError, match=r"stage3/a .* was made with other settings \(seed differ"):
        GridRunner(changed, progress=False)


def test_the_table_of_a_grid_that_has_not_run(tmp_path):
    spec, rows = load_grid(_tiny_grid(tmp_path))
    summary = summarise(spec, rows, plan(spec, rows, {"seed": "7"}))
    assert summary["rows"]["a"]["status"] == "not run"
    assert "| **a**: row a | not run |" in results_markdown(summary)
