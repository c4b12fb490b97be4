"""Stage 1: pretrain the EEG masked autoencoder on unpaired EEG (`*.npy` files).

    python code/stage1_pretrain_eeg.py                                   # paper settings
    python code/stage1_pretrain_eeg.py fidelity=authors_code             # the authors' code values
    python code/stage1_pretrain_eeg.py trainer.devices=8 batch_size=100  # DDP on 8 GPUs
    python code/stage1_pretrain_eeg.py resume=true                       # continue from last.ckpt

Writes config.yaml, checkpoints/, metrics.csv, figures/, metrics.json, results.md and the encoder
export eeg_encoder/ to `output_dir` (see dreamdiffusion/train/stage1.py).
"""

import sys

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.train.stage1 import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
