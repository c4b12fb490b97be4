"""The data front door: every stage imports its datasets from here.

    from dreamdiffusion.dataset import ImageNetEEGDataset, ThingsEEG2Dataset, EEGPretrainDataset, paired_dataset

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

from omegaconf import OmegaConf
from torch.utils.data import Dataset

from dreamdiffusion.core.errors import ConfigError, DataError, run_cli
from dreamdiffusion.data.common import CLIP_MEAN, CLIP_STD, DATA_README, load_image
from dreamdiffusion.data.imagenet_eeg import ImageNetEEGDataset, check
from dreamdiffusion.data.pretrain_corpus import EEGPretrainDataset
from dreamdiffusion.data.things_eeg2 import ThingsEEG2Dataset, subjects_except

__all__ = ["CLIP_MEAN", "CLIP_STD", "DATA_KINDS", "DATA_README", "EEGPretrainDataset", "ImageNetEEGDataset",
           "ThingsEEG2Dataset", "load_image", "main", "paired_dataset"]

DATA_KINDS = ("imagenet_eeg", "things_eeg2")


def paired_dataset(cfg: Any, split: str, augment: bool = False, load_images: bool = True) -> Dataset:
    """The paired dataset a `PairedDataConfig` (paths resolved) names: ImageNet-EEG or THINGS-EEG2.

    THINGS-EEG2: subject 0 = every subject of eeg_dir; with `things_eeg2.leave_out` = k, train and
    val use the other subjects and test uses subject k alone (leave-one-subject-out).
    """
    if cfg.kind == "imagenet_eeg":
        if not load_images:
            cfg = OmegaConf.create({**dict(cfg), "image_dir": None})
        return ImageNetEEGDataset.from_config(cfg, split, augment=augment)
    if cfg.kind != "things_eeg2":
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}, got '{cfg.kind}'")
    t = cfg.things_eeg2
    if t.leave_out is not None:
        subject = [t.leave_out] if split == "test" else subjects_except(t.leave_out)
    else:
        subject = "all" if cfg.subject == 0 else cfg.subject
    return ThingsEEG2Dataset(
        t.eeg_dir, cfg.image_dir, subject=subject, split=split,
        average_repetitions=t.average_repetitions_test if split == "test" else t.average_repetitions_train,
        n_channels=t.n_channels, n_times=t.n_times, pick_channels=list(t.pick_channels) if t.pick_channels else None,
        val_concepts=t.val_concepts, seed=t.seed, image_size=cfg.image_size, load_images=load_images,
        clip_image_size=cfg.clip_image_size, augment=augment, crop_probability=cfg.crop_probability,
        crop_ratio=cfg.crop_ratio, check_images=cfg.check_images)


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
