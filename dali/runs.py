"""Experiment folders: ``expe/<run>/<stage>/`` with config, metrics, weights and a manifest written last.

``manifest.json`` is the "done" marker: it is written atomically after everything else, and a downstream
stage refuses an upstream folder without one. Every write that could be read back later goes through a
temporary name and ``os.replace``, so a killed process never leaves a half-written file under the real name.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

import yaml

from dali.errors import DaliError
from dali.files import atomic_write_json, atomic_write_text, file_sha256
from dali.jsonl import MetricsLog

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


class StageStateError(DaliError, RuntimeError):
    """A stage folder is in a state that forbids the requested action (finished, partial, missing upstream)."""


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """Hash of an input: a file's sha256; a stage folder's manifest's or a model folder's config's; else none
    (a hub id, say)."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path)}
    if (path / MANIFEST).is_file():
        return {"path": str(path), "manifest_sha256": file_sha256(path / MANIFEST)}
    if (path / "config.json").is_file():  # a model folder (LLaVA): its config identifies it cheaply
        return {"path": str(path), "config_sha256": file_sha256(path / "config.json")}
    return {"path": str(path), "exists": path.exists()}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    try:
        import ot

        found["pot"] = ot.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        found["cuda_device"] = torch.cuda.get_device_name(0)
    return found


# Every name a stage folder may hold. ``--overwrite`` replaces only a folder whose entries all match these.
LOCK = ".lock"
PREVIOUS = ".previous"  # an overwritten run's files, kept until the new run finishes (restored if it fails)
CHECKPOINT = "checkpoint.pt"
STAGE_ENTRIES = (
    CONFIG,
    MANIFEST,
    METRICS,
    CHECKPOINT,
    LOCK,
    PREVIOUS,
    "*.safetensors",
    "*.jsonl",
    "scores.json",
    "scores.md",
    ".*.tmp",
)
# Config keys that may change between a run and its --resume: how it runs, not what it computes.
RESUME_FREE_KEYS = frozenset(
    {"overwrite", "resume", "device", "num_workers", "checkpoint_every", "emd_workers", "compile", "evaluate", "sbert"}
    | {"cache_vision_tokens", "cache_audio_features", "cache_audio_tokens", "gradient_checkpointing"}
)
_OPEN_STAGES: list["Stage"] = []


def check_run_name(run: str, flag_name: str = "--run") -> str:
    """A run name is one folder name under --expe-dir: no separators, no '..', not absolute."""
    if not run or run in (".", "..") or "/" in run or "\\" in run or os.sep in run or "\0" in run:
        raise StageStateError(
            f"{flag_name} '{run}' must be a plain name (a folder under --expe-dir); give a folder with --out instead"
        )
    return run


def _foreign_entries(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir() if not any(fnmatch(entry.name, p) for p in STAGE_ENTRIES))


