"""Stage 3: generate images from test EEG and evaluate them with the paper's protocol.

    python code/stage3_generate_eval.py model=outputs/stage2/model
    python code/stage3_generate_eval.py model=pretrains/dreamdiffusion/checkpoint.pth   # the authors'
    python code/stage3_generate_eval.py --config configs/stage3_eval.yaml sampler=dpm++ num_inference_steps=25

Writes to `output_dir`: images/test{i}-{k}.png (k = 0 the ground truth), grids/, metrics.json,
results.md and config.yaml. See `dreamdiffusion.evaluate` for the protocol.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dreamdiffusion.config import CONFIG_DIR, Stage3Config, parse_args
from dreamdiffusion.errors import run_cli
from dreamdiffusion.evaluate import run_stage3


def main(argv: Sequence[str] | None = None) -> dict | None:
    cfg = parse_args(Stage3Config, argv, CONFIG_DIR / "stage3_eval.yaml",
                     description=__doc__.split("\n\n")[0], prog="stage3_generate_eval.py")
    if cfg is None:
        return None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run_stage3(cfg)
    print(f"wrote {cfg.output_dir}/results.md and metrics.json")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
