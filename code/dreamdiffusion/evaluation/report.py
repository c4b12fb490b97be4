"""Stage 3's report: `metrics.json`, `results.md` and the image grids of a scored folder.

`write_report(cfg, out_dir, scores)` (scores: `scoring.FolderScores`) writes
  - `metrics.json`: the protocol (what was generated with what, and how it was scored), the
    summaries with their bootstrap intervals, the skipped metrics with the reason, notes, the
    deviations of this run and of the model's training, the config and every trial's scores;
  - `results.md`: the paper's table from the same dict (`results_markdown`), with the protocol;
  - `grids/grid-NNN.png`: a few trials per image, one row per trial (ground truth, then the samples).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from dreamdiffusion.config import to_container
from dreamdiffusion.core import fidelity
from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text, read_own_json
from dreamdiffusion.data.common import open_rgb
from dreamdiffusion.evaluation.anchors import anchors_markdown
from dreamdiffusion.evaluation.recon import LOWER_IS_BETTER, RECON_METRICS
from dreamdiffusion.evaluation.scoring import FolderScores, ImageFolder

logger = logging.getLogger(__name__)

# Stage-3 deviations that describe how images were generated (not listed for a foreign folder).
GENERATION_KEYS = {"sampler", "num_inference_steps", "num_images_per_eeg", "guidance_scale", "split",
                   "data.image_size", "data.subject", "data.split_index", "data.time_window", "data.n_times"}


def write_report(cfg: DictConfig, out_dir: Path, scores: FolderScores) -> dict[str, Any]:
    """metrics.json, results.md and grids/ in `out_dir` (cfg with resolved paths); returns the
    metrics.json dict."""
    report = build_report(cfg, scores)
    atomic_write_json(out_dir / "metrics.json", report)
    atomic_write_text(out_dir / "results.md", results_markdown(report))
    if scores.folder is not None:
        write_grids(scores.folder, out_dir / "grids", cfg.n_grid_trials)
    logger.info("stage 3: wrote %s and %s", out_dir / "metrics.json", out_dir / "results.md")
    return report


# ---------------------------------------------------------------------------------------------
# metrics.json


def build_report(cfg: DictConfig, scores: FolderScores) -> dict[str, Any]:
    """The metrics.json dict of a scored folder."""
    header, folder = scores.header, scores.folder
    model = (header or {}).get("settings", {}).get("model")
    return {
        "protocol": protocol(cfg, scores),
        "metrics": scores.results,
        "skipped": scores.skipped,
        "notes": (header or {}).get("notes", []) + ([f"{folder.n_ignored} file(s) of {folder.root} not named "
                                                      "test{i}-{k}.png were ignored"] if folder and folder.n_ignored else []),
        "deviations": deviations(cfg, generated_here=header is not None),
        "training_deviations": training_deviations(Path(model)) if model and not header["settings"].get("class_oracle")
        else None,
        "config": to_container(cfg),
        # the split's stimuli on two sides and the block design (data/split_hygiene.py), as generation saw them
        "split_hygiene": (header or {}).get("split_hygiene"),
        "trials": trial_rows(scores),
    }


def deviations(cfg: DictConfig, generated_here: bool) -> list[dict[str, Any]]:
    """This run's deviations; those of the generation only when the images were generated here."""
    return [d.record(cfg) for d in fidelity.applicable("stage3", cfg) if generated_here or d.key not in GENERATION_KEYS]


def training_deviations(model_path: Path) -> list[dict[str, Any]] | None:
    """The deviations stage 2 recorded for a model folder (`training.json`), if any."""
    path = model_path / "training.json"
    if model_path.is_dir() and path.is_file():
        record = read_own_json(path, f"delete {model_path} and rerun stage 2 with resume=true in {model_path.parent} "
                                     "to export it again", CheckpointError)
        return record.get("deviations") if isinstance(record, dict) else None
    return None


