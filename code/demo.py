"""`make demo`: the whole method end to end on the CPU, on a synthetic world where the answer is known.

    python code/demo.py            # ~9 min on 2 CPU cores: builds the world once, then the demo's grid
    python code/demo.py --quick    # a much smaller world and runs (the test in `make test`)

What it builds and runs, and what it writes: dreamdiffusion/tools/demo.py and docs/demo.md.
"""

import os
import sys
from pathlib import Path

# Set before anything imports the hub clients: nothing here downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CODE_DIR = Path(__file__).resolve().parent
if str(CODE_DIR) not in sys.path:  # `python code/demo.py` from a fresh clone without `pip install -e`
    sys.path.insert(0, str(CODE_DIR))

from dreamdiffusion.core.errors import run_cli  # noqa: E402
from dreamdiffusion.tools.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
