"""`make demo` (code/demo.py): the whole method end to end on the CPU, on a synthetic world where the answer is known.

    python code/demo.py            # ~9 min on 2 CPU cores: builds the world once, then the demo's grid
    python code/demo.py --quick    # a much smaller world and runs (the test in `make test`)
    python code/demo.py --things   # `make demo-things`: stages 2-3 on a synthetic THINGS-EEG2 (demo_things.py)
    python code/demo.py --seeds 3  # `make demo-seeds`: every row 3 times, mean +- sd (results/demo_seeds3)
    python code/demo.py --visual-share 0.3 --rows full,no_pretrain   # another unpaired corpus (docs/trust.md)

1. the world (`dreamdiffusion.tools.demo_world`, rebuilt only when missing): synthetic ImageNet-EEG in the
   real formats under datasets/demo/, tiny CLIP / Stable Diffusion / classifier under pretrains/demo/;
2. the rows of configs/demo/table/ through the grid runner that also runs the paper's ablation table
   (`dreamdiffusion.tools.grid`, code/paper_table.py): stage 1 once (started as soon as the world has
   written its corpus, on the second core), the encoder probe, stage 2 for full / no_pretrain /
   no_clip / shuffled_labels, stage 3 for those and the class-name oracle - each the real stage
   script in its own single-threaded process, `--jobs` at a time;
3. results/demo/results.md + metrics.json (the rows' n-way top-1 with bootstrap intervals,
   EEG->image retrieval, the encoder probe: pretrained vs random vs raw EEG) and a grid of ground
   truth beside generated images (results/demo/demo_grid.png, copied to assets/demo_grid.png).
Finished runs are kept and skipped on the next `make demo` (delete outputs/demo to run them again).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid as tile

from dreamdiffusion.config import REPO_ROOT
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.data.common import open_rgb
from dreamdiffusion.tools.demo_things import run_demo_things
from dreamdiffusion.tools.demo_world import (
    DemoWorld,
    DemoWorldConfig,
    build_demo_world,
    write_shuffled_labels_copy,
)
from dreamdiffusion.tools.grid import GridRunner, load_grid, plan, write_results

GRID = REPO_ROOT / "configs" / "demo" / "table"
QUICK = REPO_ROOT / "configs" / "demo" / "quick"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller world and runs (about a minute)")
    parser.add_argument("--things", action="store_true",
                        help="stages 2-3 on a synthetic THINGS-EEG2 instead (`make demo-things`; outputs/demo_things)")
    parser.add_argument("--datasets-dir", default=None, help="default: datasets/demo (datasets/demo_quick with --quick)")
    parser.add_argument("--pretrains-dir", default=None, help="default: pretrains/demo (pretrains/demo_quick)")
    parser.add_argument("--outputs-dir", default=None, help="default: outputs/demo (outputs/demo_quick)")
    parser.add_argument("--results-dir", default=None, help="default: results/demo (results/demo_quick)")
    parser.add_argument("--assets-dir", default=None,
                        help="where the README's grid image is copied (default: assets, for the plain demo only: not with "
                             "--quick, --seeds, --visual-share or --rows)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every row this many times (the grid's seeds: mean +- sd; seed 0 is the one-seed "
                             "demo's runs); the table goes to results/demo_seeds<N> unless --results-dir says")
    parser.add_argument("--rows", default=None, help="comma-separated rows of configs/demo/table (default: all)")
    parser.add_argument("--visual-share", type=float, default=None,
                        help="share of the unpaired corpus recorded in a visual paradigm (DemoWorldConfig."
                             "corpus_visual_share); another share than the default runs in outputs/demo_visual<share>")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at once, each a single-threaded process (default 2, one per core of a small "
                             "machine: stage 1 beside the world's stand-ins, then the stage-2 runs two by two)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: the demo's models are so small that thread "
                             "synchronisation costs more than a second core gives, and far more on a busy machine)")
    return parser.parse_args(list(argv) if argv is not None else sys.argv[1:])


def _dir(value: str | None, default: str) -> Path:
    path = Path(value if value is not None else default)
    return path if path.is_absolute() else REPO_ROOT / path


def make_grid(stage3_dir: Path, out_path: Path, n_rows: int = 8, upscale: int = 3) -> Path:
    """Ground truth (first column) beside the generated samples of `n_rows` test trials of distinct
    classes, from stage 3's images/test{i}-{k}.png, enlarged `upscale` times (nearest neighbour)."""

    report = json.loads((stage3_dir / "metrics.json").read_text())
    rows, seen = [], set()
    for trial in report["trials"]:
        if trial["wnid"] in seen:
            continue
        seen.add(trial["wnid"])
        slots = range(report["protocol"]["num_images_per_eeg"] + 1)
        rows.append([np.asarray(open_rgb(stage3_dir / "images" / f"test{trial['index']}-{k}.png")) for k in slots])
        if len(rows) == n_rows:
            break
    tiles = torch.from_numpy(np.stack([image for row in rows for image in row])).permute(0, 3, 1, 2)
    grid = tile(tiles, nrow=len(rows[0]), padding=2, pad_value=255).permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path)
    return out_path


def _pick_rows(rows: list, wanted: str | None) -> list:
    """The rows named in `--rows` (all without it); an unknown name is a ConfigError naming the known ones."""
    if not wanted:
        return rows
    names = wanted.split(",")
    unknown = sorted(set(names) - {r.name for r in rows})
    if unknown:
        raise ConfigError(f"--rows: no row named {unknown} in {GRID} (rows: {', '.join(r.name for r in rows)})")
    return [r for r in rows if r.name in names]


