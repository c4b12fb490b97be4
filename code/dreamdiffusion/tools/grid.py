"""A table of runs as one resumable command: the paper's ablation table, and `make demo`.

A grid folder (`configs/paper_table/`, `configs/demo/table/`) holds `grid.yaml` (a `GridSpec`: the
settings every run of a stage shares, and the stage-1 encoders rows may share) and one file per row
(a `RowSpec`: which encoder, what its stage-2 and stage-3 runs change). `plan` turns it into runs:

    stage1/<encoder>   once per encoder, shared by every row that uses it
    probe/<encoder>    the encoder probe (dreamdiffusion.evaluation.probe) on the stage-2 data: the encoder,
                       a random encoder of its size and the raw EEG
    stage2/<row>       eeg_encoder_path = the row's stage-1 export (null: trained from scratch)
    stage3/<row>       model = the row's stage-2 export

Each run is the stage's own script in a subprocess, in its own folder under `outputs`; a finished run
(its final files present, its config.yaml the planned one) is skipped, so the command resumes. A
finished run whose config differs is an error naming the run. Placeholders `{name}` in a spec's
strings are filled from the caller's context (e.g. the demo's world paths). `results.md` and
`metrics.json` gather each row's top-1 (mean and best slot, with intervals), its retrieval, the
probe of its encoder, and the paper's figure.
"""

from __future__ import annotations

import json
import os
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
from dreamdiffusion.core.files import atomic_write_json, atomic_write_text

PHASES = ("stage1", "probe", "stage2", "stage3")


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
    # The paper's 50-way top-1 (%) for this row, where the paper reports it; null = not reported / not
    # transcribed here.
    paper_top1: float | None = None
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

    name: str  # "stage2/full"
    phase: str  # stage1 | probe | stage2 | stage3
    args: list[str]  # the command line after the script
    output_dir: Path
    epochs: int = 1  # progress units: epochs of stages 1-2, one for the others

    @property
    def command(self) -> list[str]:
        if self.phase == "probe":
            return [sys.executable, "-m", "dreamdiffusion.evaluation.probe", *self.args]
        return [sys.executable, str(STAGES[self.phase].script_path), *self.args]

    def done(self) -> bool:
        final = {"stage1": "eeg_encoder/model.safetensors", "probe": "probe.json", "stage2": "model/dreamdiffusion.json",
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
         extra: dict[str, list[str]] | None = None) -> list[Run]:
    """The runs of `rows`, in phase order; `extra[stage]` overrides go to every run of that stage
    (e.g. trainer.devices=8)."""
    context, extra = {**(context or {})}, extra or {}
    out = resolve_path(_fill([spec.outputs], context)[0])
    quiet = {"stage1": ["trainer.progress_bar=false"], "stage2": ["trainer.progress_bar=false"],
             "stage3": ["progress_bar=false"]}
    runs: list[Run] = []
    for enc in dict.fromkeys(r.encoder for r in rows if r.encoder is not None):
        files, overrides = _stage_args(spec.stage1, StageArgs(overrides=spec.encoders[enc]),
                                       [f"output_dir={out / 'stage1' / enc}", *quiet["stage1"], *extra.get("stage1", [])],
                                       context)
        runs.append(Run(f"stage1/{enc}", "stage1", _as_args(files, overrides), out / "stage1" / enc,
                        int(STAGES["stage1"].build_config(files, overrides).epochs)))
    for row in rows:
        if not row.train:
            continue
        encoder = f"eeg_encoder_path={out / 'stage1' / row.encoder / 'eeg_encoder'}" if row.encoder else \
            "eeg_encoder_path=null"
        files, overrides = _stage_args(spec.stage2, row.stage2, [encoder, f"output_dir={out / 'stage2' / row.name}",
                                                                 *quiet["stage2"], *extra.get("stage2", [])], context)
        runs.append(Run(f"stage2/{row.name}", "stage2", _as_args(files, overrides), out / "stage2" / row.name,
                        int(STAGES["stage2"].build_config(files, overrides).epochs)))
    if spec.probe:
        runs += _probe_runs(spec, rows, runs, out, context)
    for row in rows:
        model = [f"model={out / 'stage2' / row.name / 'model'}"] if row.train else []
        files, overrides = _stage_args(spec.stage3, row.stage3, [*model, f"output_dir={out / 'stage3' / row.name}",
                                                                 *quiet["stage3"], *extra.get("stage3", [])], context)
        STAGES["stage3"].build_config(files, overrides)  # a bad key or value is an error now, not after training
        runs.append(Run(f"stage3/{row.name}", "stage3", _as_args(files, overrides), out / "stage3" / row.name))
    return sorted(runs, key=lambda r: PHASES.index(r.phase))


