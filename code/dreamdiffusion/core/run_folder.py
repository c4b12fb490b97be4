"""Who owns an output folder: one run of one stage, made with one set of settings.

Each stage runner is wrapped by `owns_output_folder`, which before the runner writes anything:
  1. refuses a folder that belongs to another stage (its marker says so, or - for a folder written
     before markers existed - its files do), or that is an export (`model/`, `eeg_encoder/`);
  2. refuses a folder of the same stage whose results were made with other settings, unless
     `overwrite=true` - which then clears that stage's outputs (not when a training run resumes:
     `overwrite=true resume=true` continues from `last.ckpt` with the new settings). A folder without
     results (a run that stopped before its first checkpoint or trial) simply takes the new settings;
  3. takes the folder's lock, `LOCK` (pid, host, start time), so a second run on the same folder is
     refused with a sentence; a lock whose process has ended (on this host) is stale and taken over;
  4. writes the marker, `MARKER` (.dreamdiffusion_run.json: the stage and the settings that own it).
The lock is released when the runner returns or raises; a run that wrote nothing else leaves the
folder as it found it (a folder it created is removed). In a multi-process run only the process that
launches the others claims the folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.core.files import (
    COMPLETE_MARKER,
    atomic_write_json,
    check_output_dir,
    is_complete,
    pid_alive,
    read_own_json,
)

logger = logging.getLogger(__name__)

MARKER = ".dreamdiffusion_run.json"
LOCK = ".dreamdiffusion_run.lock"
FORMAT = "dreamdiffusion-run/1"


@dataclass(frozen=True)
class StageFiles:
    """What a stage writes in its output folder."""

    results: tuple[str, ...]  # present = the folder holds results of this stage worth protecting
    outputs: tuple[str, ...]  # everything it writes there (what overwrite=true clears)
    signature: tuple[str, ...]  # entries no other stage writes (to recognise a folder without a marker)


_COMMON = ("config.yaml", "metrics.json", "results.md", "runtime.json")
STAGE_FILES = {
    "stage1": StageFiles(("checkpoints", "eeg_encoder"),
                         (*_COMMON, "checkpoints", "eeg_encoder", "figures", "metrics.csv", "skipped_files.txt"),
                         ("eeg_encoder", "skipped_files.txt")),
    "stage2": StageFiles(("checkpoints", "model"),
                         (*_COMMON, "checkpoints", "model", "samples", "cache", "metrics.csv", "trainable_parameters.txt"),
                         ("trainable_parameters.txt",)),
    "stage3": StageFiles(("records", "metrics.json"),
                         (*_COMMON, "images", "records", "grids", "generation.json", "generation.jsonl"),
                         ("generation.json", "generation.jsonl")),
}
# A top-level key only that stage's config.yaml has.
_CONFIG_KEY = {"stage1": "mask_ratio", "stage2": "clip_weight", "stage3": "phase"}
# Files of an export folder (stage 2's model/, stage 1's eeg_encoder/), which no run may write into.
_EXPORT_FILES = (COMPLETE_MARKER, "model_index.json", "dreamdiffusion.json", "model.safetensors")


@dataclass(frozen=True)
class FolderClaim:
    """What a run asks of its output folder."""

    folder: Path | None  # resolved (None or "": no folder named, refused)
    settings: dict[str, Any] | None  # the settings that own the folder's results; None = not compared
    overwrite: bool  # may replace results made with other settings
    clear: bool = True  # with overwrite: clear the earlier outputs (False: a resumed training run keeps them)
    may_change: tuple[str, ...] = ()  # dotted keys recorded but not compared (e.g. epochs, when a run is extended)


def _stage_word(stage: str) -> str:
    return stage.replace("stage", "stage ")


def launcher_process() -> bool:
    """True in the process that launches the others (or runs alone); False in the other ranks."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


# ---------------------------------------------------------------------------------------------
# Whose folder is it?


def _has_entry(folder: Path, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if (folder / name).exists()), None)


def _results(folder: Path, stage: str) -> str | None:
    """The first of `stage`'s results the folder holds (a file, or a folder with something in it)."""
    for name in STAGE_FILES[stage].results:
        path = folder / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return name
    return None


