"""Fetch the pretrained weights a real run needs into pretrains/, or say exactly what to place where.

    python code/download_weights.py                 # everything (about 13 GB), when online
    python code/download_weights.py --only sd15 --only classifier
    python code/download_weights.py --check         # offline: which files are present / missing

The files, their sources and how each is verified: dreamdiffusion/tools/weights.py and pretrains/README.md.
"""

import sys

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.tools.weights import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