def protocol(cfg: DictConfig, scores: FolderScores) -> dict[str, Any]:
    """What was generated with what, and how it was scored (metrics.json's "protocol")."""
    header, folder, scorer, n_trials = scores.header, scores.folder, scores.scorer, scores.n_trials
    settings = (header or {}).get("settings", {})
    method = ("class-name oracle: base SD1.5 on \"" + cfg.oracle_prompt.format("<class>") + "\""
              if settings.get("class_oracle") else "DreamDiffusion" if header else f"images of {cfg.images_dir}")
    if settings.get("shuffled_labels"):
        method += " + shuffled-labels control"
    n_way_mode = ("exact expectation (closed form)" if cfg.n_way_trials is None else
                  f"sampled: {cfg.n_way_trials} draws of {cfg.n_way - 1} distractors per image, seed {cfg.seed}")
    out = {"method": method, "images": str(folder.root) if folder is not None else None, "n_trials": n_trials,
           "num_images_per_eeg": folder.n_slots if folder is not None else 0,
           "n_generated_images": n_trials * folder.n_slots if folder is not None else 0}
    if header:
        out.update(_generation_protocol(header))
    else:
        out["generation"] = "unknown: a folder scored without its generation records (generation.json)"
    out.update({
        "scored_from": "the uint8 PNG files on disk",
        "classifier": f"{cfg.classifier} (weights: {cfg.classifier_weights})" if "n_way" in scorer.metrics else None,
        "n_classes": getattr(scorer.nets.classifier, "n_classes", None),
        "reference_class": "the classifier's arg-max on the ground-truth image (k = 0)",
        "n_way": cfg.n_way, "top_k": cfg.top_k, "n_way_estimate": n_way_mode,
        "ties": "a distractor scoring exactly the reference's probability counts as beating it",
        "clip_reference": ("the original image files (the view stage 2 aligns to)" if scores.clip_from_originals
                           else "the k = 0 PNGs"),
        "bootstrap_samples": cfg.bootstrap_samples, "bootstrap_seed": cfg.seed,
    })
    return out


def _generation_protocol(header: dict[str, Any]) -> dict[str, Any]:
    """The protocol's entries read from the generation header (generation.json)."""
    settings = header["settings"]
    out = {k: header[k] for k in ("model", "checkpoint_selection", "latent_scale", "image_size", "precision",
                                  "device", "numerics", "versions") if k in header}
    things = settings.get("data.kind") == "things_eeg2"
    split = (f"{settings.get('split')} of THINGS-EEG2 ({settings['data.things_eeg2']['eeg_dir']})" if things else
             f"{settings.get('split')} (split_index {settings.get('data.split_index')} of "
             f"{settings.get('data.splits_path')})")
    out.update({"split": split, "subject": settings.get("data.subject"),
                "eeg_path": None if things else settings.get("data.eeg_path"), "sampler": settings.get("sampler"),
                "num_inference_steps": settings.get("num_inference_steps"), "eta": settings.get("eta"),
                "guidance_scale": settings.get("guidance_scale"), "seed": settings.get("seed"),
                "seeding": "trial i: torch.Generator().manual_seed(seed + i) -> one CPU seed per sample slot"})
    return out


def trial_rows(scores: FolderScores) -> list[dict[str, Any]]:
    """One row per trial: its generation record (or its index), reference class and scores."""
    records, scorer = scores.records, scores.scorer
    rows = [dict(records[i]) if records is not None else {"index": i} for i in range(scores.n_trials)]
    names = getattr(scorer.nets.classifier, "class_names", None)
    for row, ref in zip(rows, scorer.reference_class):
        row["reference_class"] = ref
        if names:
            row["reference_class_name"] = names[ref]
    for name, values in scorer.per_image().items():
        for t, row in enumerate(rows):
            row[name] = values[t].tolist()
    if scorer.retrieval_scores is not None:
        for row, value in zip(rows, scorer.retrieval_scores):
            row["retrieval"] = float(value)
    return rows


# ---------------------------------------------------------------------------------------------
# results.md


