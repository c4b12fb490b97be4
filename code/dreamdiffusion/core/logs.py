"""How the library talks: through `logging` (logger per module), set up once by the entry points."""

from __future__ import annotations

import logging


def configure_logging(verbose: bool = False) -> None:
    """Our INFO lines as `name: message` (DEBUG with `verbose`); third-party loggers stay at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dreamdiffusion").setLevel(logging.DEBUG if verbose else logging.INFO)
