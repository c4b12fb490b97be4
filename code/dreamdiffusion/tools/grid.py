"""A table of runs as one resumable command: the paper's ablation table, and `make demo`.

A grid folder (`configs/paper_table/`, `configs/demo/table/`) holds `grid.yaml` (a `GridSpec`: the
settings every run of a stage shares, and the stage-1 encoders rows may share) and one file per row
(a `RowSpec`: which encoder, what its stage-2 and stage-3 runs change). `plan` turns it into runs:

    stage1/<encoder>   once per encoder, shared by every row that uses it
    probe/<encoder>    the encoder probe (dreamdiffusion.evaluation.probe) on the stage-2 data: the encoder,
                       a random encoder of its size and the raw EEG
    stage2/<row>       eeg_encoder_path = the row's stage-1 export (null: trained from scratch)
    stage3/<row>       model = the row's stage-2 export

With `seeds` = N > 1 the whole table is planned N times: seed 0 as above (so a one-seed table's runs
are reused), seed k under `seed<k>/` with each stage's `seed` raised by k (and the probe's random
encoder seeded k); a stage-1 encoder is still trained once per seed and shared by that seed's rows.

Each run is the stage's own script in a subprocess, in its own folder under `outputs`; a finished run
(its final files present, its config.yaml the planned one) is skipped, so the command resumes. A
finished run whose config differs is an error naming the run. Placeholders `{name}` in a spec's
strings are filled from the caller's context (e.g. the demo's world paths). `results.md` and
`metrics.json` gather each row's top-1 (mean and best slot, with intervals), its retrieval, the
probe of its encoder, and the paper's figure; over several seeds, each figure as mean +- sd with the
per-seed values and, for the top-1, a bootstrap interval over test trials pooled across the seeds
(`tools/seeds.py`), and the number of seeds behind it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from dreamdiffusion.config import REPO_ROOT, STAGES, resolve_path, resolved
from dreamdiffusion.core.errors import ConfigError, DreamDiffusionError
from dreamdiffusion.core.files import atomic_write_json, atomic_write_text, read_own_json
from dreamdiffusion.tools.seeds import combine_seeds, pct_spread, probe_rows_over_seeds

PHASES = ("stage1", "probe", "stage2", "stage3")
# Row and encoder names become folder names under `outputs`: no path separators, no "..", no hidden names.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass
class StageArgs:
    """What a stage script gets: `--config` files (in order) and `key=value` overrides."""

    config: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class RowSpec:
    name: str
    label: str
    order: int = 0
    encoder: str | None = None  # a key of GridSpec.encoders; null = no pretraining (trained from scratch)
    train: bool = True  # false: no stage-2 run (the class-name oracle uses base SD)
    stage2: StageArgs = field(default_factory=StageArgs)
    stage3: StageArgs = field(default_factory=StageArgs)
    # The paper's 50-way top-1 (%) for this row, where the paper reports it; null = the paper gives none
    # (then `paper_note` says so).
    paper_top1: float | None = None
    paper_note: str | None = None  # where the figure comes from, or why there is none
    control: bool = False  # a control row (shuffled labels, oracle): not a method


@dataclass
class GridSpec:
    title: str
    outputs: str  # run folders, relative to the repository root unless absolute
    results: str  # results.md + metrics.json
    stage1: StageArgs = field(default_factory=StageArgs)
    stage2: StageArgs = field(default_factory=StageArgs)
    stage3: StageArgs = field(default_factory=StageArgs)
    encoders: dict[str, list[str]] = field(default_factory=dict)  # name -> stage-1 overrides
    probe: bool = True
    probe_args: list[str] = field(default_factory=list)  # extra arguments of `python -m dreamdiffusion.evaluation.probe`


def _strict(schema: type, path: Path) -> Any:
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml's scanner / parser errors
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must be a mapping of {schema.__name__} keys, got a {type(loaded).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), loaded))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path} is not a valid {schema.__name__}: {str(err).splitlines()[0]}") from err


def load_grid(folder: str | Path) -> tuple[GridSpec, list[RowSpec]]:
    """`grid.yaml` and the rows (every other `*.yaml`, by `order` then name) of a grid folder."""
    folder = resolve_path(folder)
    if not (folder / "grid.yaml").is_file():
        raise ConfigError(f"{folder} is not a grid folder: grid.yaml is missing")
    spec = _strict(GridSpec, folder / "grid.yaml")
    rows = sorted((_strict(RowSpec, p) for p in folder.glob("*.yaml") if p.name != "grid.yaml"),
                  key=lambda r: (r.order, r.name))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"{folder}: two rows share a name ({names})")
    for kind, name in [("row", n) for n in names] + [("encoder", e) for e in spec.encoders]:
        if not PLAIN_NAME.fullmatch(name):
            raise ConfigError(f"{folder}: the {kind} name {name!r} is not a plain name (letters, digits, '_', '-', '.'; "
                              "starting with a letter or digit; at most 100 characters): it names a run folder")
    for row in rows:
        if row.encoder is not None and row.encoder not in spec.encoders:
            raise ConfigError(f"{folder}: row '{row.name}' uses encoder '{row.encoder}', which grid.yaml's "
                              f"encoders do not define ({sorted(spec.encoders)})")
    return spec, rows


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class Run:
    """One run of a stage script (or of the probe command) in its own folder."""

    name: str  # "stage2/full" (seed 0), "seed1/stage2/full"
    phase: str  # stage1 | probe | stage2 | stage3
    args: list[str]  # the command line after the script
    output_dir: Path
    epochs: int = 1  # progress units: epochs of stages 1-2, one for the others
    seed: int = 0  # which of the grid's seeds (0 = the one-seed table's run)
    key: str = ""  # the row's (stage 2-3) or the encoder's (stage 1, probe) name

    @property
    def command(self) -> list[str]:
        if self.phase == "probe":
            return [sys.executable, "-m", "dreamdiffusion.evaluation.probe", *self.args]
        return [sys.executable, str(STAGES[self.phase].script_path), *self.args]

    def done(self) -> bool:
        final = {"stage1": "eeg_encoder/model.safetensors", "probe": "probe.json", "stage2": "model/model_index.json",
                 "stage3": "metrics.json"}[self.phase]
        return (self.output_dir / final).is_file() and (self.phase == "probe" or (self.output_dir / "metrics.json").is_file())


class _Context(dict):
    def __missing__(self, key: str) -> str:
        raise ConfigError(f"the grid uses the placeholder {{{key}}}, which this command does not provide "
                          f"(it provides: {', '.join(sorted(self)) or 'none'})")


def _fill(items: Sequence[str], context: dict[str, str]) -> list[str]:
    return [str(item).format_map(_Context(context)) for item in items]


def _stage_args(common: StageArgs, extra: StageArgs | None, overrides: Sequence[str], context: dict[str, str]
                ) -> tuple[list[str], list[str]]:
    """(config files, overrides) of one run: the grid's, then the row's, then the planner's own."""
    files = _fill([*common.config, *(extra.config if extra else [])], context)
    return files, [*_fill([*common.overrides, *(extra.overrides if extra else [])], context), *overrides]


