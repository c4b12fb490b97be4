"""Generated documentation: `python -m dreamdiffusion.tools.docs` prints docs/method.md's deviations tables."""

from __future__ import annotations

import sys

from dreamdiffusion.config import STAGES
from dreamdiffusion.core.fidelity import markdown_table


def deviations_table() -> str:
    """docs/method.md's deviations tables, from the manifest and each stage's default config."""
    return markdown_table({name: stage.build_config() for name, stage in STAGES.items()})


if __name__ == "__main__":
    sys.stdout.write(deviations_table())
