"""Stage 2: fine-tune Stable Diffusion 1.5 on paired EEG and images, with CLIP alignment.

    python code/stage2_finetune_sd.py                                        # paper settings
    python code/stage2_finetune_sd.py --config configs/presets/original_code_stage2.yaml
    python code/stage2_finetune_sd.py trainer.devices=4 batch_size=8         # DDP on 4 GPUs
    python code/stage2_finetune_sd.py resume=true                            # continue from last.ckpt

Needs the stage-1 encoder (eeg_encoder_path), SD1.5 (sd_path) and CLIP ViT-L/14 (clip_path); writes
config.yaml, metrics.csv, samples/, checkpoints/{last,best}.ckpt and the final model/ to
`output_dir` (see dreamdiffusion/finetune.py).
"""

import sys

from dreamdiffusion.config import Stage2Config, parse_args
from dreamdiffusion.errors import run_cli
from dreamdiffusion.finetune import run_finetuning

# The config schema and its defaults file (merged before any --config file); demo.py reads them too.
SCHEMA, DEFAULT_CONFIG = Stage2Config, "configs/stage2_finetune.yaml"


def main(argv=None):
    cfg = parse_args(SCHEMA, argv, default_file=DEFAULT_CONFIG,
                     description=__doc__.splitlines()[0], prog="stage2_finetune_sd.py")
    if cfg is None:
        return None
    return run_finetuning(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