def _intro(world_cfg: DemoWorldConfig, summary: dict[str, Any]) -> str:
    n_way, rows = summary.get("n_way"), [r for r in summary["rows"].values() if r["status"] == "done"]
    n_trials = rows[0]["n_trials"] if rows else "?"
    slots = rows[0]["num_images_per_eeg"] if rows else "?"
    return (f"Synthetic world: {world_cfg.n_classes} stimulus classes, {world_cfg.n_subjects} subjects (subject 4 used, "
            f"as the paper), {n_trials} test trials x {slots} images; unpaired corpus {world_cfg.corpus_visual_share:.0%} "
            f"visual-paradigm recordings; {summary.get('seeds', 1)} seed(s) per row. {n_way}-way top-1 = the paper's n-way protocol "
            f"with n = {n_way} (exact expectation; reference class = the tiny classifier's arg-max on the ground "
            f"truth); chance {1 / n_way:.1%}. \"x chance\" = top-1 / chance.")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:

    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.things:

            dirs = {"datasets": _dir(args.datasets_dir, "datasets/demo"),
                    "pretrains": _dir(args.pretrains_dir, "pretrains/demo"),
                    "outputs": _dir(args.outputs_dir, "outputs/demo_things"),
                    "results": _dir(args.results_dir, "results/demo_things")}
            return run_demo_things(dirs, progress=not args.no_progress)
        return run_demo(args)
    finally:
        torch.set_num_threads(threads)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    suffix = "_quick" if args.quick else ""
    world_cfg = DemoWorldConfig.quick() if args.quick else DemoWorldConfig()
    if args.visual_share is not None and args.visual_share != world_cfg.corpus_visual_share:
        world_cfg = replace(world_cfg, corpus_visual_share=args.visual_share)
        suffix += f"_visual{args.visual_share:g}"  # its own runs: stage 1 reads another corpus
    dirs = {"datasets": _dir(args.datasets_dir, f"datasets/demo{'_quick' if args.quick else ''}"),
            "pretrains": _dir(args.pretrains_dir, f"pretrains/demo{'_quick' if args.quick else ''}"),
            "outputs": _dir(args.outputs_dir, f"outputs/demo{suffix}"),
            "results": _dir(args.results_dir, f"results/demo{suffix}" + (f"_seeds{args.seeds}" if args.seeds > 1 else ""))}
    # The README's grid image is `make demo`'s own: a variant (quick, seeds, another corpus, some rows) keeps its
    # grid in its results folder unless --assets-dir says where to copy it.
    variant = args.quick or args.seeds > 1 or suffix != "" or args.rows is not None
    assets = None if (variant and args.assets_dir is None) else _dir(args.assets_dir, "assets")
    progress = not args.no_progress
    started = time.perf_counter()

    # 1. the grid's runs (planned first: stage 1 starts as soon as the world has written its corpus)
    spec, rows = load_grid(GRID)
    if args.quick:
        for stage in ("stage1", "stage2", "stage3"):
            getattr(spec, stage).config.append(str(QUICK / f"{stage}.yaml"))
    rows = _pick_rows(rows, args.rows)
    corpus = DemoWorld(dirs["datasets"], dirs["pretrains"], world_cfg.corpus_visual_share).pretrain_dir
    context = {**{name: str(path) for name, path in dirs.items()}, "corpus": str(corpus)}
    runs = plan(spec, rows, context, seeds=args.seeds)
    runner = GridRunner(runs, jobs=args.jobs, threads=args.threads, progress=progress)

    # 2. the world, with stage 1 in the background when there is a second job slot
    print("\n=== demo: world ===", flush=True)
    on_corpus = (lambda _world: runner.start("stage1")) if args.jobs > 1 else None
    world, world_timings = build_demo_world(dirs["datasets"], dirs["pretrains"], world_cfg, progress=progress,
                                            on_corpus_ready=on_corpus)
    write_shuffled_labels_copy(world, subject=4, seed=world_cfg.seed)
    world_s = round(time.perf_counter() - started, 1)

    # 3. the runs, then the results
    print("\n=== demo: the grid's runs ===", flush=True)
    timings = {"world": world_s, **runner.run()}
    timings["total"] = round(time.perf_counter() - started, 1)
    check = json.loads(world.report_path.read_text())["check"]
    extra = {"world": {"n_classes": world_cfg.n_classes, "n_subjects": world_cfg.n_subjects, "quick": args.quick,
                       "corpus_visual_share": world_cfg.corpus_visual_share, "corpus": str(world.pretrain_dir),
                       "datasets_dir": str(world.datasets_dir), "pretrains_dir": str(world.pretrains_dir),
                       "build_s": world_timings, "check": check}, "timings_s": timings}
    summary = write_results(spec, rows, runs, context, extra)
    if "full" not in {r.name for r in rows}:
        print(f"wrote {dirs['results'] / 'results.md'} and metrics.json (no grid image: the full row did not run)")
        return summary
    grid_png = make_grid(dirs["outputs"] / "stage3" / "full", dirs["results"] / "demo_grid.png")
    if assets is not None:
        assets.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid_png, assets / "demo_grid.png")
    text = _intro(world_cfg, summary) + "\n\n" + (dirs["results"] / "results.md").read_text()
    (dirs["results"] / "results.md").write_text(text)
    print("\n" + text)
    print(f"wrote {dirs['results'] / 'results.md'}, {dirs['results'] / 'metrics.json'} and {grid_png}")
    return summary

