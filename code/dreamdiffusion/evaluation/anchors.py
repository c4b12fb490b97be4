"""Today's anchors on THINGS-EEG2: published 200-way zero-shot retrieval, with how each picked its model.

What a THINGS-EEG2 run's results.md sets beside its own figures (`report.py`). Every figure is the
method's own (or the named re-run's), intra-subject = mean of the 10 subjects, inter-subject =
leave-one-subject-out, the 80 test repetitions averaged. The selection protocol matters as much as the
figure: a model picked by its test accuracy reports the best of many looks at the test set. The
protocols below are what each method's paper or public code does; "not stated" where our sources do
not say.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    method: str
    source: str
    intra: tuple[float, float] | None  # 200-way (top-1, top-5), %, intra-subject
    inter: tuple[float, float] | None  # the same, inter-subject (leave-one-subject-out)
    selection: str  # how the reported model was chosen: validation, test, last epoch, or not stated


THINGS_EEG2_ANCHORS = (
    Anchor("NICE", "Song et al., ICLR 2024; inter-subject as re-run by UBP (CVPR 2025, Table 1)", (15.6, 42.8),
           (6.2, 21.4), "validation: lowest contrastive loss on 740 held-out training images (NICE-EEG's code)"),
    Anchor("ATM-S", "Li et al., NeurIPS 2024, Table 8; UBP Table 1", (26.13, 55.32), (8.24, 25.36),
           "validation loss (intra-subject figures; inter-subject: not stated)"),
    Anchor("ATM-S, best test epoch", "Li et al., NeurIPS 2024, Table 8", (28.5, 60.4), None,
           "test: the best epoch by test accuracy"),
    Anchor("UBP", "Wu et al., CVPR 2025, Table 1", (50.9, 79.7), (12.4, 33.4),
           "intra-subject: last epoch (early stopping on the training loss); inter-subject: early stopping on the "
           "top-1 of the other subjects' EEG of the 200 test images (UBP's code)"),
    Anchor("CognitionCapturer (image expert only)", "its paper", (33.30, 60.58), None, "not stated"),
    Anchor("BrainHiVE", "ICLR 2026, its README", (80.8, 97.0), (33.7, 65.8), "not stated"),
)


def _pair(figures: tuple[float, float] | None) -> str:
    return "–" if figures is None else f"{figures[0]:g} / {figures[1]:g}"


def anchors_markdown() -> list[str]:
    """The anchors as a results.md table (lines), with what the columns mean."""
    lines = ["| method | intra-subject top-1 / top-5 (%) | inter-subject top-1 / top-5 (%) | model selected on | "
             "source |", "|---|---|---|---|---|"]
    lines += [f"| {a.method} | {_pair(a.intra)} | {_pair(a.inter)} | {a.selection} | {a.source} |"
              for a in THINGS_EEG2_ANCHORS]
    lines += ["", "200-way zero-shot EEG→image retrieval on the real THINGS-EEG2 (the 200 unseen test concepts, the 80 "
              "test repetitions averaged); intra-subject = mean of the 10 subjects, inter-subject = leave one subject "
              "out. A figure selected on the test set (or on test-image EEG) is an optimistic one; this project "
              "selects on validation only. Seed-to-seed spread is large in this literature (NICE averages 5 seeds)."]
    return lines
