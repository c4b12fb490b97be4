"""How the library talks: through `logging` (a logger per module), set up once by the entry points.

What a user sees in the terminal is our own lines (`name: message`), progress bars and results.
Third-party chatter is captured unless `--verbose` (or DREAMDIFFUSION_VERBOSE=1) asks for it:
  - transformers' and diffusers' loading reports (tables of UNEXPECTED/MISSING keys) and advice: their
    loggers are set to ERROR; our loaders check the keys themselves and say in one line what they
    ignored (e.g. the text tower of a full CLIP checkpoint);
  - Lightning's set-up lines ("GPU available: ...", the model summary): its loggers to WARNING;
  - Python warnings we know to be noise for this project (listed in `KNOWN_NOISE`, each with why) are
    dropped; every other warning still shows, once, through logging.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "DREAMDIFFUSION_VERBOSE"

# Warnings that say nothing a user of this project can act on. Each pattern is matched against the
# message text.
KNOWN_NOISE = (
    r"Found \d+ module\(s\) in eval mode",  # Lightning: the frozen SD1.5/CLIP parts are in eval mode on purpose
    r"does not have many workers",  # Lightning's advice; num_workers is a config field, 0 in the demo on purpose
    r"Checkpoint directory .* exists and is not empty",  # a resumed run writes into its own checkpoints/
    r"is smaller than the logging interval",  # tiny demo/test runs have few batches per epoch
    r"The `srun` command is available on your system",  # Lightning's SLURM hint; launching is documented
    r"GPU available: |TPU available: |HPU available: ",  # Lightning's set-up lines
    r"accelerate.* was not found|`low_cpu_mem_usage` was None",  # diffusers' install advice
    r"Please install accelerate",
)
_NOISE = re.compile("|".join(f"(?:{p})" for p in KNOWN_NOISE))
THIRD_PARTY_QUIET = {"transformers": logging.ERROR, "diffusers": logging.ERROR, "pytorch_lightning": logging.WARNING,
                     "lightning.pytorch": logging.WARNING, "lightning_fabric": logging.WARNING,
                     "lightning.fabric": logging.WARNING, "timm": logging.WARNING, "huggingface_hub": logging.ERROR}


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        # A deprecation inside an installed library, raised by another library's call: nothing for our
        # user to change (ours would name a file of this package).
        third_party_deprecation = "site-packages" in text.split(":", 1)[0] and "deprecat" in text.lower()
        return not (_NOISE.search(text) or third_party_deprecation)


def configure_logging(verbose: bool | None = None) -> None:
    """Our INFO lines as `name: message`; third-party chatter captured unless `verbose` (default: the
    DREAMDIFFUSION_VERBOSE environment variable, which `--verbose` of every command sets)."""
    verbose = verbose_requested() if verbose is None else verbose
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dreamdiffusion").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    # Read by transformers/diffusers when their root logger is first configured (and by subprocesses).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name, level in THIRD_PARTY_QUIET.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)  # warnings -> the "py.warnings" logger, where the filter applies
    noise = logging.getLogger("py.warnings")
    if not any(isinstance(f, _DropKnownNoise) for f in noise.filters):
        noise.addFilter(_DropKnownNoise())
    warnings.simplefilter("once")
