"""A stage folder's states, read from its content alone, and the only steps that move it from one to another.

| state       | recognised by                                              | plain run | --resume  | --overwrite     |
|-------------|------------------------------------------------------------|-----------|-----------|-----------------|
| absent      | no such path                                               | runs      | runs      | runs            |
| foreign     | not ours (:func:`ownership_problem`)                       | refused   | refused   | refused         |
| running     | ours, and another process holds ``.lock``                  | refused   | refused   | refused         |
| empty       | ours, with nothing but perhaps ``config.yaml``             | runs      | runs      | runs            |
| interrupted | ours: a run's files, no manifest                           | refused   | continues | replaces it     |
| finished    | ours: ``manifest.json`` (written last)                     | refused   | refused   | replaces it     |
| replacing   | ours: ``.previous/`` (an earlier run, whole) beside a new  | refused   | continues | starts the new  |
|             | run without a manifest                                     |           | the new   | run again       |

A downstream stage reads only a finished folder. Ours means: our marker (:data:`MARKER`, written first, naming the
stage and a random id) for this stage, a manifest (if any) of the same stage and id, and nothing but regular files
of the names a stage writes and our own bookkeeping folders. Nothing is followed through a link.

Replacing is a few renames, each of which a kill may interrupt; the interrupted middle has a name of its own and
:func:`recover` completes or rolls it back, so at every instant the finished run or its replacement is whole:
moving aside goes through ``.replacing/`` (manifest first; rolled back), putting back through ``.restoring/``
(manifest last; completed), and a manifest beside ``.previous/`` means the new run finished (the old one goes).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import secrets
import shutil
from fnmatch import fnmatch
from pathlib import Path

from dali.files import atomic_write_json, read_json_object, read_plain_yaml
from dali.logs import log
from dali.stage_table import STAGES

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
INPUTS = "inputs.json"  # the inputs' fingerprints, recorded as the run starts (checked on --resume)
MARKER = ".dali-stage.json"  # {"dali_stage_folder": 1, "stage": name, "id": random hex}: only dali writes it
LOCK = ".lock"
ASIDE = ".replacing"  # the old run on its way into .previous (an interrupted move is rolled back)
PREVIOUS = ".previous"  # the old run, whole, until the new run finishes (put back if it fails)
RESTORING = ".restoring"  # the old run on its way back (an interrupted restore is completed)
BOOKKEEPING_FILES = (MARKER, LOCK)
BOOKKEEPING_FOLDERS = (ASIDE, PREVIOUS, RESTORING)
RUN_FILES = (
    CONFIG,
    MANIFEST,
    METRICS,
    CHECKPOINT,
    INPUTS,
    "*.safetensors",
    "*.jsonl",
    "scores.json",
    "scores.md",
    ".*.tmp",
    *(name for row in STAGES for name in row.outputs),  # each stage's own (reproduce's results.md)
)
MARKER_FORMAT = 1


class State(enum.Enum):
    ABSENT = "absent"
    FOREIGN = "foreign"
    EMPTY = "empty"
    INTERRUPTED = "interrupted"
    FINISHED = "finished"
    REPLACING = "replacing"


def same_stage(recorded: object, name: str) -> bool:
    """``recorded`` is ``name``, or its import from the original code (``import_original/<name>`` writes what
    ``<name>`` does, and each may replace the other)."""
    return isinstance(recorded, str) and recorded.removeprefix("import_original/") == name.removeprefix(
        "import_original/"
    )


def ownership_problem(path: Path, name: str) -> str | None:
    """Why the existing folder ``path`` is not stage ``name``'s to write into, or None when it is (or is empty)."""
    entries = list(path.iterdir())
    if all(entry.name == LOCK or fnmatch(entry.name, ".*.tmp") for entry in entries):
        return None  # empty, or made by a run killed before its marker was written
    marker = read_json_object(path / MARKER)
    if marker is None or marker.get("dali_stage_folder") != MARKER_FORMAT or not isinstance(marker.get("id"), str):
        return f"it has no {MARKER} that dali wrote"
    if not same_stage(marker.get("stage"), name):
        return f"its {MARKER} names stage {marker.get('stage')!r}"
    for entry in entries:
        kind_ok = entry.is_dir() if entry.name in BOOKKEEPING_FOLDERS else entry.is_file()
        if entry.is_symlink() or not kind_ok:
            return f"'{entry.name}' is a link or not a {'folder' if entry.name in BOOKKEEPING_FOLDERS else 'file'}"
        if entry.name not in BOOKKEEPING_FILES + BOOKKEEPING_FOLDERS and not any(
            fnmatch(entry.name, p) for p in RUN_FILES
        ):
            return f"it holds '{entry.name}', which no stage writes"
    if (path / MANIFEST).exists():
        manifest = read_json_object(path / MANIFEST) or {}
        if not same_stage(manifest.get("stage"), name) or manifest.get("folder_id", marker["id"]) != marker["id"]:
            return f"its {MANIFEST} is not this folder's record of stage {name!r}"
    if (path / CONFIG).exists() and not isinstance(_yaml(path / CONFIG), dict):
        return f"its {CONFIG} is not a stage config"
    return None


