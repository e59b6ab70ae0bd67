"""Experiment folders: ``expe/<run>/<stage>/`` with config, metrics, weights and a manifest written last.

``manifest.json`` is the "done" marker: it is written atomically after everything else, and a downstream
stage refuses an upstream folder without one. Every write that could be read back later goes through a
temporary name and ``os.replace``, so a killed process never leaves a half-written file under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


class StageStateError(RuntimeError):
    """A stage folder is in a state that forbids the requested action (finished, partial, missing upstream)."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """Hash of an input: a file's sha256; for a stage folder, its manifest's sha256; for other folders, none."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path)}
    if (path / MANIFEST).is_file():
        return {"path": str(path), "manifest_sha256": file_sha256(path / MANIFEST)}
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


class Stage:
    """One stage folder: created, refused or resumed according to the flags, then finished with a manifest."""

    def __init__(self, path: str | Path, name: str, overwrite: bool = False, resume: bool = False, main: bool = True):
        self.path = Path(path)
        self.name = name
        self.started = time.time()
        self.main = main
        self.inputs: dict[str, dict[str, Any]] = {}
        if not main:
            return
        if (self.path / MANIFEST).exists():
            if not overwrite:
                raise StageStateError(
                    f"stage folder '{self.path}' is finished (it has a {MANIFEST}); pass --overwrite to redo it"
                )
            shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()) and not (resume or overwrite):
            raise StageStateError(
                f"stage folder '{self.path}' holds an unfinished run; pass --resume to continue it or --overwrite"
            )
        elif self.path.exists() and overwrite and not resume:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def resuming(self) -> bool:
        return self.path.exists() and any(p.name != CONFIG for p in self.path.iterdir())

    def save_config(self, config: dict[str, Any]) -> None:
        if self.main:
            atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def add_input(self, name: str, path: str | Path) -> None:
        self.inputs[name] = input_fingerprint(path)

    def metrics(self) -> "MetricsLog":
        return MetricsLog(self.path / METRICS, enabled=self.main)

    def finish(self, metrics: dict[str, Any], outputs: list[str]) -> Path | None:
        """Write the manifest last: the stage is done once it exists."""
        if not self.main:
            return None
        missing = [name for name in outputs if not (self.path / name).exists()]
        if missing:
            raise StageStateError(f"stage '{self.name}' cannot finish: outputs {missing} were not written")
        manifest = {
            "stage": self.name,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_time_s": round(time.time() - self.started, 3),
            "git_commit": git_commit(),
            "versions": versions(),
            "command": sys.argv,
            "inputs": self.inputs,
            "outputs": {name: file_sha256(self.path / name) for name in outputs},
            "metrics": metrics,
        }
        return atomic_write_json(self.path / MANIFEST, manifest)


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
        self.stream = open(self.path, "a")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.stream.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
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
