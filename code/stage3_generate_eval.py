"""Stage 3: generate images from test EEG and evaluate them with the paper's protocol.

    python code/stage3_generate_eval.py model=outputs/stage2/model
    python code/stage3_generate_eval.py model=pretrains/dreamdiffusion/checkpoint.pth   # the authors'
    python code/stage3_generate_eval.py phase=generate devices=4                        # 4 GPUs, resumable
    python code/stage3_generate_eval.py phase=score images_dir=path/to/test_images      # any folder

Writes to `output_dir`: images/test{i}-{k}.png (k = 0 the ground truth), records/, generation.json(l),
grids/, metrics.json, results.md and config.yaml. See `dreamdiffusion.evaluation.stage3` for the protocol.
"""

import sys

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.evaluation.stage3 import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
