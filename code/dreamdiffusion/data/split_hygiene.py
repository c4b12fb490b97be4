"""Split hygiene: the stimuli that occur on more than one side of a split, and what the block design
lets a test trial share with training.

A stimulus seen in training and again at test lets a model score by recognising that stimulus's own
response rather than by decoding what the EEG says about its class: the "repeated-stimulus confound"
(Kilgallen et al. 2024, arXiv 2406.16902), which even meaningless pseudo-labels can exploit. So for the
split a run uses this module counts, per kind of stimulus, the ones on two sides and names them:
  - ImageNet-EEG: images (the file's `images` names) of the trials each split keeps;
  - THINGS-EEG2: images (`image_metadata.npy`'s file names) and concepts (the concept folder name
    without its per-partition number, "00042_banana" -> "banana").
A stage refuses a split that repeats stimuli between train and test (`check_repeated_stimuli`) unless
`data.allow_repeated_stimuli=true`, which the run then lists among its deviations (core/fidelity.py).

The block design (ImageNet-EEG; Li et al., TPAMI 2020): all images of a class were shown in one block,
so slow drift shared within a block is a class cue. `eeg_5_95_std.pth` records no presentation time
or order and no block id, so which block a trial was in can only be inferred from its class and
subject (all images of a class in one block, by the dataset's published design). `block_design` counts
the test trials whose (subject, class) also has training trials - those share their block with
training - and how many classes' trials are contiguous in the file's order (what would hold if the
file kept presentation order, which it does not say it does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from dreamdiffusion.core.errors import DataError

SIDES = ("train", "val", "test")
SHOWN = 10  # names listed per overlap in a message (all of them are in the record)
CONCEPT_NUMBER = re.compile(r"^\d+_")


@dataclass
class Overlap:
    """Stimuli of one kind that occur in two splits."""

    kind: str  # "image" | "concept"
    sides: tuple[str, str]
    names: list[str]  # sorted

    def line(self) -> str:
        shown = ", ".join(self.names[:SHOWN]) + (f", ... ({len(self.names) - SHOWN} more)" if len(self.names) > SHOWN
                                                 else "")
        return f"{len(self.names)} {self.kind}(s) in both {self.sides[0]} and {self.sides[1]}: {shown}"


@dataclass
class SplitHygiene:
    """What `check_repeated_stimuli` and the reports read: the stimuli per split and their overlaps."""

    dataset: str  # "ImageNet-EEG" | "THINGS-EEG2"
    where: str  # the split in words ("split 0 of <file>, subject 4")
    counts: dict[str, dict[str, int]]  # kind -> split -> distinct stimuli
    overlaps: list[Overlap]
    block_design: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def repeated(self, a: str = "train", b: str = "test") -> list[Overlap]:
        return [o for o in self.overlaps if set(o.sides) == {a, b}]

    def lines(self) -> list[str]:
        """The check's report: counts, every overlap (named), the block design."""
        kinds = ", ".join(f"{kind}s " + " / ".join(f"{n} {s}" for s, n in per.items()) for kind, per in self.counts.items())
        out = [f"split hygiene ({self.where}): distinct {kinds}"]
        out += [f"  repeated: {o.line()}" for o in self.overlaps] or ["  no stimulus occurs in more than one split"]
        if self.block_design:
            out.append(f"  block design: {self.block_design['summary']}")
        return out + [f"  note: {n}" for n in self.notes]

    def record(self) -> dict[str, Any]:
        """Plain data for metrics.json / generation.json."""
        return {"dataset": self.dataset, "where": self.where, "distinct_stimuli": self.counts,
                "repeated": [{"kind": o.kind, "sides": list(o.sides), "count": len(o.names), "names": o.names}
                             for o in self.overlaps],
                "block_design": self.block_design, "notes": self.notes}


def overlaps(stimuli: Mapping[str, Mapping[str, Sequence[str]]]) -> list[Overlap]:
    """Every pair of splits sharing stimuli, per kind: `stimuli[kind][split]` = the split's stimulus names."""
    out = []
    for kind, per_split in stimuli.items():
        present = [s for s in SIDES if s in per_split] + [s for s in per_split if s not in SIDES]
        for a, b in combinations(present, 2):
            shared = sorted(set(per_split[a]) & set(per_split[b]))
            if shared:
                out.append(Overlap(kind, (a, b), shared))
    return out