class Stage:
    """One stage folder: checked, locked, resumed or replaced according to the flags, finished with a manifest.

    Nothing is deleted when the object is made. ``--overwrite`` of a finished or interrupted run moves the old
    files into ``.previous/`` at the first write (after the stage has loaded its inputs and models); ``finish``
    deletes them, and a run that fails puts them back (``close``, called by :func:`stage_main`). A folder that
    holds anything a stage does not write is never replaced. The folder is locked while a process uses it.
    """

    def __init__(self, path: str | Path, name: str, overwrite: bool = False, resume: bool = False, main: bool = True):
        self.path = Path(path)
        self.name = name
        self.started = time.time()
        self.main = main
        self.overwrite, self.resume = overwrite, resume
        self.inputs: dict[str, dict[str, Any]] = {}
        self.command: list[str] = _COMMANDS[-1] if _COMMANDS else list(sys.argv)
        self._lock = None
        self._opened = self._finished = self._replaced = False
        self._created = not self.path.exists()
        if not main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise StageStateError(f"stage folder '{self.path}' is a file, not a folder")
        if not self._created and any(self.path.iterdir()):
            foreign = _foreign_entries(self.path)
            if foreign or not ((self.path / CONFIG).exists() or (self.path / MANIFEST).exists()):
                raise StageStateError(
                    f"'{self.path}' is not a dali stage folder (it holds {foreign[:5] or 'no config.yaml'}); "
                    "it is never replaced: choose another --out or --run"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        _OPEN_STAGES.append(self)
        if (self.path / MANIFEST).exists():
            if not overwrite:
                self.close()
                raise StageStateError(
                    f"stage folder '{self.path}' is finished (it has a {MANIFEST}); pass --overwrite to redo it"
                )
        elif self._holds_run() and not (resume or overwrite):
            self.close()
            kept = " (the run it replaced is kept in .previous/)" if (self.path / PREVIOUS).exists() else ""
            raise StageStateError(
                f"stage folder '{self.path}' holds an unfinished run{kept}; pass --resume to continue it or --overwrite"
            )

    def _holds_run(self) -> bool:
        """Anything beyond a config (all that a run which failed on its inputs wrote) and the lock."""
        return any(entry.name not in (CONFIG, LOCK) for entry in self.path.iterdir())

    def _take_lock(self) -> None:
        """An OS lock on ``.lock`` (released by the kernel when the process dies); a second writer is refused."""
        import fcntl

        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StageStateError(f"stage folder '{self.path}' is in use by another process (PID {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    @property
    def resuming(self) -> bool:
        return self.resume and self._holds_run() and not (self.path / MANIFEST).exists()

    def _open(self) -> None:
        """First write: an overwrite moves the old run aside now, once the stage has got this far."""
        if self._opened or not self.main:
            return
        self._opened = True
        replacing = (self.path / MANIFEST).exists() or (self.overwrite and not self.resume)
        if not (replacing and self._holds_run()):
            return
        self._replaced = True
        previous = self.path / PREVIOUS
        if previous.exists():  # a replacement was killed: drop its files, keep the run it was replacing
            _remove_entries(self.path, keep=(LOCK, PREVIOUS))
            return
        previous.mkdir()
        for entry in list(self.path.iterdir()):
            if entry.name not in (LOCK, PREVIOUS):
                os.replace(entry, previous / entry.name)

    def save_config(self, config: dict[str, Any]) -> None:
        """Write ``config.yaml``; on --resume, refuse a config that changes what the run computes."""
        if not self.main:
            return
        if self.resuming and (self.path / CONFIG).exists():
            saved = yaml.safe_load((self.path / CONFIG).read_text()) or {}
            changed = sorted(
                key
                for key in set(saved) | set(config)
                if key not in RESUME_FREE_KEYS and saved.get(key) != config.get(key)
            )
            if changed:
                details = "; ".join(f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
                raise StageStateError(
                    f"--resume: '{self.path}' was started with other settings ({details}); "
                    "resume with the same flags, or pass --overwrite to start again"
                )
        self._open()
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def add_input(self, name: str, path: str | Path) -> None:
        self.inputs[name] = input_fingerprint(path)

    def metrics(self) -> "MetricsLog":
        self._open()
        return MetricsLog(self.path / METRICS, enabled=self.main)

    def finish(self, metrics: dict[str, Any], outputs: list[str]) -> Path | None:
        """Write the manifest last: the stage is done once it exists. Then the replaced run goes."""
        if not self.main:
            return None
        self._open()
        missing = [name for name in outputs if not (self.path / name).exists()]
        if missing:
            raise StageStateError(f"stage '{self.name}' cannot finish: outputs {missing} were not written")
        manifest = {
            "stage": self.name,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_time_s": round(time.time() - self.started, 3),
            "git_commit": git_commit(),
            "versions": versions(),
            "command": self.command,
            "inputs": self.inputs,
            "outputs": {name: file_sha256(self.path / name) for name in outputs},
            "metrics": metrics,
        }
        written = atomic_write_json(self.path / MANIFEST, manifest)
        (self.path / CHECKPOINT).unlink(missing_ok=True)
        shutil.rmtree(self.path / PREVIOUS, ignore_errors=True)
        self._finished = True
        return written

    def close(self) -> None:
        """Release the lock. A run that did not finish after replacing one puts the replaced run back."""
        if self in _OPEN_STAGES:
            _OPEN_STAGES.remove(self)
        if self._lock is None:
            return
        previous = self.path / PREVIOUS
        if self._replaced and not self._finished and previous.is_dir():
            _remove_entries(self.path, keep=(LOCK, PREVIOUS))
            for entry in list(previous.iterdir()):
                os.replace(entry, self.path / entry.name)
            previous.rmdir()
        self._lock.close()
        self._lock = None
        (self.path / LOCK).unlink(missing_ok=True)
        if self._created and not any(self.path.iterdir()):
            self.path.rmdir()  # made by this run, which wrote nothing


def _remove_entries(folder: Path, keep: tuple[str, ...]) -> None:
    for entry in list(folder.iterdir()):
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


_COMMANDS: list[list[str]] = []  # the command line of each stage main running, innermost last


def stage_main(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a stage's ``main``: every stage it opened is closed on return or error (lock, restore), and its manifest
    records the command that reruns it: the process's own, or, called in-process with ``argv`` (the demo does),
    ``python -m <its module> <argv>``."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        opened = len(_OPEN_STAGES)
        # the process's own command line when ``argv`` is its tail (``dali align ...``, ``python -m ...``)
        in_process = argv is not None and list(argv) != sys.argv[len(sys.argv) - len(argv) :]
        _COMMANDS.append([sys.executable, "-m", main.__module__, *argv] if in_process else list(sys.argv))
        try:
            return main(argv)
        finally:
            _COMMANDS.pop()
            for stage in reversed(_OPEN_STAGES[opened:]):
                stage.close()

    return wrapper


def require_finished(path: str | Path, what: str, flag_name: str) -> Path:
    """An upstream stage folder with its manifest, or a clear error naming the flag that points at it."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        state = "does not exist" if not path.exists() else f"has no {MANIFEST} (unfinished or not a stage folder)"
        raise StageStateError(f"{flag_name}: the {what} folder '{path}' {state}")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())