def folder_owner(folder: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(stage, recorded marker) of a folder: from its marker, else guessed from its files (None: nobody's)."""
    marker = folder / MARKER
    if marker.is_file():
        record = read_own_json(marker, f"delete {marker} if this folder is free to reuse (the next run then claims it), "
                                      "or choose another output_dir", ConfigError)
        if not isinstance(record, dict) or record.get("stage") not in STAGE_FILES:
            raise ConfigError(f"{marker} does not name a stage: delete it if this folder is free to reuse, or choose "
                              "another output_dir")
        return record["stage"], record
    config = folder / "config.yaml"
    if config.is_file():
        text = config.read_text(errors="replace")
        for stage, key in _CONFIG_KEY.items():
            if re.search(rf"^{key}:", text, flags=re.M):
                return stage, None
    for stage, files in STAGE_FILES.items():
        if _has_entry(folder, files.signature):
            return stage, None
    return None, None


def _first_difference(old: Any, new: Any, where: str = "", skip: tuple[str, ...] = ()) -> tuple[str, Any, Any] | None:
    """The first dotted key whose value differs (keys only one side records, and `skip`, are not compared)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in new:
            name = f"{where}.{key}" if where else key
            if key in old and name not in skip:
                found = _first_difference(old[key], new[key], name, skip)
                if found:
                    return found
        return None
    return None if old == new else (where, old, new)


def _plain(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if settings is None else json.loads(json.dumps(settings, sort_keys=True, default=str))


@dataclass(frozen=True)
class FolderState:
    """A folder a run may take: whose it was and what the run does with it."""

    owner: str | None  # the stage whose files it holds (None: nobody's, e.g. new or empty)
    record: dict[str, Any] | None  # its marker (None: none yet)
    clear: bool  # clear the earlier outputs before the run


def check_folder(claim: FolderClaim, stage: str) -> FolderState:
    """Refuse the folder (a ConfigError) or say how to take it."""
    folder = claim.folder
    if not folder.is_dir():
        return FolderState(None, None, False)
    export = _has_entry(folder, _EXPORT_FILES)
    if export:
        raise ConfigError(f"output_dir={folder} is an export folder (it holds {export}), not a run folder: "
                          f"{_stage_word(stage)} will not write into it; choose another output_dir")
    owner, record = folder_owner(folder)
    if owner is None:
        return FolderState(None, None, False)
    if owner != stage:
        raise ConfigError(f"output_dir={folder} belongs to a {_stage_word(owner)} run ({MARKER if record else 'its files'} "
                          f"say so): {_stage_word(stage)} will not write there (it would overwrite that run's files); "
                          "choose another output_dir")
    earlier = (record or {}).get("settings")
    change = None if earlier is None or claim.settings is None else \
        _first_difference(earlier, _plain(claim.settings), skip=claim.may_change)
    if change is None:
        return FolderState(owner, record, False)
    results = _results(folder, stage)
    if results and not claim.overwrite:
        key, old, new = change
        raise ConfigError(f"output_dir={folder} holds a {_stage_word(stage)} run made with {key}={old!r}, not {new!r} "
                          f"(its {results} would no longer match its settings): use another output_dir, the same "
                          "settings (to resume it), or overwrite=true to claim the folder with the new settings")
    return FolderState(owner, record, claim.clear)


def clear_outputs(folder: Path, stage: str) -> None:
    """Remove what `stage` writes in `folder` (its earlier run's outputs), nothing else."""
    removed = []
    for name in STAGE_FILES[stage].outputs:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        logger.info("%s: cleared the earlier run's %s (overwrite=true)", folder, ", ".join(removed))


# ---------------------------------------------------------------------------------------------
# The lock


def _lock_record(stage: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _holder(lock: Path) -> dict[str, Any] | None:
    """The lock's record; None when it is stale (its process has ended on this host) or unreadable."""
    try:
        record = json.loads(lock.read_text())
        pid, host = int(record["pid"]), str(record["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s is damaged; treating it as stale", lock)
        return None
    if host == socket.gethostname() and not pid_alive(pid):
        logger.info("%s: the run that held it (pid %d) has ended; taking over its folder", lock, pid)
        return None
    return record


def _create_lock(lock: Path, text: str) -> bool:
    """Create `lock` holding `text`, atomically (a hard link of a finished file); False if it exists."""
    fd, tmp = tempfile.mkstemp(prefix=f"{lock.name}.", dir=lock.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an exclusive create (briefly empty) instead
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        os.unlink(tmp)


def acquire_lock(folder: Path, stage: str) -> dict[str, Any]:
    """Create `folder/LOCK`, or refuse with who holds it; a stale lock is removed and the lock taken."""
    lock, mine = folder / LOCK, _lock_record(stage)
    for _ in range(3):
        if _create_lock(lock, json.dumps(mine)):
            return mine
        holder = _holder(lock)
        if holder is not None:
            raise ConfigError(
                f"output_dir={folder} is in use by another run ({_stage_word(holder.get('stage', '?'))}, pid "
                f"{holder['pid']} on {holder['host']}, started {holder.get('started', '?')}): wait for it to end or "
                f"choose another output_dir (if no such run is going on, delete {lock})")
        lock.unlink(missing_ok=True)
    raise ConfigError(f"could not lock output_dir={folder}: other runs keep taking it; choose another output_dir")


def release_lock(folder: Path, mine: dict[str, Any]) -> None:
    lock = folder / LOCK
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if record.get("pid") == mine["pid"] and record.get("host") == mine["host"]:
        lock.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Claiming


def _missing_parents(folder: Path) -> list[Path]:
    """The folders `folder.mkdir(parents=True)` would create, deepest first."""
    out, path = [], folder
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


@contextlib.contextmanager
def claim(request: FolderClaim, stage: str) -> Iterator[None]:
    """Hold `request.folder` for one run of `stage` (see the module docstring)."""
    folder = request.folder
    if folder is None or str(folder) in ("", "."):
        raise ConfigError("output_dir is empty: name the folder the run writes to")
    check_output_dir(folder)
    check_folder(request, stage)  # before anything is written
    created = _missing_parents(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mine, state = acquire_lock(folder, stage), None
    try:
        state = check_folder(request, stage)  # again, now that no other run can change it
        if state.clear:
            clear_outputs(folder, stage)
        settings = request.settings if request.settings is not None else (state.record or {}).get("settings")
        atomic_write_json(folder / MARKER, {"format": FORMAT, "stage": stage, "settings": _plain(settings),
                                            "claimed": mine["started"]})
        yield
    except BaseException:
        # A failed run leaves a folder that had no marker without one, unless it made results here
        # itself (a folder of earlier results, written before markers existed, keeps its unknown settings).
        if state is not None and state.record is None and (state.owner is not None or not _results(folder, stage)):
            (folder / MARKER).unlink(missing_ok=True)
        raise
    finally:
        release_lock(folder, mine)
        for path in created:  # the folders this run created, if it left them empty
            with contextlib.suppress(OSError):
                path.rmdir()


def owns_output_folder(stage: str, claim_of: Callable[[Any], FolderClaim]) -> Callable:
    """Decorate a stage runner `run(cfg, ...)`: `claim_of(cfg)` says which folder and settings; the
    runner runs while the folder is claimed (other ranks of a multi-process run just run)."""

    def wrap(runner: Callable) -> Callable:
        @functools.wraps(runner)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if not launcher_process():
                return runner(cfg, *args, **kwargs)
            with claim(claim_of(cfg), stage):
                return runner(cfg, *args, **kwargs)

        return run

    return wrap


def check_export(folder: str | os.PathLike, what: str, remedy: str) -> None:
    """A reader's check of an export of a run (`model/`, `eeg_encoder/`): refused, with `remedy`, when it
    sits in a run folder (beside its MARKER) without its completion marker - a folder not written by
    `atomic_dir` in one piece. Folders elsewhere (the authors', written by hand) are not ours to judge."""
    folder = Path(folder)
    if folder.is_dir() and (folder.parent / MARKER).is_file() and not is_complete(folder):
        raise CheckpointError(f"{folder} is an incomplete {what}: it lacks {COMPLETE_MARKER}, which is written once "
                              f"every file of it is in place; {remedy}")
