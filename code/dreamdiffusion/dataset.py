"""The data front door: every stage imports its datasets from here.

    from dreamdiffusion.dataset import ImageNetEEGDataset, ThingsEEG2Dataset, EEGPretrainDataset, paired_dataset
    from dreamdiffusion.dataset import open_pretrain_corpus  # stage 1: a packed corpus or a folder of *.npy

The datasets themselves live in `dreamdiffusion.data` (one module each, with the shared image/EEG
helpers in `data/common.py`); this module re-exports them, chooses the paired dataset a config names
(`paired_dataset`, the `data.kind` switch) and keeps the data check command:

    python -m dreamdiffusion.dataset check --eeg ... --splits ... --images ...

which reports what the authors' ImageNet-EEG rules keep and every missing image
(THINGS-EEG2 has its own: `python -m dreamdiffusion.data.things_eeg2 check`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from dreamdiffusion.core.errors import ConfigError, DataError, run_cli
from dreamdiffusion.data.common import CLIP_MEAN, CLIP_STD, DATA_README, load_image
from dreamdiffusion.data.imagenet_eeg import ImageNetEEGDataset, check
from dreamdiffusion.data.packed_corpus import PackedEEGDataset, open_pretrain_corpus
from dreamdiffusion.data.pretrain_corpus import EEGPretrainDataset, collate_eeg
from dreamdiffusion.data.things_eeg2 import ThingsEEG2Dataset

__all__ = ["CLIP_MEAN", "CLIP_STD", "DATA_KINDS", "DATA_README", "EEGPretrainDataset", "ImageNetEEGDataset",
           "PackedEEGDataset", "ThingsEEG2Dataset", "collate_eeg", "load_image", "main", "open_pretrain_corpus",
           "paired_dataset"]

DATA_KINDS = {"imagenet_eeg": ImageNetEEGDataset, "things_eeg2": ThingsEEG2Dataset}  # data.kind -> its dataset


def paired_dataset(cfg: Any, split: str, augment: bool = False, load_images: bool = True) -> Dataset:
    """The paired dataset a `PairedDataConfig` (paths resolved) names with `kind`, built from the group by
    its `from_config`: ImageNet-EEG or THINGS-EEG2."""
    if cfg.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got '{cfg.kind}'")
    return DATA_KINDS[cfg.kind].from_config(cfg, split, augment=augment, load_images=load_images)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamdiffusion.dataset",
                                     description="Check the ImageNet-EEG files against the loading rules.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="trials per subject and split, length-filter drops, missing images")
    p.add_argument("--eeg", required=True, help="eeg_5_95_std.pth")
    p.add_argument("--splits", required=True, help="block_splits_by_image_single.pth or _all.pth")
    p.add_argument("--images", default=None, help="the imageNet_images folder (<wnid>/<name>.JPEG)")
    p.add_argument("--subject", type=int, default=4, help="1..6, or 0 for all subjects (default 4)")
    p.add_argument("--split-index", type=int, default=0)
    p.add_argument("--min-trial-length", type=int, default=450)
    p.add_argument("--max-trial-length", type=int, default=600)
    args = parser.parse_args(argv)
    problems = check(args.eeg, args.splits, args.images, subject=args.subject, split_index=args.split_index,
                     min_trial_length=args.min_trial_length, max_trial_length=args.max_trial_length)
    if problems:
        raise DataError(f"{len(problems)} problem(s) found (listed above), e.g. {problems[0]} "
                        f"({DATA_README} describes each check)")
    print("ok")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
