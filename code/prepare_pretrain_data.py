"""Build the unpaired stage-1 corpus (`*.npy` windows + manifest.csv) from MOABB datasets.

    python code/prepare_pretrain_data.py                         # the default datasets -> datasets/pretrain_eeg
    python code/prepare_pretrain_data.py PhysionetMI Cho2017 --max-subjects 5
    python code/prepare_pretrain_data.py Shin2017A --accept-licenses

MOABB downloads each dataset into its own cache (MNE_DATA) on first use. Run it again to resume:
finished subjects are skipped. See dreamdiffusion/data/moabb_corpus.py for the processing.
"""

import sys

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.data.moabb_corpus import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
