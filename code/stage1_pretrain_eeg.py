"""Stage 1: pretrain the EEG masked autoencoder on unpaired EEG (`*.npy` files).

    python code/stage1_pretrain_eeg.py                                   # paper settings
    python code/stage1_pretrain_eeg.py --config configs/presets/original_code_stage1.yaml
    python code/stage1_pretrain_eeg.py trainer.devices=8 batch_size=100  # DDP on 8 GPUs
    python code/stage1_pretrain_eeg.py resume=true                       # continue from last.ckpt

Writes config.yaml, checkpoints/, metrics.csv, figures/ and the encoder export eeg_encoder/ to
`output_dir` (see dreamdiffusion/pretrain.py).
"""

import sys

from dreamdiffusion.config import Stage1Config, parse_args
from dreamdiffusion.errors import run_cli
from dreamdiffusion.pretrain import run_pretraining

# The config schema and its defaults file (merged before any --config file); demo.py reads them too.
SCHEMA, DEFAULT_CONFIG = Stage1Config, "configs/stage1_pretrain.yaml"


def main(argv=None):
    cfg = parse_args(SCHEMA, argv, default_file=DEFAULT_CONFIG,
                     description=__doc__.splitlines()[0], prog="stage1_pretrain_eeg.py")
    if cfg is None:
        return None
    return run_pretraining(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
