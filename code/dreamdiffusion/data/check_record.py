"""Check once, trust after: the results of a content check, kept per file with the file's fingerprint.

A content check (NaN/Inf, dtype, shape) reads every byte of a file; a fingerprint - the size and the
modification time in nanoseconds - is one `stat`. `CheckRecord` keeps, for each file of a set, the
fingerprint it had when it was checked and what the check found, so a later start-up re-checks only
the files whose fingerprint changed (or that are new) and takes the rest from the record: its time
then grows with the number of files, not with their bytes.

The record is a JSON file:

    {"format": "dreamdiffusion-checks/1", "check": "<name and version of the check>",
     "files": {"<path relative to the record's root>": {"fingerprint": [size, mtime_ns], ...result}}}

A record written by another version of the check is ignored as a whole (every file is checked again).
A file rewritten with the same size within one tick of the filesystem's clock keeps its fingerprint:
the record trusts size + mtime, as `make` and `rsync` do.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dreamdiffusion.core.files import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = "dreamdiffusion-checks/1"


def fingerprint(path: str | os.PathLike) -> list[int]:
    """[size in bytes, modification time in ns]: what tells a changed file from an unchanged one."""
    stat = os.stat(path)
    return [int(stat.st_size), int(stat.st_mtime_ns)]


class CheckRecord:
    """What `check` found for each file below `root`, keyed by path relative to `root`.

    `results(paths, check)` returns one result per path: the recorded one when the file's
    fingerprint is the recorded one, else `check(path)` (recorded). `save()` writes the record when
    something changed.
    """

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike, check: str):
        self.path, self.root, self.check = Path(path), Path(root), check
        self.files: dict[str, dict[str, Any]] = {}
        self.n_checked = 0  # files checked in this process (the others came from the record)
        self.changed = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("the check record %s cannot be read (%s): every file is checked again", self.path, err)
            return
        if not isinstance(loaded, dict) or loaded.get("format") != FORMAT or loaded.get("check") != self.check:
            logger.info("the check record %s was written by another check: every file is checked again", self.path)
            return
        files = loaded.get("files")
        self.files = files if isinstance(files, dict) else {}

    def name(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def results(self, paths: Iterable[Path], check: Callable[[Path], dict[str, Any]]) -> list[dict[str, Any]]:
        """One result dict per path (in order), checking only the files whose fingerprint changed."""
        out, seen = [], set()
        for path in paths:
            name, stamp = self.name(path), fingerprint(path)
            seen.add(name)
            entry = self.files.get(name)
            if entry is None or entry.get("fingerprint") != stamp:
                entry = {"fingerprint": stamp, **check(path)}
                self.files[name] = entry
                self.n_checked += 1
                self.changed = True
            out.append({k: v for k, v in entry.items() if k != "fingerprint"})
        stale = set(self.files) - seen
        if stale:  # files that are gone: forget them, so the record does not grow forever
            for name in stale:
                del self.files[name]
            self.changed = True
        return out

    def save(self) -> bool:
        """Write the record (atomically) if anything changed; False, with a warning, if it cannot be written."""
        if not self.changed:
            return True
        try:
            atomic_write_json(self.path, {"format": FORMAT, "check": self.check, "files": self.files})
        except OSError as err:
            logger.warning("cannot write the check record %s (%s): the next start-up checks these %d files again "
                           "(data.check_record puts the record in a writable place)", self.path, err, self.n_checked)
            return False
        self.changed = False
        return True
