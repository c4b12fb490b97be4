"""The selection audit (stage 2, `selection_audit=true`): what choosing on the test set would have bought.

The authors' code keeps the checkpoint with the best "max over 5 sample slots" n-way top-1 on the first
25 TEST trials. This project chooses on the val split only. To show how much that choice matters, the
audit samples those test trials at every validation (`audit_slots` images each, the val sampler, a fixed
generator so every epoch sees the same noise), scores them with the n-way classifier, and writes the
figures to `selection_audit.json` - aside: nothing is logged to Lightning, so no checkpoint callback
can monitor it, and best.ckpt stays the val split's choice. At the end `summarise_audit` reports:
  - the epoch the authors' rule would have picked (the best best-slot top-1 of those trials),
  - the epoch validation picked (what `model/` exports, from selection.json),
  - the authors' figure at both, and how much higher it is at the test-picked epoch (the inflation that
    selecting on the test set adds to the reported figure, on top of the best-slot choice itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from PIL import Image

from dreamdiffusion.core.files import atomic_write_json, read_own_json
from dreamdiffusion.evaluation.scoring import MetricNetworks, Scorer
from dreamdiffusion.models.classifier import load_classifier

AUDIT_FILE = "selection_audit.json"


class SelectionAudit(pl.Callback):
    """At every validation (not the sanity check), rank 0 samples and scores the audit's test trials and
    rewrites `<output_dir>/selection_audit.json`; a resumed run keeps the epochs recorded before."""

    def __init__(self, out_dir: Path, test_items: list[dict], slots: int, n_way: int, classifier: str,
                 classifier_weights: str | None):
        self.path = Path(out_dir) / AUDIT_FILE
        self.items, self.slots, self.n_way = test_items, slots, n_way
        self.classifier, self.classifier_weights = classifier, classifier_weights

    def _records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return read_own_json(self.path, f"delete {self.path} to start the audit again")["epochs"]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        truth, generated = pl_module.sample_images(self.items, self.slots)  # uint8 [n, H, W, 3], [n, k, H, W, 3]
        summary = self._score(pl_module, truth, generated)
        epoch = trainer.current_epoch
        records = [r for r in self._records() if r["epoch"] != epoch]
        records.append({"epoch": epoch, "best_slot": summary["best_slot"], "best_slot_index": summary["best_slot_index"],
                        "mean": summary["mean"], "per_slot": summary["per_slot"]})
        atomic_write_json(self.path, {"rule": audit_rule(len(self.items), self.slots, self.n_way),
                                      "epochs": sorted(records, key=lambda r: r["epoch"])})

    def _score(self, pl_module: pl.LightningModule, truth, generated) -> dict[str, Any]:
        """The n-way summary of the audit's images, scored as stage 3 scores (`scoring.Scorer`); the
        classifier is the module's val classifier when it has loaded one."""
        cache = getattr(pl_module, "_classifier", None)
        if cache is None:
            cache = []
        if not cache:
            cache.append(load_classifier(self.classifier, self.classifier_weights))
        classifier = cache[0].to(pl_module.device)
        try:
            scorer = Scorer(["n_way"], MetricNetworks(classifier=classifier), n_way=self.n_way)
            scorer.add_trials([Image.fromarray(t) for t in truth], [[Image.fromarray(g) for g in row] for row in generated])
            return scorer.compute(n_bootstrap=0)["n_way"]
        finally:
            classifier.to("cpu")


def audit_rule(n_trials: int, slots: int, n_way: int) -> str:
    return (f"the best of {slots} per-slot {n_way}-way top-1 means over the first {n_trials} test trials (the authors' "
            "checkpoint rule), sampled at every validation with a fixed generator")


def summarise_audit(out_dir: Path, selection: dict[str, Any]) -> dict[str, Any] | None:
    """What the authors' rule would have picked against what validation picked (`selection`: the
    model's selection.json); None when the audit did not run. Also written into selection_audit.json."""
    path = Path(out_dir) / AUDIT_FILE
    if not path.is_file():
        return None
    audit = read_own_json(path, f"delete {path} and rerun stage 2 to audit again")
    epochs = audit["epochs"]
    if not epochs:
        return None
    test_pick = max(epochs, key=lambda r: (r["best_slot"], -r["epoch"]))  # ties: the earliest, as a `>` scan
    val_epoch = selection.get("epoch")
    val_pick = next((r for r in epochs if r["epoch"] == val_epoch), None)
    if val_pick is None and selection.get("export") == "last":  # the last epoch: its validation is the last audited
        val_pick = epochs[-1]
    out = {"rule": audit["rule"], "audited_epochs": [r["epoch"] for r in epochs],
           "test_picked_epoch": test_pick["epoch"], "test_picked_figure": test_pick["best_slot"],
           "val_picked_epoch": val_epoch, "val_picked_chosen_on": selection.get("chosen_on"),
           "val_picked_figure": None if val_pick is None else val_pick["best_slot"],
           "inflation": None if val_pick is None else test_pick["best_slot"] - val_pick["best_slot"],
           "note": "the test figures were never used to choose; model/ holds the val-picked checkpoint"}
    atomic_write_json(path, {**audit, "summary": out})
    return out


def audit_table_rows(summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Rows of the run's results.md table."""
    if summary is None:
        return []
    val = "-" if summary["val_picked_figure"] is None else f"{summary['val_picked_figure']:.1%}"
    inflation = "-" if summary["inflation"] is None else f"{summary['inflation'] * 100:+.1f} points"
    return [("selection audit: the authors' rule (test) would pick",
             f"epoch {summary['test_picked_epoch']}: {summary['test_picked_figure']:.1%}"),
            ("selection audit: the val-picked epoch, same figure", f"epoch {summary['val_picked_epoch']}: {val}"),
            ("selection audit: inflation from choosing on test", inflation)]