def _as_args(files: list[str], overrides: list[str]) -> list[str]:
    return [arg for f in files for arg in ("--config", f)] + overrides


def plan(spec: GridSpec, rows: Sequence[RowSpec], context: dict[str, str] | None = None,
         extra: dict[str, list[str]] | None = None, seeds: int = 1) -> list[Run]:
    """The runs of `rows` for each of `seeds` seeds, in phase order; `extra[stage]` overrides go to every
    run of that stage (e.g. trainer.devices=8)."""
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    context, extra = {**(context or {})}, extra or {}
    out = resolve_path(_fill([spec.outputs], context)[0])
    runs = [run for k in range(seeds) for run in _plan_seed(spec, rows, context, extra, out, k)]
    return sorted(runs, key=lambda r: PHASES.index(r.phase))  # stable: seed order within a phase


def seed_folder(out: Path, seed: int) -> Path:
    """Where seed `seed`'s runs go: `outputs` itself for seed 0, `outputs/seed<k>` for the others."""
    return out if seed == 0 else out / f"seed{seed}"


def _seeded(stage: str, files: list[str], overrides: list[str], seed: int) -> list[str]:
    """`overrides` plus, for seed k > 0, the stage's own seed (as these files set it) raised by k."""
    if seed == 0:
        return overrides
    return [*overrides, f"seed={int(STAGES[stage].build_config(files, overrides).seed) + seed}"]