def _probe_runs(spec: GridSpec, rows: Sequence[RowSpec], runs: list[Run], out: Path, context) -> list[Run]:
    """One probe per stage-1 encoder, on the data of the first stage-2 run that uses it."""
    probes = []
    for enc in dict.fromkeys(r.encoder for r in rows if r.encoder is not None):
        row = next((r for r in rows if r.encoder == enc and r.train), None)
        if row is None:
            continue
        stage2 = next(r for r in runs if r.name == f"stage2/{row.name}")
        data = resolved(STAGES["stage2"].build_config(*_split_args(stage2.args))).data
        args = ["--encoder", str(out / "stage1" / enc / "eeg_encoder"), "--eeg", data.eeg_path, "--splits",
                data.splits_path, "--subject", str(data.subject), "--split-index", str(data.split_index),
                "--time-window", *map(str, data.time_window), "--n-times", str(data.n_times),
                "--out", str(out / "probe" / enc), *_fill(spec.probe_args, context)]
        probes.append(Run(f"probe/{enc}", "probe", args, out / "probe" / enc))
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
    saved = OmegaConf.to_container(OmegaConf.load(saved_file)) if saved_file.is_file() else None
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


def dry_run(runs: Sequence[Run]) -> str:
    """The runs and their commands, as the runner would start them."""
    lines = []
    for run in runs:
        state = "done, would be skipped" if run.done() else "to run"
        lines += [f"# {run.name} ({state}) -> {run.output_dir}", " ".join(_quote(a) for a in run.command), ""]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " []{}$*") else arg


# ---------------------------------------------------------------------------------------------
# Results


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


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
    """metrics.json of the grid: per row its figures; per encoder its probe report."""
    by_name = {r.name: r for r in runs}
    probes = {r.name.split("/", 1)[1]: _load(r.output_dir / "probe.json") for r in runs if r.phase == "probe"}
    summary = {"title": spec.title, "rows": {}, "probes": probes}
    for row in rows:
        report = _load(by_name[f"stage3/{row.name}"].output_dir / "metrics.json")
        summary["rows"][row.name] = {"label": row.label, "encoder": row.encoder, "control": row.control,
                                     "paper_top1": row.paper_top1,
                                     **row_summary(report, probes.get(row.encoder) if row.encoder else None),
                                     "stage3_metrics": str(by_name[f"stage3/{row.name}"].output_dir / "metrics.json")}
    done = [r for r in summary["rows"].values() if r["status"] == "done"]
    if done:
        summary["n_way"], summary["chance"] = done[0]["n_way"], 1.0 / done[0]["n_way"]
    return summary


def _pct(value: float | None, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def results_markdown(summary: dict[str, Any]) -> str:
    n_way = summary.get("n_way")
    lines = [f"# {summary['title']}", "",
             f"| Row | {n_way}-way top-1, mean of slots [95% CI] | x chance | best slot [95% CI] | EEG→image retrieval "
             "| probe of its encoder (linear, test) | the paper |", "|---|---|---|---|---|---|---|"]
    for name, r in summary["rows"].items():
        paper = "–" if r["paper_top1"] is None else f"{r['paper_top1']:.1f}%"
        if r["status"] != "done" or "top1" not in r:
            lines.append(f"| **{name}**: {r['label']} | {r['status']} | | | | | {paper} |")
            continue
        probe = r.get("probe", {}).get("encoder/linear")
        retrieval = "–" if r["retrieval_top1"] is None else f"{r['retrieval_top1']:.1%} ({r['retrieval_n_way']}-way)"
        lines.append(f"| **{name}**: {r['label']} | {_pct(r['top1'], r['top1_ci'])} | {r['top1'] * n_way:.1f} | "
                     f"{_pct(r['top1_best_slot'], r['top1_best_slot_ci'])} | {retrieval} | {_pct(probe)} | {paper} |")
    lines += ["", "Brackets: bootstrap 95% intervals over test trials. \"Best slot\" is the best of the per-slot means "
              "(the paper's \"max\"), an optimistic selection. The paper's column shows only the figures transcribed "
              "into the row files (`paper_top1`)."]
    for enc, probe in summary["probes"].items():
        if probe is None:
            continue
        lines += ["", f"## Encoder probe: {enc} ({probe['n_classes']} classes, chance {probe['chance']:.1%})", "",
                  "| features | probe | val [95% CI] | test [95% CI] |", "|---|---|---|---|"]
        lines += [f"| {p['features']} | {p['probe']} | {_pct(p['val']['accuracy'], p['val']['ci95'])} | "
                  f"{_pct(p['test']['accuracy'], p['test']['ci95'])} |" for p in probe["rows"]]
    return "\n".join(lines) + "\n"


def write_results(spec: GridSpec, rows: Sequence[RowSpec], runs: Sequence[Run], context: dict[str, str] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """`<results>/metrics.json` and `results.md`; returns the summary (with `extra` merged in)."""
    summary = {**summarise(spec, rows, runs), **(extra or {})}
    out = resolve_path(_fill([spec.results], context or {})[0])
    atomic_write_json(out / "metrics.json", summary)
    atomic_write_text(out / "results.md", results_markdown(summary))
    return summary
