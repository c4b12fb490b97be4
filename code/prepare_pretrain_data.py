"""Build the unpaired stage-1 corpus (`*.npy` windows + manifest.csv) from MOABB datasets.

    python code/prepare_pretrain_data.py                         # the default datasets -> datasets/pretrain_eeg
    python code/prepare_pretrain_data.py PhysionetMI Cho2017 --max-subjects 5
    python code/prepare_pretrain_data.py Shin2017A --accept-licenses

MOABB downloads each dataset into its own cache (MNE_DATA) on first use. Run it again to resume:
finished subjects are skipped. See dreamdiffusion/moabb_corpus.py for the processing.
"""

import argparse
import sys

from dreamdiffusion.config import resolve_path
from dreamdiffusion.errors import run_cli
from dreamdiffusion.moabb_corpus import (
    DEFAULT_DATASETS,
    CorpusSettings,
    build_pretrain_corpus,
    format_summary,
)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = CorpusSettings()
    parser = argparse.ArgumentParser(prog="prepare_pretrain_data.py", description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", default=DEFAULT_DATASETS,
                        help=f"MOABB dataset class names or dotted paths (default: {' '.join(DEFAULT_DATASETS)})")
    parser.add_argument("--out", default="datasets/pretrain_eeg", help="output folder (relative to the repo root)")
    parser.add_argument("--l-freq", type=float, default=defaults.l_freq, help="high-pass edge, Hz")
    parser.add_argument("--h-freq", type=float, default=defaults.h_freq,
                        help="low-pass edge, Hz (lowered below Nyquist for slow recordings)")
    parser.add_argument("--sfreq", type=float, default=defaults.sfreq,
                        help="resample to this rate, Hz; 0 keeps each recording's own rate")
    parser.add_argument("--window-seconds", type=float, default=defaults.window_seconds)
    parser.add_argument("--stride-seconds", type=float, default=None, help="default: the window length")
    parser.add_argument("--subjects", type=int, nargs="+", default=None, help="only these subject ids")
    parser.add_argument("--max-subjects", type=int, default=None, help="at most this many subjects per dataset")
    parser.add_argument("--accept-licenses", action="store_true", help="accept the licence of Shin2017A/B")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = CorpusSettings(l_freq=args.l_freq, h_freq=args.h_freq, sfreq=args.sfreq or None,
                              window_seconds=args.window_seconds, stride_seconds=args.stride_seconds,
                              max_subjects=args.max_subjects, accept_licenses=args.accept_licenses)
    out_dir = resolve_path(args.out)
    summary = build_pretrain_corpus(args.datasets, out_dir, settings, subjects=args.subjects)
    print(format_summary(summary))
    print(f"wrote {out_dir}/manifest.csv and summary.json")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