def _plan_seed(spec: GridSpec, rows: Sequence[RowSpec], context: dict[str, str], extra: dict[str, list[str]],
               out: Path, k: int) -> list[Run]:
    """The runs of one seed: stage 1 per encoder, stage 2 per trained row, the probes, stage 3 per row."""
    base, prefix = seed_folder(out, k), "" if k == 0 else f"seed{k}/"
    quiet = {"stage1": ["trainer.progress_bar=false"], "stage2": ["trainer.progress_bar=false"],
             "stage3": ["progress_bar=false"]}

    def run(phase: str, key: str, common: StageArgs, own: StageArgs | None, planner: list[str]) -> Run:
        files, overrides = _stage_args(common, own, [f"output_dir={base / phase / key}", *planner, *quiet[phase],
                                                     *extra.get(phase, [])], context)
        overrides = _seeded(phase, files, overrides, k)
        cfg = STAGES[phase].build_config(files, overrides)  # a bad key or value is an error now, not after training
        epochs = int(cfg.epochs) if phase != "stage3" else 1
        return Run(f"{prefix}{phase}/{key}", phase, _as_args(files, overrides), base / phase / key, epochs, k, key)

    runs = [run("stage1", enc, spec.stage1, StageArgs(overrides=spec.encoders[enc]), [])
            for enc in dict.fromkeys(r.encoder for r in rows if r.encoder is not None)]
    for row in rows:
        if row.train:
            encoder = f"eeg_encoder_path={base / 'stage1' / row.encoder / 'eeg_encoder'}" if row.encoder else \
                "eeg_encoder_path=null"
            runs.append(run("stage2", row.name, spec.stage2, row.stage2, [encoder]))
    if spec.probe:
        runs += _probe_runs(spec, rows, runs, base, context, k)
    for row in rows:
        model = [f"model={base / 'stage2' / row.name / 'model'}"] if row.train else []
        runs.append(run("stage3", row.name, spec.stage3, row.stage3, model))
    return runs


def _probe_runs(spec: GridSpec, rows: Sequence[RowSpec], runs: list[Run], out: Path, context, seed: int = 0
                ) -> list[Run]:
    """One probe per stage-1 encoder, on the data of the first stage-2 run that uses it (seed k > 0: its
    random encoder seeded k)."""
    probes = []
    for enc in dict.fromkeys(r.encoder for r in rows if r.encoder is not None):
        row = next((r for r in rows if r.encoder == enc and r.train), None)
        if row is None:
            continue
        stage2 = next(r for r in runs if r.phase == "stage2" and r.key == row.name)
        data = resolved(STAGES["stage2"].build_config(*_split_args(stage2.args))).data
        args = ["--encoder", str(out / "stage1" / enc / "eeg_encoder"), "--eeg", data.eeg_path, "--splits",
                data.splits_path, "--subject", str(data.subject), "--split-index", str(data.split_index),
                "--time-window", *map(str, data.time_window), "--n-times", str(data.n_times),
                "--out", str(out / "probe" / enc), *_fill(spec.probe_args, context), *(["--seed", str(seed)] if seed else [])]
        probes.append(Run(f"{'' if seed == 0 else f'seed{seed}/'}probe/{enc}", "probe", args, out / "probe" / enc,
                          seed=seed, key=enc))
    return probes


def _split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    files, overrides, it = [], [], iter(args)
    for arg in it:
        if arg == "--config":
            files.append(next(it))
        else:
            overrides.append(arg)
    return files, overrides


