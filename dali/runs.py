"""Experiment folders: ``expe/<run>/<stage>/`` with config, metrics, weights and a manifest written last.

``manifest.json`` is the "done" marker: it is written atomically after everything else, and a downstream
stage refuses an upstream folder without one. Every write that could be read back later goes through a
temporary name and ``os.replace``, so a killed process never leaves a half-written file under the real name.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable

import yaml

from dali.errors import DaliError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


class StageStateError(DaliError, RuntimeError):
    """A stage folder is in a state that forbids the requested action (finished, partial, missing upstream)."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The temporary name is short and ASCII whatever ``path`` is called (a 250-byte or non-UTF-8 name still
    fits and still opens); the file gets the mode the umask gives a new file; a full disk says so, naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in path.name[:40])
    handle, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except Exception as error:  # torch.save and libsndfile report a full disk as RuntimeError / "System error"
        if _disk_full(error, path.parent):
            raise OSError(errno.ENOSPC, f"no space left on device while writing '{path}'") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _disk_full(error: Exception, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSON line, UTF-8 where it can be; a string that cannot be UTF-8 (a lone surrogate from a non-UTF-8
    file name) is written as an ASCII escape instead."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def atomic_write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(jsonl_line(record) for record in records))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
        self.command: list[str] = list(sys.argv)
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


def stage_main(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a stage's ``main``: every stage it opened is closed on return or error (lock, restore)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        opened = len(_OPEN_STAGES)
        try:
            return main(argv)
        finally:
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


class MetricsLog:
    """Append-only ``metrics.jsonl``; each record is flushed as one line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as stream:
            stream.write(json.dumps(record) + "\n")
            stream.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def rewind(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """On resume: drop the records logged after the checkpoint, so no step appears twice."""
        if self.enabled and self.path.exists():
            atomic_write_jsonl(self.path, [record for record in read_jsonl(self.path) if keep(record)])


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a killed writer) is ignored, any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # only the unterminated last line can be torn
                break
            raise ValueError(f"'{path}' line {number} is not valid JSON") from None
    return records


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn, unterminated last line left by a killed writer; returns the number of complete records."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as stream:
            stream.truncate(end)
    return sum(1 for line in data[:end].split(b"\n") if line.strip())


class JsonlWriter:
    """Appends records and makes each one durable before returning (flush + fsync)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        repair_jsonl(self.path)
        self.stream = open(self.path, "a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.stream.write("".join(jsonl_line(record) for record in records))
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, **kwargs):
    """A tqdm bar; DALI_PROGRESS=0 turns bars off, and logs that are not a terminal get few updates."""
    from tqdm.auto import tqdm

    if os.environ.get("DALI_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 20.0)
    return tqdm(iterable, **kwargs)