def results_markdown(report: dict) -> str:
    """The paper-style table, the protocol and the deviations, from a metrics.json dict."""
    p, r = report["protocol"], report["metrics"]
    n_way, k, slots = p["n_way"], p["top_k"], p["num_images_per_eeg"]
    fid = r.get("fid")
    head = (f"| Method | {n_way}-way top-{k} (mean over {slots} slots) | {n_way}-way top-{k} (best slot) | IS | FID | "
            "SSIM | PCC | MSE | LPIPS | CLIP sim. | EEG→image retrieval |")
    row = (f"| {p['method']} | {_fmt(r.get('n_way'), percent=True)} | {_fmt(r.get('n_way'), 'best_slot', percent=True)} | "
           f"{'–' if fid is None else format(fid['is_mean'], '.2f')} | {'–' if fid is None else format(fid['fid'], '.1f')} | "
           f"{_fmt(r.get('ssim'))} | {_fmt(r.get('pcc'))} | {_fmt(r.get('mse'), digits=4)} | {_fmt(r.get('lpips'))} | "
           f"{_fmt(r.get('clip_similarity'))} | {_fmt(r.get('retrieval'), percent=True)} |")
    lines = [f"# Stage 3 results: {p['method']}", "", head, "|" + "---|" * 11, row]
    if n_way == 50 and k == 1:
        lines.append("| DreamDiffusion, as reported in the paper (subject 4) | 45.8% | – | – | – | – | – | – | – | – | – |")
    lines += ["", "Means over trials; brackets: bootstrap 95% interval over trials "
              f"({p['bootstrap_samples']} resamples, seed {p['bootstrap_seed']}). \"Best slot\" is the best of the "
              f"{slots} per-slot means (the paper's \"max\"; the lowest for MSE, LPIPS), an optimistic selection; its "
              "interval is BCa (bias-corrected and accelerated, which allows for that selection's bias), the means' "
              "are percentile intervals.", ""]
    if "n_way" in r:
        per_slot = ", ".join(f"{v * 100:.1f}%" for v in r["n_way"]["per_slot"])
        lines.append(f"Per-slot {n_way}-way top-{k}: {per_slot}. Chance: {k / n_way * 100:.1f}%. Classifier top-1 "
                     f"agreement with the reference class (1 of {p.get('n_classes', '?')}): "
                     f"{_fmt(r.get('top1_agreement'), percent=True)}.")
    if "retrieval" in r:
        lines.append(f"EEG→image retrieval: {r['retrieval']['n_way']}-way among the split's distinct images, chance "
                     f"{r['retrieval']['chance'] * 100:.1f}% (the CLIP head's embedding vs CLIP image embeddings).")
    lines += _retrieval_section(report) + _recon_section(r)
    if fid is not None:
        lines.append(f"FID/IS/KID over {fid['n_generated']} generated vs {fid['n_reference']} ground-truth images "
                     f"(KID {fid['kid_mean']:.4f} ± {fid['kid_std']:.4f}); with few images these are strongly biased "
                     "and only comparable at equal counts.")
    lines += _hygiene_section(report.get("split_hygiene"))
    lines += ["", "## Protocol", ""] + [f"- **{key}**: {value}" for key, value in p.items() if key != "method"]
    if report.get("skipped"):
        lines += ["", "## Skipped metrics", ""] + [f"- **{n}**: {why}" for n, why in report["skipped"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", fidelity.markdown_section([d["line"] for d in report["deviations"]]).rstrip()]
    if report.get("training_deviations"):
        lines += ["", fidelity.markdown_section([d["line"] for d in report["training_deviations"]],
                                                "Deviations of the model's training (stage 2)").rstrip()]
    return "\n".join(lines) + "\n"


def _hygiene_section(hygiene: dict | None) -> list[str]:
    """What the split shares between its sides: repeated stimuli (named) and, for a block design, how
    the test trials relate to the training blocks."""
    if not hygiene:
        return []
    lines = ["", "## Split hygiene", "", f"{hygiene['dataset']}, {hygiene['where']}: distinct stimuli per split: "
             + "; ".join(f"{kind}s " + ", ".join(f"{n} {s}" for s, n in per.items())
                         for kind, per in hygiene["distinct_stimuli"].items()) + "."]
    repeated = hygiene["repeated"]
    lines += [f"- **repeated {r['kind']}s, {r['sides'][0]} and {r['sides'][1]}**: {r['count']} ("
              + ", ".join(r["names"][:20]) + (", ..." if r["count"] > 20 else "") + ")" for r in repeated]
    if not repeated:
        lines.append("- no stimulus occurs on more than one side of the split")
    if hygiene.get("block_design"):
        lines.append(f"- **block design**: {hygiene['block_design']['summary']}. A classifier can then use the "
                     "slow drift such a test trial shares with the training trials of its block, besides what the "
                     "EEG says about the image (Li et al., TPAMI 2020).")
    lines += [f"- {note}" for note in hygiene.get("notes", [])]
    return lines


def _fmt(summary: dict | None, key: str = "mean", percent: bool = False, digits: int = 3) -> str:
    """A summary's value with its 95% interval, e.g. "41.2% [38.0, 44.5]" (– when absent)."""
    if summary is None:
        return "–"
    value, ci = summary[key], summary.get(f"{key}_ci95")
    scale, unit = (100, "%") if percent else (1, "")
    d = 1 if percent else digits
    text = f"{value * scale:.{d}f}{unit}"
    if ci is not None and ci[0] != ci[1]:
        text += f" [{ci[0] * scale:.{d}f}, {ci[1] * scale:.{d}f}]"
    return text


def _things_protocol(config: dict) -> str | None:
    data = config.get("data", {})
    if data.get("kind") != "things_eeg2":
        return None
    t = data["things_eeg2"]
    if t.get("leave_out") is not None:
        who = f"inter-subject: trained on the other subjects, tested on subject {t['leave_out']}"
    elif data.get("subject") == 0:
        who = "all subjects pooled (train and test)"
    else:
        who = f"intra-subject (subject {data.get('subject')})"
    reps = "averaged" if t.get("average_repetitions_test") else "one trial per repetition"
    return (f"THINGS-EEG2 zero-shot: {who}; test repetitions {reps}; candidates = the test split's distinct images "
            f"(unseen concepts); image encoder: {config.get('clip_path')}")


def _retrieval_section(report: dict) -> list[str]:
    table = report["metrics"].get("retrieval_table")
    if not table:
        return []
    ks = sorted({int(k[3:]) for row in table.values() for k in row})
    lines = ["", "## EEG→image retrieval", "", "| n-way | " + " | ".join(f"top-{k}" for k in ks) + " | chance (top-1) |",
             "|---|" + "---|" * (len(ks) + 1)]
    for way, row in sorted(table.items(), key=lambda kv: int(kv[0].split("-")[0])):
        cells = [_fmt(row.get(f"top{k}"), percent=True) for k in ks]
        lines.append(f"| {way} | " + " | ".join(cells) + f" | {row['top1']['chance'] * 100:.1f}% |")
    things = _things_protocol(report["config"])
    if things:
        lines += ["", things + ".", "", "### Today's anchors (published, real data; ours above are for this run's data)",
                  ""] + anchors_markdown()
    return lines


def _recon_section(metrics: dict) -> list[str]:
    names = [m for m in RECON_METRICS if m in metrics]
    if not names:
        return []
    return ["", "## Reconstruction metrics (the brain-to-image literature's)", "",
            "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
            "| " + " | ".join(_fmt(metrics[m], percent=m.startswith(("alexnet", "inception", "clip_2way")))
                              for m in names) + " |",
            "", "Two-way identification (alexnet2/5, inception, clip_2way; chance 50%) compares each generated image "
            "with every ground truth of its sample slot; " + ", ".join(sorted(LOWER_IS_BETTER & set(names)) or ["–"])
            + ": correlation distance, lower is better."]


# ---------------------------------------------------------------------------------------------
# Grids


def write_grids(folder: ImageFolder, out_dir: Path, rows_per_grid: int) -> None:
    """`grids/grid-NNN.png`: `rows_per_grid` trials each, one row per trial (ground truth, then the samples)."""
    for n, start in enumerate(range(0, folder.n_trials, rows_per_grid)):
        tiles = [np.asarray(open_rgb(folder.path(i, k)))
                 for i in range(start, min(start + rows_per_grid, folder.n_trials)) for k in range(folder.n_slots + 1)]
        grid = make_grid(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2), nrow=folder.n_slots + 1,
                         padding=2, pad_value=255)
        with atomic_path(out_dir / f"grid-{n:03d}.png") as tmp:
            Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
