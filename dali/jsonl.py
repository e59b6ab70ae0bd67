"""JSON-lines files: metrics logs, predictions, skipped-clip lists; durable appends, torn last lines survived."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from dali.files import atomic_write


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSON line, UTF-8 where it can be; a string that cannot be UTF-8 (a lone surrogate from a non-UTF-8
    file name) is written as an ASCII escape instead."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def open_append(path: Path) -> TextIO:
    """``path`` opened to append UTF-8 text, created if absent; a link there is an error, never followed (a run
    folder's files are its own)."""
    return os.fdopen(
        os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a", encoding="utf-8"
    )


def atomic_write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``records`` as they come to a temporary file, renamed over ``path`` once complete."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as stream:
            for record in records:
                stream.write(jsonl_line(record))

    return atomic_write(path, write)


class MetricsLog:
    """Append-only ``metrics.jsonl``; each record is flushed as one line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open_append(self.path) as stream:
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
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """:func:`read_jsonl`, one record at a time (the file is never held whole)."""
    return (record for _, record in iter_jsonl_lines(path))


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of :func:`iter_jsonl`'s records, for errors that name the line."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):  # only the unterminated last line can be torn
                    return
                raise ValueError(f"'{path}' line {number} is not valid JSON") from None


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn, unterminated last line left by a killed writer; returns the number of complete records."""
    path = Path(path)
    if not path.exists():
        return 0
    with os.fdopen(os.open(path, os.O_RDWR | os.O_NOFOLLOW), "r+b") as stream:  # never a link's target
        data = stream.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            stream.truncate(end)
    return sum(1 for line in data[:end].split(b"\n") if line.strip())


class JsonlWriter:
    """Appends records and makes each one durable before returning (flush + fsync)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        repair_jsonl(self.path)
        self.stream = open_append(self.path)

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
