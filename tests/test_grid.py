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
    text = dry_run(plan(spec, rows), rows)
    assert text.count("# stage3/") == 7 and "stage2_finetune_sd.py" in text and "to run" in text
    # the whole paper column: every row's figure (model 6 has none in our sources, and says so), printed
    # before anything runs, beside the row and beside its stage-2 and stage-3 runs
    assert {r.name: r.paper_top1 for r in rows} == {"full": 45.8, "model1": 4.2, "model2": 3.7, "model3": 32.3,
                                                    "model4": 24.5, "model5": 19.7, "model6": None}
    assert next(r for r in rows if r.name == "model6").paper_note
    for row in rows:
        figure = "no figure (" if row.paper_top1 is None else f"the paper: {row.paper_top1:.1f}%"
        assert f"#   {row.name}" in text and figure in text
    assert "# stage3/model3 (to run)" in text and "stage3/model3; the paper: 32.3%" in text


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


def test_seeds_plan_each_row_once_per_seed_with_its_own_seed(tmp_path):
    spec, rows = load_grid(PAPER)
    runs = {r.name: r for r in plan(spec, rows[:1], seeds=3)}
    # seed 0 is the one-seed table's run (same folder, no seed override); seed k its own folder and seed + k
    assert runs["stage1/mask075_large"].args == next(r for r in plan(spec, rows[:1]) if r.phase == "stage1").args
    for k in (1, 2):
        stage1, stage2 = runs[f"seed{k}/stage1/mask075_large"], runs[f"seed{k}/stage2/full"]
        assert f"seed={2022 + k}" in stage1.args and f"seed={2022 + k}" in stage2.args
        assert stage1.output_dir.parent.parent.name == f"seed{k}"
        # the stage-1 encoder of the same seed
        assert any(a.endswith(f"seed{k}/stage1/mask075_large/eeg_encoder") for a in stage2.args)
        assert runs[f"seed{k}/probe/mask075_large"].args[-2:] == ["--seed", str(k)]
    with pytest.raises(ConfigError, match="seeds must be >= 1"):
        plan(spec, rows[:1], seeds=0)


def _fake_stage3(run, per_trial_slots):
    """A stage-3 metrics.json with these per-trial, per-slot n-way scores."""
    import json

    import numpy as np

    scores = np.asarray(per_trial_slots, dtype=float)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    per_slot = scores.mean(0)
    report = {"protocol": {"n_trials": len(scores), "n_way": 20, "num_images_per_eeg": scores.shape[1]},
              "metrics": {"n_way": {"mean": float(scores.mean()), "mean_ci95": [0.0, 1.0], "best_slot": float(per_slot.max()),
                                    "best_slot_ci95": [0.0, 1.0], "per_slot": per_slot.tolist()}},
              "trials": [{"n_way": row.tolist()} for row in scores]}
    (run.output_dir / "metrics.json").write_text(json.dumps(report))


def test_a_table_over_seeds_gives_mean_sd_each_seed_and_a_pooled_interval(tmp_path):
    import numpy as np

    spec, rows = load_grid(_tiny_grid(tmp_path))
    runs = plan(spec, rows, {"seed": "7"}, seeds=3)
    stage3 = sorted((r for r in runs if r.phase == "stage3"), key=lambda r: r.seed)
    scores = [[[0.2, 0.4], [0.0, 0.2], [0.6, 0.6]], [[0.4, 0.4], [0.2, 0.0], [0.4, 0.8]], [[0.0, 0.2], [0.2, 0.2], [0.2, 0.4]]]
    for run, s in zip(stage3[:2], scores[:2]):
        _fake_stage3(run, s)
    row = summarise(spec, rows, runs)["rows"]["a"]
    assert row["seeds"] == 2 and row["seeds_planned"] == 3  # the third seed has not run
    _fake_stage3(stage3[2], scores[2])
    summary = summarise(spec, rows, runs)
    row = summary["rows"]["a"]
    per_seed = [np.mean(s) for s in scores]
    assert row["seeds"] == 3 and row["top1_per_seed"] == pytest.approx(per_seed)
    assert row["top1"] == pytest.approx(np.mean(per_seed)) and row["top1_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    low, high = row["top1_ci"]
    assert low < row["top1"] < high and high - low < 0.6
    text = results_markdown(summary)
    assert f"{row['top1']:.1%} ± {row['top1_sd'] * 100:.1f} (" in text and "| 3 | – |" in text
    assert "mean over the seeds that finished" in text
