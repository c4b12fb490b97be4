"""Errors a user can act on, and the CLI wrapper that turns them into a sentence and exit code 2.

Every check on user input (files, config values, checkpoints, data) raises one of these with a
sentence that names the file, field or value and says what was expected. The command lines run
through `run_cli`: such an error (or an OS error about a path, such as a folder without write
permission, a name too long) prints one line `error: ...` and exits with code 2; Ctrl-C prints one
line and exits with 130, leaving a folder the same command resumes; any other exception is a bug and
keeps its traceback (exit code 1). `--debug` (or DREAMDIFFUSION_DEBUG=1) prints the traceback of
either; `--verbose` (or DREAMDIFFUSION_VERBOSE=1) shows the third-party output that core/logs.py
otherwise captures.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from dreamdiffusion.core.logs import configure_logging


class DreamDiffusionError(Exception):
    """Base class of the errors caused by bad input rather than by a bug."""


class ConfigError(DreamDiffusionError, ValueError):
    """An unknown config key, a value of the wrong type or an inconsistent combination."""


class DataError(DreamDiffusionError, ValueError):
    """A data file that is missing, malformed or does not contain what the config asks for."""


class CheckpointError(DreamDiffusionError, ValueError):
    """A checkpoint that is missing, unsafe to unpickle or whose keys/shapes do not match."""


class NonFiniteError(DreamDiffusionError):
    """A NaN or Inf in a loss, gradient, weight, latent or image: the run stops there, saying where."""


INTERRUPTED = ("interrupted (Ctrl-C): what was finished is kept; run the same command again to continue "
               "(stages 1-2: add resume=true)")

# OS errors that are about a path the user gave (a missing file, a folder that cannot be written).
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _debug(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("DREAMDIFFUSION_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` (argv without `--debug`); bad input -> one line on stderr and 2, success -> 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(args)
    if "--verbose" in args:  # third-party output shown too (core/logs.py); subprocesses inherit it
        os.environ["DREAMDIFFUSION_VERBOSE"] = "1"
    configure_logging()
    try:
        main([a for a in args if a not in ("--debug", "--verbose")])
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
    except OSError as err:
        if err.filename is None:  # not about a file of the user's: a bug, with its traceback
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {err.strerror}: {err.filename} (a file-system limit: a name too long, no space left or a "
              "read-only disk; --debug shows where it happened)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(INTERRUPTED, file=sys.stderr)
        return 130  # the shell's code for a process ended by SIGINT
    return 0
