"""Stage 2: fine-tune Stable Diffusion 1.5 on paired EEG and images, with CLIP alignment.

    python code/stage2_finetune_sd.py                                        # paper settings
    python code/stage2_finetune_sd.py fidelity=authors_code                  # the authors' code values
    python code/stage2_finetune_sd.py trainer.devices=4 batch_size=8         # DDP on 4 GPUs
    python code/stage2_finetune_sd.py resume=true                            # continue from last.ckpt

Needs the stage-1 encoder (eeg_encoder_path), SD1.5 (sd_path) and CLIP ViT-L/14 (clip_path); writes
config.yaml, metrics.csv, samples/, checkpoints/{last,best}.ckpt, metrics.json, results.md and the
final model/ to `output_dir` (see dreamdiffusion/train/stage2.py).
"""

import sys

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.train.stage2 import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