def _yaml(path: Path) -> object:
    try:
        return read_plain_yaml(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def claim(path: Path, name: str) -> str:
    """Write our marker into an empty folder of ours (the first thing a stage writes); returns the folder's id."""
    marker = read_json_object(path / MARKER)
    if marker is None:
        marker = {"dali_stage_folder": MARKER_FORMAT, "stage": name, "id": secrets.token_hex(8)}
        atomic_write_json(path / MARKER, marker)
    return marker["id"]


def run_entries(path: Path) -> list[Path]:
    return [entry for entry in path.iterdir() if entry.name not in BOOKKEEPING_FILES + BOOKKEEPING_FOLDERS]


def state(path: Path, name: str) -> State:
    """The folder's state once :func:`recover` has run (the lock decides *running*)."""
    if not path.exists() and not path.is_symlink():
        return State.ABSENT
    if path.is_symlink() or not path.is_dir() or ownership_problem(path, name):
        return State.FOREIGN
    return run_state(path)


def run_state(path: Path) -> State:
    """The state of a folder known to be ours (its owner holds the lock): empty, interrupted, finished, replacing."""
    if (path / MANIFEST).is_file():
        return State.FINISHED
    if (path / PREVIOUS).is_dir():
        return State.REPLACING
    return State.INTERRUPTED if any(e.name != CONFIG for e in run_entries(path)) else State.EMPTY


def recover(path: Path) -> None:
    """Complete or roll back a transition that a kill, or a removal that failed half-way, interrupted."""
    if (path / ASIDE).is_dir():  # nothing of the new run was written yet: the old run goes back
        _move_back(path / ASIDE, path)
    if (path / RESTORING).is_dir():  # the new run's files were already gone: finish putting the old one back
        _move_back(path / RESTORING, path)
    if (path / MANIFEST).is_file() and (path / PREVIOUS).exists():  # the new run finished; the old one goes
        remove_tree(path / PREVIOUS)


def move_aside(path: Path) -> None:
    """finished or interrupted -> replacing: the run's files into ``.previous/``, manifest first."""
    (path / ASIDE).mkdir()
    _move_all(run_entries(path), path / ASIDE, manifest_last=False)
    os.replace(path / ASIDE, path / PREVIOUS)  # one rename: the old run is now whole in .previous


def put_back(path: Path) -> None:
    """replacing -> the state before it: the new run's files removed, the old run's put back, manifest last."""
    remove_run(path)  # killed here: still replacing
    os.replace(path / PREVIOUS, path / RESTORING)
    _move_back(path / RESTORING, path)  # killed here: recover() completes it


def _move_all(entries: list[Path], target: Path, manifest_last: bool) -> None:
    """Move entries into ``target``: the manifest last (a folder never shows a manifest without its files) or first
    (the run stops being finished before any of its files goes)."""
    entries = sorted(entries, key=lambda entry: entry.name == MANIFEST)
    for entry in entries if manifest_last else reversed(entries):
        os.replace(entry, target / entry.name)


def _move_back(source: Path, path: Path) -> None:
    _move_all(list(source.iterdir()), path, manifest_last=True)
    source.rmdir()


def remove_run(path: Path) -> None:
    for entry in run_entries(path):
        entry.unlink()  # a run holds regular files only (ownership_problem); unlink never follows a link


def remove_tree(path: Path) -> None:
    """Remove a bookkeeping folder; one that cannot be removed whole (files held open on NFS) is logged and left for
    :func:`recover`: no state depends on it being gone."""
    try:
        shutil.rmtree(path)  # removes links, never what they point to
    except OSError as error:
        log.warning("could not remove '%s' (%s); the next run of this stage removes it", path, error)


def sweep_temporaries(path: Path) -> None:
    """Temporary files a killed writer left (``.name.XXXX.tmp``): never part of a run."""
    for entry in run_entries(path):
        if fnmatch(entry.name, ".*.tmp"):
            entry.unlink(missing_ok=True)


_HELD_LOCKS: set[int] = set()  # the lock descriptors this process holds


def _close_inherited_locks() -> None:
    """In a child just forked (a loader worker, a pool's process): close the lock descriptors it inherited. A
    ``flock`` belongs to the open file, which a fork shares: a child keeping it would hold the folder after the
    stage is killed, until the child notices (a loader worker polls every 5 s), and refuse a ``--resume``."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def take_lock(path: Path) -> int | None:
    """A kernel lock on ``.lock`` (released when the process dies), opened without following a link, or None
    when another process holds it. The lock file is removed only by a holder (:func:`release_lock`), so the file
    locked is checked to be the one the folder holds after locking."""
    for _ in range(10):
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path / LOCK, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            _HELD_LOCKS.add(fd)
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the folder's current file instead
    raise OSError(errno.EAGAIN, f"could not lock '{path / LOCK}'")


def lock_holder(path: Path) -> str:
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as stream:
            return stream.read(32).strip() or "unknown"
    except OSError:
        return "unknown"


def release_lock(path: Path, fd: int, remove_folder: bool) -> None:
    """Remove ``.lock`` while still holding it, then release it; ``remove_folder``: the folder too, if it holds
    nothing of a run (it was made by a run that wrote nothing)."""
    try:
        os.unlink(path / LOCK)
        if remove_folder and not run_entries(path) and not any((path / f).exists() for f in BOOKKEEPING_FOLDERS):
            (path / MARKER).unlink(missing_ok=True)
            path.rmdir()
    except OSError:  # another process is already waiting on a new lock file: the folder is its own now
        pass
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def recover_if_idle(path: Path) -> None:
    """:func:`recover` for a reader (a downstream stage), when no process holds the folder and it is ours."""
    if (
        not any((path / name).exists() for name in (ASIDE, RESTORING, PREVIOUS))
        or read_json_object(path / MARKER) is None
    ):
        return
    try:
        fd = take_lock(path)
    except OSError:  # a folder we may not write: read it as it is
        return
    if fd is not None:
        try:
            recover(path)
        finally:
            release_lock(path, fd, remove_folder=False)
