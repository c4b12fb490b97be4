"""`make rehearsal`: every stage at the paper's model sizes and in the real file formats, a few steps each.

    python code/rehearsal.py             # stand-ins written once (about 15 GB), reused; real files where present
    python code/rehearsal.py --no-real   # stand-ins even where the real files are present

Writes results/rehearsal/rehearsal.json and rehearsal.md (per stage: ok or the error, seconds per
step, peak memory, the paper's full run projected at that speed; the memory each setting needs).
See dreamdiffusion/tools/rehearsal.py.
"""

import sys

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.tools.rehearsal import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
