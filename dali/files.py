"""Writing files so that a killed process never leaves half of one under the real name, and hashing them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


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
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after: a writer that replaces the file (safetensors) would reset it
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


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object a small file of ours holds (a marker, a record), or None when it is absent, unreadable, not
    JSON or not an object; a link there is never followed."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


MAX_YAML_BYTES = 1 << 20  # a stage config or a preset is a few kB


def read_plain_yaml(path: str | Path) -> Any:
    """A YAML file as plain data. Anchors and aliases are refused before anything is built (a few hundred bytes
    of nested aliases expand to tens of millions of strings), as is a file over :data:`MAX_YAML_BYTES`.

    Raises:
        ValueError: the reason, naming the file; OSError: it cannot be read.
    """
    import yaml

    path = Path(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"'{path}' is over {MAX_YAML_BYTES} bytes: not a config")
    text = path.read_text(encoding="utf-8")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: an alias is seen, never expanded
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ValueError(f"'{path}' uses YAML anchors or aliases; a config is plain data, write each value out")
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"'{path}' is not valid YAML: {error}") from None