def check_repeated_stimuli(hygiene: SplitHygiene, allow: bool) -> None:
    """A DataError naming the stimuli repeated between train and test, unless `allow`."""
    repeated = hygiene.repeated("train", "test")
    if repeated and not allow:
        raise DataError(
            f"{hygiene.dataset} {hygiene.where} repeats stimuli between train and test - "
            + "; ".join(o.line() for o in repeated)
            + ". A model can then score by recognising a stimulus's own response instead of decoding the EEG "
            "(the repeated-stimulus confound): use a split whose test stimuli are unseen in training, or set "
            "data.allow_repeated_stimuli=true to run on it anyway (the run then lists it among its deviations)")


# ---------------------------------------------------------------------------------------------
# ImageNet-EEG


def imagenet_eeg_hygiene(filtered: Sequence[dict], positions: Mapping[str, Sequence[int]], image_names: Sequence[str],
                         where: str) -> SplitHygiene:
    """The hygiene of ImageNet-EEG split positions (`positions[split]`: the kept positions in the
    subject-filtered trial list `filtered`; `image_names`: the file's `images`)."""
    images = {split: [image_names[int(filtered[p]["image"])] for p in kept] for split, kept in positions.items()}
    return SplitHygiene(
        dataset="ImageNet-EEG", where=where, counts={"image": {s: len(set(v)) for s, v in images.items()}},
        overlaps=overlaps({"image": images}), block_design=block_design(filtered, positions),
        notes=["each image is shown once per subject in ImageNet-EEG, so with one subject an image can only "
               "repeat across splits if the split file lists the same trial twice; with subject 0 (all "
               "subjects) a split by trial rather than by image repeats images across subjects"])


def block_design(filtered: Sequence[dict], positions: Mapping[str, Sequence[int]]) -> dict[str, Any] | None:
    """How test trials relate to training blocks, as far as the file can tell (module docstring)."""
    if "test" not in positions or "train" not in positions:
        return None
    trained = {(int(filtered[p]["subject"]), int(filtered[p]["label"])) for p in positions["train"]}
    test = [(int(filtered[p]["subject"]), int(filtered[p]["label"])) for p in positions["test"]]
    sharing = sum(key in trained for key in test)
    runs: dict[tuple[int, int], int] = {}  # (subject, class) -> contiguous runs in file order
    previous = None
    for trial in filtered:
        key = (int(trial["subject"]), int(trial["label"]))
        if key != previous:
            runs[key] = runs.get(key, 0) + 1
        previous = key
    contiguous = sum(n == 1 for n in runs.values())
    return {
        "test_trials": len(test), "test_trials_sharing_a_block_with_training": sharing,
        "subject_classes": len(runs), "subject_classes_contiguous_in_file_order": contiguous,
        "presentation_order_recorded": False,
        "summary": (f"{sharing} of {len(test)} test trials have training trials of the same subject and class, i.e. "
                    "share their block with training (the file records no presentation order, time or block id: the "
                    "block is inferred from the class, as the dataset's published design shows all images of a class "
                    f"in one block); in the file's order, {contiguous} of {len(runs)} (subject, class) groups are "
                    "contiguous"),
    }


# ---------------------------------------------------------------------------------------------
# THINGS-EEG2


def concept_name(folder: str) -> str:
    """A THINGS concept folder without its per-partition number: "00042_banana" -> "banana"."""
    return CONCEPT_NUMBER.sub("", folder)


def things_eeg2_hygiene(concepts: Mapping[str, Sequence[str]], files: Mapping[str, Sequence[str]], where: str
                        ) -> SplitHygiene:
    """The hygiene of THINGS-EEG2 splits: `concepts[split]` / `files[split]` are the concept folder and
    image file of each EEG row the split uses."""
    stimuli = {"image": {s: list(v) for s, v in files.items()},
               "concept": {s: [concept_name(c) for c in v] for s, v in concepts.items()}}
    counts = {kind: {s: len(set(v)) for s, v in per.items()} for kind, per in stimuli.items()}
    return SplitHygiene(dataset="THINGS-EEG2", where=where, counts=counts, overlaps=overlaps(stimuli),
                        notes=["rapid serial visual presentation, no block design: no block is shared"])
