"""Errors a user can act on, and the CLI wrapper that turns them into exit code 2.

Every check on user input (files, config values, checkpoints) raises one of these with a sentence
that names the file, field or value and says what was expected. The stage scripts run through
`run_cli`, which prints that sentence and exits with code 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class DreamDiffusionError(Exception):
    """Base class of the errors caused by bad input rather than by a bug."""


class ConfigError(DreamDiffusionError, ValueError):
    """An unknown config key, a value of the wrong type or an inconsistent combination."""


class DataError(DreamDiffusionError, ValueError):
    """A data file that is missing, malformed or does not contain what the config asks for."""


class CheckpointError(DreamDiffusionError, ValueError):
    """A checkpoint that is missing, unsafe to unpickle or whose keys/shapes do not match."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; on a `DreamDiffusionError` print its message to stderr and return 2."""
    try:
        main(argv)
    except DreamDiffusionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
