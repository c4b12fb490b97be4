"""Errors a user can act on, and the CLI wrapper that turns them into a sentence and exit code 2.

Every check on user input (files, config values, checkpoints, data) raises one of these with a
sentence that names the file, field or value and says what was expected. The command lines run
through `run_cli`: such an error (or an OS error about a path, such as a folder without write
permission) prints one line `error: ...` and exits with code 2; any other exception is a bug and
keeps its traceback (exit code 1). `--debug` (or DREAMDIFFUSION_DEBUG=1) prints the traceback of
either.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence


class DreamDiffusionError(Exception):
    """Base class of the errors caused by bad input rather than by a bug."""


class ConfigError(DreamDiffusionError, ValueError):
    """An unknown config key, a value of the wrong type or an inconsistent combination."""


class DataError(DreamDiffusionError, ValueError):
    """A data file that is missing, malformed or does not contain what the config asks for."""


class CheckpointError(DreamDiffusionError, ValueError):
    """A checkpoint that is missing, unsafe to unpickle or whose keys/shapes do not match."""


# OS errors that are about a path the user gave (a missing file, a folder that cannot be written).
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _debug(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("DREAMDIFFUSION_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` (argv without `--debug`); bad input -> one line on stderr and 2, success -> 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(args)
    try:
        main([a for a in args if a != "--debug"])
    except DreamDiffusionError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PATH_ERRORS as err:
        if debug:
            traceback.print_exc()
        what = f"{err.strerror}: {err.filename}" if err.filename else str(err)
        print(f"error: {what} (check the path and its permissions; --debug shows where it happened)", file=sys.stderr)
        return 2
    return 0
