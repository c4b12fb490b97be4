"""`make demo`: the whole method end to end on the CPU, on a synthetic world where the answer is known.

    python code/demo.py            # ~15 min on 2 CPU cores: builds the world once, then stages 1-3
    python code/demo.py --quick    # a much smaller world and runs (the test in `make test`)

1. the world (`dreamdiffusion.demo_world`, rebuilt only when missing): synthetic ImageNet-EEG in the
   real formats under datasets/demo/, tiny CLIP / Stable Diffusion / classifier under pretrains/demo/;
2. stage 1 (`code/stage1_pretrain_eeg.py`): the EEG MAE on the unpaired corpus, started as soon as
   the world has written the corpus, so it trains on the second core while the world trains its
   stand-ins (the MAE needs a couple of thousand steps before its encoder is any use);
3. stage 2 (`code/stage2_finetune_sd.py`), four runs: full; no_pretrain (encoder from scratch);
   no_clip (clip_weight=0); shuffled_labels (trained on a copy of the EEG file in which the
   training trials' image/label pairing is shuffled - it can learn no EEG -> image mapping);
4. stage 3 (`code/stage3_generate_eval.py`), five runs: the four models, plus class_oracle (the base
   tiny SD conditioned on the tiny CLIP's text states of "a photo of a <class name>", no EEG);
5. results/demo/results.md + metrics.json (n-way top-1 with its bootstrap interval, EEG->image
   retrieval) and a grid of ground truth beside generated images (results/demo/demo_grid.png,
   copied to assets/demo_grid.png).
Every stage runs through its entry script with configs/demo/*.yaml (and configs/demo/quick/*.yaml for
--quick), so the demo exercises exactly what a user runs: stages 1 and 2 as single-threaded
subprocesses, two at a time (`--jobs`; their logs beside their output folders), stage 3 in this
process through `main(argv)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CODE_DIR = Path(__file__).resolve().parent
if str(CODE_DIR) not in sys.path:  # `python code/demo.py` from a fresh clone without `pip install -e`
    sys.path.insert(0, str(CODE_DIR))

from dreamdiffusion.config import REPO_ROOT, resolve_path  # noqa: E402
from dreamdiffusion.demo_world import DemoWorld, DemoWorldConfig, build_demo_world, write_shuffled_labels_copy  # noqa: E402
from dreamdiffusion.errors import ConfigError, DreamDiffusionError, run_cli  # noqa: E402
from dreamdiffusion.io import atomic_write_json, atomic_write_text  # noqa: E402
from dreamdiffusion.stages import STAGES  # noqa: E402

transformers_logging = importlib.import_module("transformers.utils.logging")

# The runs, in the order of the table. Stage-2 overrides on top of configs/demo/stage2.yaml.
TRAINED_RUNS: dict[str, list[str]] = {
    "full": [],
    "no_pretrain": ["eeg_encoder_path=null"],
    "no_clip": ["clip_weight=0"],
    "shuffled_labels": [],  # + data.eeg_path of the shuffled copy (set in `main`)
}
RUN_LABELS = {
    "full": "DreamDiffusion (stage-1 pretraining + CLIP alignment)",
    "no_pretrain": "without stage-1 pretraining (encoder from scratch)",
    "no_clip": "without the CLIP alignment loss",
    "shuffled_labels": "control: trained on shuffled EEG-image pairs",
    "class_oracle": "control: class-name oracle (base SD on \"a photo of a <class>\")",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller world and runs (about 3 minutes)")
    parser.add_argument("--datasets-dir", default=None, help="default: datasets/demo (datasets/demo_quick with --quick)")
    parser.add_argument("--pretrains-dir", default=None, help="default: pretrains/demo (pretrains/demo_quick)")
    parser.add_argument("--outputs-dir", default=None, help="default: outputs/demo (outputs/demo_quick)")
    parser.add_argument("--results-dir", default=None, help="default: results/demo (results/demo_quick)")
    parser.add_argument("--assets-dir", default=None,
                        help="where the README's grid image is copied (default: assets, not with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--jobs", type=int, default=2,
                        help="trainings run at once, as separate single-threaded processes (default 2, one per "
                             "core of a small machine: stage 1 beside the world's stand-ins, then the stage-2 "
                             "runs two by two; 1 = everything one after the other, in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the demo's models are so small that thread "
                             "synchronisation costs more than a second core gives, and far more on a busy machine)")
    return parser.parse_args(list(argv) if argv is not None else sys.argv[1:])


def _dir(value: str | None, default: str) -> Path:
    path = Path(value if value is not None else default)
    return path if path.is_absolute() else REPO_ROOT / path


def data_overrides(world: DemoWorld, eeg_path: Path | None = None) -> list[str]:
    return [f"data.eeg_path={eeg_path or world.eeg_path}", f"data.splits_path={world.splits_path}",
            f"data.image_dir={world.image_dir}"]


@dataclass
class ScriptJob:
    """One stage's script (`STAGES[stage].script args`) run as a single-threaded subprocess.

    Its output goes to `log`; its `metrics.csv` (one row per finished epoch, written by stages 1 and
    2) is what the demo's progress bar counts. `output_dir` is emptied first, so rows of an earlier
    demo run are not counted (the demo always trains from scratch).
    """

    name: str
    stage: str
    args: list[str]
    output_dir: Path
    log: Path
    epochs: int
    proc: subprocess.Popen | None = None
    seconds: float | None = None
    _ended: threading.Event = field(default_factory=threading.Event)
    _log_file: Any = None

    def start(self) -> None:
        if self.output_dir.exists():
            shutil.rmtree(self.output_dir)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_DIR), os.environ.get("PYTHONPATH")]))}
        self._log_file = open(self.log, "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, str(STAGES[self.stage].script_path), *self.args],
                                     stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

        def wait() -> None:  # the run's own duration, however late the demo looks at it
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
            raise DreamDiffusionError(f"{self.name} failed with exit code {self.proc.returncode}; see {self.log}")

    def epochs_done(self) -> int:
        try:
            rows = (self.output_dir / "metrics.csv").read_text().splitlines()
        except FileNotFoundError:
            return 0
        return min(max(len(rows) - 1, 0), self.epochs)

    def stop(self) -> None:
        if self.running:
            self.proc.kill()
            self._ended.wait()
        if self._log_file is not None:
            self._log_file.close()


def run_jobs(jobs: Sequence[ScriptJob], parallel: int, desc: str, progress: bool,
             timings: dict[str, float], poll_s: float = 0.5) -> None:
    """Run `jobs` (some may already be started), `parallel` at a time, with one progress bar of the
    epochs they have finished. On the first failure (or an interrupt) the others are stopped."""
    bar = tqdm(total=sum(j.epochs for j in jobs), desc=desc, unit="epoch", disable=not progress)
    try:
        while True:
            running = [j for j in jobs if j.running]
            for job in jobs:  # after `running`: a job that ends in between is seen next time round
                job.check()
            waiting = [j for j in jobs if j.proc is None]
            for job in waiting[:max(parallel - len(running), 0)]:
                job.start()
                running.append(job)
            bar.update(sum(j.epochs_done() for j in jobs) - bar.n)
            if not running and len(waiting) == 0:
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
        timings[job.name] = round(job.seconds, 1)
        print(f"    {job.name} done in {job.seconds:.1f} s (log: {job.log})", flush=True)


def summarise_run(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one stage-3 metrics.json that the demo's table shows."""
    metrics = report["metrics"]
    n_way, retrieval = metrics["n_way"], metrics.get("retrieval")
    return {
        "top1": n_way["mean"],
        "top1_ci": list(n_way["mean_ci95"]),
        "top1_best_slot": n_way["best_slot"],
        "top1_per_slot": n_way["per_slot"],
        "classifier_agreement": metrics["top1_agreement"]["mean"] if "top1_agreement" in metrics else None,
        "retrieval_top1": None if retrieval is None else retrieval["mean"],
        "retrieval_top1_ci": None if retrieval is None else list(retrieval["mean_ci95"]),
        "retrieval_n_way": None if retrieval is None else retrieval["n_way"],
        "retrieval_chance": None if retrieval is None else retrieval["chance"],
        "clip_similarity": metrics["clip_similarity"]["mean"] if "clip_similarity" in metrics else None,
        "ssim": metrics["ssim"]["mean"] if "ssim" in metrics else None,
        "n_trials": n_way["n_trials"],
        "n_slots": n_way["n_slots"],
    }


