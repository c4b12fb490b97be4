"""The model card (`README.md`) of a stage-2 model folder, so the folder can be shared as it is.

It is rendered from what the folder itself holds - `training.json` (the stage-2 config, its deviations
and the val figures of the run) and `selection.json` (which epoch was exported, chosen on what) -
plus, once stage 3 has scored the model, that run's `metrics.json` for the test figures:

    python -m dreamdiffusion.train.model_card outputs/stage2/model --stage3 outputs/stage3/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dreamdiffusion.core.errors import DataError, run_cli
from dreamdiffusion.core.files import atomic_write_text

CARD_NAME = "README.md"
# The stage-2 settings the card lists (dotted keys of the Stage2Config).
CARD_SETTINGS = ("fidelity", "trainable", "epochs", "batch_size", "trainer.devices", "trainer.precision", "lr",
                 "weight_decay", "grad_clip", "clip_weight", "clip_loss", "use_time_cond", "context_tokens",
                 "global_pool", "seed", "eeg_encoder_path", "sd_path", "clip_path", "export")
VAL_FIGURES = ("val_loss", "val_diffusion", "val_clip", "val_top1")
# Stage-3 metrics shown when present (key of metrics.json's "metrics", label, as a percentage).
TEST_FIGURES = (("n_way", "n-way top-k (mean over slots)", True), ("clip_similarity", "CLIP similarity", False),
                ("ssim", "SSIM", False), ("pcc", "PCC", False), ("lpips", "LPIPS", False),
                ("retrieval", "EEG→image retrieval", True))


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _data_lines(config: dict[str, Any]) -> list[str]:
    data = config.get("data", {})
    if data.get("kind") == "things_eeg2":
        things = data.get("things_eeg2", {})
        who = "all subjects pooled" if data.get("subject") == 0 else f"subject {data.get('subject')}"
        if things.get("leave_out") is not None:
            who += f", subject {things['leave_out']} left out"
        lines = [f"- **dataset**: THINGS-EEG2 ({things.get('eeg_dir')})", f"- **subject**: {who}",
                 f"- **split**: the training concepts; val: {things.get('val_concepts')} held-out concepts"]
    else:
        subject = "all subjects" if data.get("subject") == 0 else f"subject {data.get('subject')}"
        lines = [f"- **dataset**: ImageNet-EEG ({data.get('eeg_path')})", f"- **subject**: {subject}",
                 f"- **split**: split_index {data.get('split_index')} of {data.get('splits_path')} "
                 "(train for training, val for checkpoint selection; test never seen)"]
    return lines + [f"- **images**: {data.get('image_dir')} at {data.get('image_size')} px"]


def _val_lines(val: dict[str, Any], selection: dict[str, Any]) -> list[str]:
    rows = [("exported epoch", val.get("exported") or {}), ("last epoch", val.get("last") or {})]
    lines = ["| | epoch | " + " | ".join(VAL_FIGURES) + " |", "|---|---|" + "---|" * len(VAL_FIGURES)]
    for label, row in rows:
        cells = [str(row.get(k) or "–") for k in VAL_FIGURES]
        lines.append(f"| {label} | {row.get('epoch', '–')} | " + " | ".join(cells) + " |")
    chosen = (f"`{selection.get('export', '?')}` (epoch {selection.get('epoch', '?')}), chosen on "
              f"{selection.get('chosen_on', '?')}" + (f" by {selection['monitor']} = {selection['value']:.4g}"
                                                       if selection.get("monitor") else ""))
    return [f"Exported: {chosen}.", "", *lines, "", "val_loss = diffusion + clip_weight x CLIP term (the "
            "training objective on the val split); val_top1: the n-way top-1 of val images when a classifier was set."]


def _test_lines(stage3: dict[str, Any] | None, source: str | None) -> list[str]:
    if stage3 is None:
        return ["None recorded yet: stage 3 (`code/stage3_generate_eval.py model=<this folder>`) measures them on the "
                "test split; `python -m dreamdiffusion.train.model_card <this folder> --stage3 <its metrics.json>` "
                "adds them here."]
    metrics, protocol = stage3.get("metrics", {}), stage3.get("protocol", {})
    lines = [f"From {source}: {protocol.get('n_trials', '?')} {protocol.get('split', 'test')} trials x "
             f"{protocol.get('num_images_per_eeg', '?')} images, sampler {protocol.get('sampler', '?')} "
             f"({protocol.get('num_inference_steps', '?')} steps), seed {protocol.get('seed', '?')}.", "",
             "| metric | mean | 95% interval |", "|---|---|---|"]
    for key, label, percent in TEST_FIGURES:
        summary = metrics.get(key)
        if not isinstance(summary, dict) or "mean" not in summary:
            continue
        scale, unit = (100, "%") if percent else (1, "")
        ci = summary.get("mean_ci95")
        interval = f"[{ci[0] * scale:.3g}{unit}, {ci[1] * scale:.3g}{unit}]" if ci else "–"
        lines.append(f"| {label} | {summary['mean'] * scale:.3g}{unit} | {interval} |")
    return lines


def render_model_card(training: dict[str, Any], selection: dict[str, Any], stage3: dict[str, Any] | None = None,
                      stage3_source: str | None = None) -> str:
    """The card's markdown from training.json's and selection.json's content (and a stage-3 metrics.json)."""
    config = training.get("config", {})
    encoder = training.get("eeg_input") or {}
    settings = [f"| `{key}` | `{_get(config, key)}` |" for key in CARD_SETTINGS]
    deviations = [f"- {d['line']}" for d in training.get("deviations", [])] or ["- none"]
    return "\n".join([
        "---", "library_name: diffusers", "tags: [dreamdiffusion, eeg, stable-diffusion, brain-decoding]", "---", "",
        "# DreamDiffusion: Stable Diffusion 1.5 conditioned on EEG", "",
        "A stage-2 export of this repository's DreamDiffusion reproduction: an EEG encoder (pretrained as a masked "
        "autoencoder in stage 1) and its mappers in place of SD1.5's text encoder, with the UNet's cross-attention "
        "fine-tuned. The folder is a diffusers pipeline (`model_index.json`); its `conditioner` is "
        "`dreamdiffusion.models.dreamdiffusion.EEGConditioner`, so the `dreamdiffusion` package must be importable.",
        "", "## Use", "", "```python", "import torch", "from dreamdiffusion import DreamDiffusionPipeline", "",
        'pipe = DreamDiffusionPipeline.from_pretrained("<this folder>", torch_dtype=torch.float16).to("cuda")',
        f"eeg = torch.randn(2, {encoder.get('n_channels', 'n_channels')}, {encoder.get('n_times', 'n_times')})"
        "  # [n_trials, n_channels, n_times], preprocessed as in training",
        "images = pipe(eeg, num_images_per_eeg=5, height=512, width=512, output_type=\"pil\").images", "```", "",
        "## Data", "", *_data_lines(config), "", "## Training settings", "", "| setting | value |", "|---|---|",
        *settings, "", "## Validation figures", "", *_val_lines(training.get("val", {}), selection), "",
        "## Test figures", "", *_test_lines(stage3, stage3_source), "",
        "## Deviations from the paper and the authors' code", "", *deviations, "",
    ])


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({what}): {err}") from err


def write_model_card(model_dir: str | Path, stage3_metrics: str | Path | None = None) -> Path:
    """(Re)write `model_dir/README.md` from the folder's training.json and selection.json, with the
    test figures of a stage-3 `metrics.json` when given. Returns the card's path."""
    folder = Path(model_dir)
    training = _read_json(folder / "training.json", "written by stage 2's export")
    selection = _read_json(folder / "selection.json", "written by stage 2's export")
    stage3 = _read_json(Path(stage3_metrics), "a stage-3 metrics.json") if stage3_metrics else None
    card = render_model_card(training, selection, stage3, str(stage3_metrics) if stage3_metrics else None)
    atomic_write_text(folder / CARD_NAME, card)
    return folder / CARD_NAME


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m dreamdiffusion.train.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a stage-2 model folder (<stage-2 output_dir>/model)")
    parser.add_argument("--stage3", help="a stage-3 metrics.json of this model, for the test figures")
    args = parser.parse_args(argv)
    return write_model_card(args.model_dir, args.stage3)


if __name__ == "__main__":
    sys.exit(run_cli(main))