def check_finished(run: Run) -> None:
    """A finished run must have been made with the planned settings (else: an error naming it)."""
    if run.phase == "probe":
        return
    planned = OmegaConf.to_container(STAGES[run.phase].build_config(*_split_args(run.args)))
    saved_file = run.output_dir / "config.yaml"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file)) if saved_file.is_file() else None
    except Exception as err:  # yaml's scanner / parser errors
        raise ConfigError(f"{saved_file} is damaged ({str(err).splitlines()[0]}): delete {run.output_dir} to run "
                          f"{run.name} again") from err
    if saved != planned:
        differs = sorted(k for k in planned if saved is None or saved.get(k) != planned[k])
        raise ConfigError(f"{run.name} in {run.output_dir} was made with other settings ({', '.join(differs[:4])} "
                          "differ): delete that folder to run it again, or use another outputs folder")


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class ScriptJob:
    """A run's command in a subprocess; its output goes to `<output_dir>.log`. Stages 1-2 report their
    progress through metrics.csv (one row per finished epoch)."""

    run: Run
    threads: int | None = None  # OMP/MKL threads of the process (None: inherit)
    proc: subprocess.Popen | None = None
    seconds: float | None = None
    _ended: threading.Event = field(default_factory=threading.Event)
    _log_file: Any = None

    @property
    def log(self) -> Path:
        return self.run.output_dir.parent / f"{self.run.output_dir.name}.log"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "code"),
                                                                           os.environ.get("PYTHONPATH")]))}
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self._log_file = open(self.log, "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.run.command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO_ROOT)

        def wait() -> None:  # the run's own duration, however late the runner looks at it
            self.proc.wait()
            self.seconds = time.perf_counter() - started
            self._ended.set()

        threading.Thread(target=wait, daemon=True).start()

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._ended.is_set()

    def check(self) -> None:
        """A DreamDiffusionError naming the log if the process has ended with an error."""
        if self._ended.is_set() and self.proc.returncode != 0:
            raise DreamDiffusionError(f"{self.run.name} failed with exit code {self.proc.returncode}; see {self.log}")

    def progress(self) -> int:
        if self.run.phase not in ("stage1", "stage2"):
            return self.run.epochs if self._ended.is_set() else 0
        try:
            rows = (self.run.output_dir / "metrics.csv").read_text().splitlines()
        except FileNotFoundError:
            return 0
        return min(max(len(rows) - 1, 0), self.run.epochs)

    def stop(self) -> None:
        if self.running:
            self.proc.kill()
            self._ended.wait()
        if self._log_file is not None:
            self._log_file.close()


class GridRunner:
    """Runs a plan phase by phase, `jobs` processes at a time; finished runs are skipped.

    `start(phase)` starts a phase's first jobs without waiting (the demo starts stage 1 while its
    world is still being built); `run()` then completes every phase in order.
    """

    def __init__(self, runs: Sequence[Run], jobs: int = 1, threads: int | None = None, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.jobs, self.progress, self.log = max(1, jobs), progress, log
        self.skipped = [r for r in runs if r.done()]
        for run in self.skipped:
            check_finished(run)
        self.pending = {phase: [ScriptJob(r, threads) for r in runs if r.phase == phase and not r.done()]
                        for phase in PHASES}
        self.timings: dict[str, float] = {}

    def start(self, phase: str) -> None:
        for job in self.pending[phase][:self.jobs]:
            job.start()

    def run(self, poll_s: float = 0.5) -> dict[str, float]:
        for run in self.skipped:
            self.log(f"[grid] {run.name}: done already, skipped ({run.output_dir})")
        for phase in PHASES:
            if self.pending[phase]:
                self._run_phase(phase, poll_s)
        return self.timings

    def _run_phase(self, phase: str, poll_s: float) -> None:
        jobs = self.pending[phase]
        started = time.perf_counter()
        bar = tqdm(total=sum(j.run.epochs for j in jobs), desc=phase, unit="epoch" if phase in ("stage1", "stage2")
                   else "run", disable=not self.progress)
        try:
            while True:
                running = [j for j in jobs if j.running]
                for job in jobs:  # after `running`: a job that ends in between is seen next time round
                    job.check()
                waiting = [j for j in jobs if j.proc is None]
                for job in waiting[:max(self.jobs - len(running), 0)]:
                    job.start()
                    running.append(job)
                bar.update(sum(j.progress() for j in jobs) - bar.n)
                if not running and not waiting:
                    break
                time.sleep(poll_s)
        except BaseException:
            for job in jobs:
                job.stop()
            raise
        finally:
            bar.close()
        for job in jobs:
            job.stop()  # closes its log
            self.timings[job.run.name] = round(job.seconds, 1)
            self.log(f"[grid] {job.run.name} done in {job.seconds:.1f} s (log: {job.log})")
        self.timings[phase] = round(time.perf_counter() - started, 1)


def dry_run(runs: Sequence[Run], rows: Sequence[RowSpec] = ()) -> str:
    """The runs and their commands, as the runner would start them; with `rows`, first each row and the
    paper's figure it is meant to reproduce (repeated on its stage-2 and stage-3 runs)."""
    lines = []
    if rows:
        lines.append("# The rows, and the paper's figure each is meant to reproduce (50-way top-1, subject 4):")
        width = max(len(r.name) for r in rows)
        lines += [f"#   {r.name:<{width}}  {r.label}  ->  {paper_figure(r)}" for r in rows]
        lines.append("")
    by_name = {r.name: r for r in rows}
    for run in runs:
        state = "done, would be skipped" if run.done() else "to run"
        row = by_name.get(run.key) if run.phase in ("stage2", "stage3") else None
        paper = f"; {paper_figure(row)}" if row is not None else ""
        lines += [f"# {run.name} ({state}) -> {run.output_dir}{paper}", " ".join(_quote(a) for a in run.command), ""]
    return "\n".join(lines)


def paper_figure(row: RowSpec) -> str:
    """"the paper: 45.8%", or "the paper: no figure (<why>)"."""
    if row.paper_top1 is not None:
        return f"the paper: {row.paper_top1:.1f}%"
    return f"the paper: no figure ({row.paper_note or 'none given'})"


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " []{}$*") else arg


# ---------------------------------------------------------------------------------------------
# Results


def _load(path: Path) -> dict[str, Any] | None:
    """A finished run's JSON (None when the run has not written it)."""
    if not path.is_file():
        return None
    return read_own_json(path, f"delete {path.parent} and run the grid again (that run is then redone)")


def row_summary(report: dict[str, Any] | None, probe: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of one row: its stage-3 metrics.json and its encoder's probe.json."""
    if report is None:
        return {"status": "not run"}
    m = report["metrics"]
    n_way, retrieval = m.get("n_way"), m.get("retrieval")
    out: dict[str, Any] = {"status": "done", "n_trials": report["protocol"]["n_trials"],
                           "n_way": report["protocol"]["n_way"], "num_images_per_eeg": report["protocol"]["num_images_per_eeg"]}
    if n_way:
        out.update(top1=n_way["mean"], top1_ci=list(n_way["mean_ci95"]), top1_best_slot=n_way["best_slot"],
                   top1_best_slot_ci=list(n_way["best_slot_ci95"]), top1_per_slot=n_way["per_slot"])
    out["retrieval_top1"] = None if retrieval is None else retrieval["mean"]
    out["retrieval_n_way"] = None if retrieval is None else retrieval["n_way"]
    out["retrieval_chance"] = None if retrieval is None else retrieval["chance"]
    out["clip_similarity"] = m["clip_similarity"]["mean"] if "clip_similarity" in m else None
    if probe is not None:
        out["probe"] = {f"{r['features']}/{r['probe']}": r["test"]["accuracy"] for r in probe["rows"]}
    return out


def summarise(spec: GridSpec, rows: Sequence[RowSpec], runs: Sequence[Run]) -> dict[str, Any]:
    """metrics.json of the grid: per row its figures over the seeds (`seeds.combine_seeds`); per encoder
    the probe report of seed 0 (and, over several seeds, every seed's under `probes_by_seed`)."""
    n_seeds = max(r.seed for r in runs) + 1 if runs else 1
    probe_runs = {(r.key, r.seed): r for r in runs if r.phase == "probe"}
    by_seed = {(enc, k): _load(run.output_dir / "probe.json") for (enc, k), run in probe_runs.items()}
    encoders = list(dict.fromkeys(enc for enc, _ in probe_runs))
    summary = {"title": spec.title, "seeds": n_seeds, "rows": {}, "probes": {enc: by_seed[(enc, 0)] for enc in encoders}}
    if n_seeds > 1:
        summary["probes_by_seed"] = {enc: [by_seed.get((enc, k)) for k in range(n_seeds)] for enc in encoders}
    stage3 = {(r.key, r.seed): r for r in runs if r.phase == "stage3"}
    for row in rows:
        reports = [_load(stage3[(row.name, k)].output_dir / "metrics.json") for k in range(n_seeds)]
        per_seed = [row_summary(report, by_seed.get((row.encoder, k)) if row.encoder else None)
                    for k, report in enumerate(reports)]
        summary["rows"][row.name] = {"label": row.label, "encoder": row.encoder, "control": row.control,
                                     "paper_top1": row.paper_top1, "paper_note": row.paper_note,
                                     **combine_seeds(per_seed, reports),
                                     "stage3_metrics": str(stage3[(row.name, 0)].output_dir / "metrics.json")}
    done = [r for r in summary["rows"].values() if r["status"] == "done"]
    if done:
        summary["n_way"], summary["chance"] = done[0]["n_way"], 1.0 / done[0]["n_way"]
    return summary


def _pct(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _paper(row: dict[str, Any]) -> str:
    return "–" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}%"


def results_markdown(summary: dict[str, Any]) -> str:
    n_way, n_seeds = summary.get("n_way"), summary.get("seeds", 1)
    spread = " ± sd over seeds (each seed)" if n_seeds > 1 else ""
    interval = "pooled 95% CI" if n_seeds > 1 else "95% CI"
    lines = [f"# {summary['title']}", "",
             f"| Row | {n_way}-way top-1, mean of slots{spread} [{interval}] | x chance | best slot{spread} | "
             "EEG→image retrieval | probe of its encoder (linear, test) | seeds | the paper |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["rows"].items():
        if r["status"] != "done" or "top1" not in r:
            lines.append(f"| **{name}**: {r['label']} | {r['status']} | | | | | {r.get('seeds', 0)} | {_paper(r)} |")
            continue
        top1 = pct_spread(r["top1"], r.get("top1_sd"), r.get("top1_per_seed", ()))
        ci = r.get("top1_ci")
        best = pct_spread(r["top1_best_slot"], r.get("top1_best_slot_sd"), r.get("top1_best_slot_per_seed", ()))
        if r.get("seeds", 1) == 1:
            best = _pct(r["top1_best_slot"], r.get("top1_best_slot_ci"))
        retrieval = "–" if r["retrieval_top1"] is None else \
            f"{pct_spread(r['retrieval_top1'], r.get('retrieval_top1_sd'), r.get('retrieval_top1_per_seed', ()))} " \
            f"({r['retrieval_n_way']}-way)"
        probe = r.get("probe", {}).get("encoder/linear")
        probe_text = pct_spread(probe, (r.get("probe_sd") or {}).get("encoder/linear"),
                                (r.get("probe_per_seed") or {}).get("encoder/linear", ()))
        lines.append(f"| **{name}**: {r['label']} | {top1}{f' [{ci[0]:.1%}, {ci[1]:.1%}]' if ci else ''} | "
                     f"{r['top1'] * n_way:.1f} | {best} | {retrieval} | {probe_text} | {r['seeds']} | {_paper(r)} |")
    lines += ["", _table_note(summary)]
    lines += _probe_sections(summary)
    return "\n".join(lines) + "\n"


def _table_note(summary: dict[str, Any]) -> str:
    seeds = summary.get("seeds", 1)
    how = ("Each figure is one run (one seed): brackets are bootstrap 95% intervals over test trials, and say "
           "nothing about how much another seed would move it." if seeds == 1 else
           f"Each figure is the mean over the seeds that finished (the \"seeds\" column; {seeds} planned) ± their "
           "sample sd, with each seed's figure in parentheses after it; the top-1's interval is a bootstrap over test "
           "trials pooled across the seeds (the same trials resampled in every seed; `tools/seeds.py`).")
    notes = [f"`{name}`: {r['paper_note']}" for name, r in summary["rows"].items() if r.get("paper_note")]
    return (how + " \"Best slot\" is the best of the per-slot means (the paper's \"max\"), an optimistic selection "
            "(its interval is BCa, bias-corrected and accelerated; the others are percentile intervals). "
            "The paper's column: its 50-way top-1 on subject 4 (Bai et al., DreamDiffusion, ECCV 2024, ablation "
            "table), from the row files' `paper_top1`" + (f"; {'; '.join(notes)}." if notes else "."))


def _probe_sections(summary: dict[str, Any]) -> list[str]:
    lines = []
    by_seed = summary.get("probes_by_seed")
    for enc, probe in summary["probes"].items():
        rows = probe_rows_over_seeds(by_seed[enc]) if by_seed else []
        if probe is None and not rows:
            continue
        if rows:
            first = next(p for p in by_seed[enc] if p is not None)
            lines += ["", f"## Encoder probe: {enc} ({first['n_classes']} classes, chance {first['chance']:.1%}; "
                      f"{rows[0]['seeds']} seeds)", "", "| features | probe | val (mean) | test, mean ± sd (each seed) |",
                      "|---|---|---|---|"]
            lines += [f"| {p['features']} | {p['probe']} | {_pct(p['val_mean'])} | "
                      f"{pct_spread(p['test_mean'], p['test_sd'], p['test_per_seed'])} |" for p in rows]
            continue
        lines += ["", f"## Encoder probe: {enc} ({probe['n_classes']} classes, chance {probe['chance']:.1%})", "",
                  "| features | probe | val [95% CI] | test [95% CI] |", "|---|---|---|---|"]
        lines += [f"| {p['features']} | {p['probe']} | {_pct(p['val']['accuracy'], p['val']['ci95'])} | "
                  f"{_pct(p['test']['accuracy'], p['test']['ci95'])} |" for p in probe["rows"]]
    return lines


def write_results(spec: GridSpec, rows: Sequence[RowSpec], runs: Sequence[Run], context: dict[str, str] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`<results>/metrics.json` and `results.md`; returns the summary (with `extra` merged in)."""
    summary = {**summarise(spec, rows, runs), **(extra or {})}
    out = resolve_path(_fill([spec.results], context or {})[0])
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "results.md", results_markdown(summary))
    return summary