def results_markdown(summary: dict[str, Any]) -> str:
    n_way, chance = summary["n_way"], summary["chance"]
    lines = [
        "# `make demo` results",
        "",
        f"Synthetic world: {summary['world']['n_classes']} stimulus classes, {summary['world']['n_subjects']} "
        f"subjects (subject 4 used, as the paper), {summary['n_test_trials']} test trials x "
        f"{summary['num_images_per_eeg']} images. {n_way}-way top-1 = the paper's n-way protocol with "
        f"n = {n_way} (exact expectation; reference class = the tiny classifier's arg-max on the ground "
        f"truth); chance {chance:.1%}. Brackets: bootstrap 95% interval over test trials.",
        "",
        f"| Run | {n_way}-way top-1 (mean of {summary['num_images_per_eeg']} slots) | x chance | best slot | "
        "EEG→image retrieval | CLIP sim. |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        lo, hi = run["top1_ci"]
        retrieval = "–" if run["retrieval_top1"] is None else \
            f"{run['retrieval_top1']:.1%} ({run['retrieval_n_way']}-way, chance {run['retrieval_chance']:.1%})"
        clip = "–" if run["clip_similarity"] is None else f"{run['clip_similarity']:.3f}"
        lines.append(f"| **{name}**: {RUN_LABELS[name]} | {run['top1']:.1%} [{lo:.1%}, {hi:.1%}] | "
                     f"{run['top1'] / chance:.1f} | {run['top1_best_slot']:.1%} | {retrieval} | {clip} |")
    lines += ["", "Phase timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()) + ".",
              "", "Per-run details (protocol, all metrics, per-trial scores): "
              + ", ".join(f"`{p}`" for p in summary["stage3_outputs"].values()) + "."]
    return "\n".join(lines) + "\n"


def make_grid(stage3_dir: Path, out_path: Path, n_rows: int = 8, upscale: int = 3) -> Path:
    """Ground truth (first column) beside the generated samples of `n_rows` test trials of distinct
    classes, from stage 3's images/test{i}-{k}.png, enlarged `upscale` times (nearest neighbour)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.utils import make_grid as tile

    report = json.loads((stage3_dir / "metrics.json").read_text())
    rows, seen = [], set()
    for trial in report["trials"]:
        if trial["wnid"] in seen:
            continue
        seen.add(trial["wnid"])
        slot_files = sorted((stage3_dir / "images").glob(f"test{trial['index']}-*.png"),
                            key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        rows.append([np.asarray(Image.open(p).convert("RGB")) for p in slot_files])
        if len(rows) == n_rows:
            break
    tiles = torch.from_numpy(np.stack([image for row in rows for image in row])).permute(0, 3, 1, 2)
    grid = tile(tiles, nrow=len(rows[0]), padding=2, pad_value=255).permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path)
    return out_path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    # transformers prints a table of the unused keys whenever one tower of the tiny CLIP folder is loaded
    transformers_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_demo(args)
    finally:
        torch.set_num_threads(threads)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    suffix = "_quick" if args.quick else ""
    datasets_dir = _dir(args.datasets_dir, f"datasets/demo{suffix}")
    pretrains_dir = _dir(args.pretrains_dir, f"pretrains/demo{suffix}")
    outputs_dir = _dir(args.outputs_dir, f"outputs/demo{suffix}")
    results_dir = _dir(args.results_dir, f"results/demo{suffix}")
    assets_dir = None if (args.quick and args.assets_dir is None) else _dir(args.assets_dir, "assets")
    world_cfg = DemoWorldConfig.quick() if args.quick else DemoWorldConfig()
    progress = not args.no_progress
    configs = REPO_ROOT / "configs" / "demo"

    bar_off = [] if progress else ["trainer.progress_bar=false"]
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def phase(name: str):
        class _Phase:
            def __enter__(self):
                print(f"\n=== demo: {name} ===", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = round(time.perf_counter() - self.start, 1)
                if exc[0] is None:
                    print(f"=== demo: {name} done in {timings[name]} s ===", flush=True)

        return _Phase()

    def config_files(stage: str) -> list[str]:
        return [str(configs / f"{stage}.yaml")] + ([str(configs / "quick" / f"{stage}.yaml")] if args.quick else [])

    def script_args(stage: str, overrides: list[str]) -> list[str]:
        return [arg for f in config_files(stage) for arg in ("--config", f)] + overrides

    stage1_dir = outputs_dir / "stage1"
    stage1_overrides = [f"output_dir={stage1_dir}", f"data.root={DemoWorld(datasets_dir, pretrains_dir).pretrain_dir}"]

    def stage2_overrides(run: str, world: DemoWorld, shuffled_eeg: Path) -> list[str]:
        eeg_path = shuffled_eeg if run == "shuffled_labels" else None
        return [f"output_dir={outputs_dir / 'stage2' / run}", f"eeg_encoder_path={stage1_dir / 'eeg_encoder'}",
                f"sd_path={world.sd_dir}", f"clip_path={world.clip_dir}", *data_overrides(world, eeg_path),
                *TRAINED_RUNS[run]]

    def job(stage: str, name: str, overrides: list[str]) -> ScriptJob:
        cfg = STAGES[stage].build_config(config_files(stage), overrides)
        out = resolve_path(cfg.output_dir)
        return ScriptJob(name, stage, [*script_args(stage, overrides), "trainer.progress_bar=false"], out,
                         out.parent / f"{out.name}.log", int(cfg.epochs))

    background = args.jobs > 1
    # Stage 1 needs only the unpaired corpus, which the world writes first; with a second core it
    # trains there while the world trains its stand-ins (minutes that would otherwise be idle).
    stage1_job = job("stage1", "stage 1", stage1_overrides)

    def start_stage1(_: DemoWorld) -> None:
        print(f"[demo] stage 1 starts in the background on the second core (log: {stage1_job.log})", flush=True)
        stage1_job.start()

    # 1. the world (and, in the background, stage 1)
    try:
        with phase("world"):
            world, world_timings = build_demo_world(datasets_dir, pretrains_dir, world_cfg, progress=progress,
                                                    on_corpus_ready=start_stage1 if background else None)
            shuffled_eeg = write_shuffled_labels_copy(world, subject=4, seed=world_cfg.seed)
    except BaseException:
        stage1_job.stop()
        raise
    n_classes = world_cfg.n_classes

    # 2. stage 1
    with phase("stage 1 (the part left after the world)" if background else "stage 1"):
        if background:
            run_jobs([stage1_job], 1, "stage 1", progress, timings)
        else:
            STAGES["stage1"].main([*script_args("stage1", stage1_overrides), *bar_off])

    # 3. stage 2: four runs
    if background:
        with phase(f"stage 2 ({len(TRAINED_RUNS)} runs, {args.jobs} at a time)"):
            run_jobs([job("stage2", f"stage 2 ({run})", stage2_overrides(run, world, shuffled_eeg))
                      for run in TRAINED_RUNS], args.jobs, "stage 2", progress, timings)
    else:
        for run in TRAINED_RUNS:
            with phase(f"stage 2 ({run})"):
                STAGES["stage2"].main([*script_args("stage2", stage2_overrides(run, world, shuffled_eeg)), *bar_off])

    # 4. stage 3: five runs (the test split of the real file for every model)
    reports: dict[str, dict[str, Any]] = {}
    stage3_outputs: dict[str, str] = {}
    for run in [*TRAINED_RUNS, "class_oracle"]:
        out = outputs_dir / "stage3" / run
        model = outputs_dir / "stage2" / ("full" if run == "class_oracle" else run) / "model"
        extra = ["class_oracle=true"] if run == "class_oracle" else []
        with phase(f"stage 3 ({run})"):
            reports[run] = STAGES["stage3"].main([
                *script_args("stage3", []), f"output_dir={out}", f"model={model}",
                f"classifier={world.classifier_dir}", f"clip_path={world.clip_dir}",
                f"oracle_sd_path={world.sd_dir}", f"class_names_path={world.class_names_path}",
                *data_overrides(world), *extra, *([] if progress else ["progress_bar=false"])])
        stage3_outputs[run] = str(out / "metrics.json")

    # 5. results
    first = next(iter(reports.values()))
    n_way = int(first["protocol"]["n_way"])
    if n_way > n_classes:
        raise ConfigError(f"n_way ({n_way}) exceeds the demo's {n_classes} classes")
    timings["total"] = round(time.perf_counter() - started, 1)
    summary = {
        "n_way": n_way,
        "chance": 1.0 / n_way,
        "runs": {run: summarise_run(report) for run, report in reports.items()},
        "n_test_trials": first["protocol"]["n_trials"],
        "num_images_per_eeg": first["protocol"]["num_images_per_eeg"],
        "world": {"n_classes": n_classes, "n_subjects": world_cfg.n_subjects, "quick": args.quick,
                  "datasets_dir": str(world.datasets_dir), "pretrains_dir": str(world.pretrains_dir),
                  "build_s": world_timings, "check": json.loads(world.report_path.read_text())["check"]},
        "timings_s": timings,
        "stage3_outputs": stage3_outputs,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    grid = make_grid(outputs_dir / "stage3" / "full", results_dir / "demo_grid.png")
    summary["grid"] = str(grid)
    if assets_dir is not None:
        assets_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, assets_dir / "demo_grid.png")
    atomic_write_json(results_dir / "metrics.json", summary)
    text = results_markdown(summary)
    atomic_write_text(results_dir / "results.md", text)
    print("\n" + text)
    print(f"wrote {results_dir / 'results.md'}, {results_dir / 'metrics.json'} and {grid}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
