"""`make demo-things` (code/demo.py --things): stages 2-3 on a synthetic THINGS-EEG2, zero-shot.

1. the demo world's tiny SD / CLIP (`demo_world.build_demo_world`, shared with `make demo`, built
   when missing) and a synthetic THINGS-EEG2 in the official layout (17 channels x 100 samples;
   `data.synthetic_things_eeg2.write_synthetic_things_eeg2`: unseen test concepts share their attributes with the
   training concepts, so zero-shot retrieval is possible in principle);
2. stage 2 on the training concepts (an encoder built for 17 x 100, trained from scratch), stage 3
   on the unseen test concepts, and the shuffled-labels control (each test EEG scored against the
   image of another concept: retrieval must fall to chance);
3. results/demo_things/results.md: the K-way retrieval table of both, and the reconstruction metrics.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from dreamdiffusion.config import REPO_ROOT
from dreamdiffusion.core.files import atomic_write_json
from dreamdiffusion.data.synthetic_things_eeg2 import write_synthetic_things_eeg2
from dreamdiffusion.evaluation import stage3
from dreamdiffusion.tools.demo_world import build_demo_world
from dreamdiffusion.train import stage2

CONFIGS = REPO_ROOT / "configs"
WORLD = {"n_train_concepts": 60, "images_per_concept": 4, "n_train_reps": 4, "n_test_concepts": 20,
         "n_test_reps": 20, "layout": "official", "image_size": 32, "signal_strength": 4.0, "seed": 0}


def _things_world(root: Path) -> dict[str, Path]:
    marker = root / "WORLD.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == WORLD):
        write_synthetic_things_eeg2(root, **WORLD)
        marker.write_text(json.dumps(WORLD, indent=2) + "\n")
    return {"eeg_dir": root / "preprocessed_eeg", "image_dir": root / "image_set"}


def _stage(name: str, configs: list[Path], overrides: list[str]) -> None:
    argv = [item for c in configs for item in ("--config", str(c))] + overrides
    {"stage2": stage2.main, "stage3": stage3.main}[name](argv)


def run_demo_things(dirs: dict[str, Path], progress: bool = True) -> dict[str, Any]:
    started, timings = time.perf_counter(), {}
    world, _ = build_demo_world(dirs["datasets"], dirs["pretrains"], progress=progress)
    things = _things_world(dirs["datasets"].parent / "demo_things")
    timings["world"] = round(time.perf_counter() - started, 1)
    out = dirs["outputs"]
    for stage in ("stage2", "stage3"):  # the demo's own runs: every run starts afresh (about a minute)
        shutil.rmtree(out / stage, ignore_errors=True)
    data = [f"data.image_dir={things['image_dir']}", f"data.things_eeg2.eeg_dir={things['eeg_dir']}"]
    bar = [] if progress else ["trainer.progress_bar=false"]
    t = time.perf_counter()
    _stage("stage2", [CONFIGS / "demo/stage2.yaml", CONFIGS / "presets/things_eeg2.yaml",
                      CONFIGS / "presets/things_eeg2_native_official.yaml", CONFIGS / "demo/things/stage2.yaml"],
           data + bar + [f"output_dir={out / 'stage2'}", f"sd_path={world.sd_dir}", f"clip_path={world.clip_dir}"])
    timings["stage2"] = round(time.perf_counter() - t, 1)
    reports = {}
    for row, extra in (("full", []), ("shuffled_labels", ["shuffled_labels=true"])):
        t = time.perf_counter()
        _stage("stage3", [CONFIGS / "demo/stage3.yaml", CONFIGS / "presets/things_eeg2.yaml", CONFIGS / "presets/things_eeg2_native.yaml",
                          CONFIGS / "presets/things_eeg2_eval.yaml", CONFIGS / "demo/things/stage3.yaml"],
               data + extra + [f"output_dir={out / 'stage3' / row}", f"model={out / 'stage2' / 'model'}",
                               f"clip_path={world.clip_dir}", f"progress_bar={str(progress).lower()}"])
        timings[f"stage3_{row}"] = round(time.perf_counter() - t, 1)
        reports[row] = json.loads((out / "stage3" / row / "metrics.json").read_text())
    timings["total"] = round(time.perf_counter() - started, 1)
    return write_things_results(dirs["results"], reports, timings)


def _cell(summary: dict | None) -> str:
    if summary is None:
        return "–"
    low, high = summary["mean_ci95"]
    return f"{summary['mean'] * 100:.1f}% [{low * 100:.1f}, {high * 100:.1f}]"


def write_things_results(results_dir: Path, reports: dict[str, dict], timings: dict[str, float]) -> dict[str, Any]:
    full = reports["full"]["metrics"]["retrieval_table"]
    ways = sorted(full, key=lambda w: int(w.split("-")[0]))
    top_way = ways[-1]
    lines = ["# `make demo-things`: zero-shot EEG→image retrieval on a synthetic THINGS-EEG2", "",
             f"{WORLD['n_train_concepts']} training concepts x {WORLD['images_per_concept']} images x "
             f"{WORLD['n_train_reps']} repetitions (averaged); {WORLD['n_test_concepts']} unseen test concepts x 1 image "
             f"x {WORLD['n_test_reps']} repetitions (averaged); subject 1, 17 channels x 100 samples (the official "
             "layout), the encoder trained from scratch in stage 2. Exact n-way expectations; brackets: bootstrap "
             "95% intervals over test trials.", "",
             "| Row | candidate images | " + " | ".join(f"{w} top-1" for w in ways) + f" | {top_way} top-5 |",
             "|---|---|" + "---|" * (len(ways) + 1)]
    for row, report in reports.items():
        table = report["metrics"]["retrieval_table"]
        cells = [_cell(table.get(w, {}).get("top1")) for w in ways] + [_cell(table.get(top_way, {}).get("top5"))]
        n_images = report["metrics"]["retrieval"]["n_images"]
        lines.append(f"| {row} | {n_images} | " + " | ".join(cells) + " |")
    chance = [f"{full[w]['top1']['chance'] * 100:.1f}%" for w in ways] + [f"{full[top_way]['top5']['chance'] * 100:.1f}%"]
    lines += ["| chance | | " + " | ".join(chance) + " |", "",
              "The shuffled-labels control scores each test EEG against the image of another concept; its "
              "candidates are the distinct images it was paired with, so an n-way larger than their number is "
              "\"–\".", ""]
    recon = {m: v for m, v in reports["full"]["metrics"].items() if m in ("pixcorr", "ssim_gray", "clip_2way")}
    lines += ["Reconstruction metrics of the full row (mean over slots): " + ", ".join(
        f"{m} {v['mean']:.3f}" for m, v in recon.items()) + ". Skipped: " + "; ".join(
        f"{m} ({why})" for m, why in reports["full"]["skipped"].items()) + ".", "",
        "Timings (s, this machine): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + "."]
    results_dir.mkdir(parents=True, exist_ok=True)
    summary = {"retrieval": {row: r["metrics"]["retrieval_table"] for row, r in reports.items()},
               "recon": recon, "skipped": reports["full"]["skipped"], "timings_s": timings, "world": WORLD}
    atomic_write_json(results_dir / "metrics.json", summary)  # no NaN in JSON (core/files.py)
    (results_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary
