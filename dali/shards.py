"""Clips in WebDataset shards: the shard index, writing shards, and reading a shard's samples back as clips.

A shard is a tar of samples (WebDataset's layout): ``<key>.flac`` (16 kHz mono), ``<key>.frame_<k>.jpg`` for the
frames kept, and ``<key>.json`` (id, source, seconds, labels where the input had them). Beside the tars,
``shards.json`` (the index) names each shard with its sample count, size and sha256: a stage knows every sample's
global position from it without opening a tar, so work is split, resumed and merged by position.

Shards are named relative to the index's folder, or to the index's ``base`` (a URL prefix WebDataset opens:
``https://...``, ``gs://...``, a ``pipe:`` command that writes the shard named last to stdout) when set: the same
index serves a shared filesystem or an object store.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dali.clip_list import Clip
from dali.constants import NUM_FRAMES
from dali.errors import DaliError

INDEX_FORMAT = "dali-shards"
INDEX_VERSION = 1
INDEX_FILE = "shards.json"
AUDIO_EXTENSION = "flac"
MAX_INDEX_BYTES = 64 << 20  # 100k shards of 400 bytes each: far past AudioSet's 2M clips in 1 GB shards (~700)
MAX_SHARDS = 100_000
MAX_SHARD_SAMPLES = 10_000_000
# A sample's member (10 s of flac, one frame, its record) is under a few MB; one that declares more is refused
# before it is read (a tar header can declare any size).
MAX_MEMBER_BYTES = 64 << 20
MAX_RECORD_BYTES = 1 << 20
# WebDataset runs a 'pipe:' URL as a shell command. An index is data, possibly from someone else: the commands it
# names run only when the user says so in the environment.
COMMANDS_CONSENT = "DALI_SHARD_COMMANDS"


class ShardError(DaliError, ValueError):
    """A shard index that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the index's folder or base, or a URL
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    """The shards of a prepared set, in order; sample ``j`` of shard ``i`` is at position ``offsets[i] + j``."""

    path: Path
    shards: list[Shard]
    frames: tuple[int, ...] = ()
    base: str | None = None
    offsets: list[int] = field(init=False)

    def __post_init__(self):
        self.offsets, total = [], 0
        for shard in self.shards:
            self.offsets.append(total)
            total += shard.samples
        self.samples = total

    def url(self, number: int) -> str:
        """What WebDataset opens for shard ``number``: a URL as written, else the name under the base or folder."""
        name = self.shards[number].name
        if is_stream(name) or Path(name).is_absolute():
            return name
        if self.base:
            return self.base.rstrip("/") + "/" + name
        return str(self.path.parent / name)

    def as_json(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "samples": self.samples,
            "frames": list(self.frames),
            "audio": AUDIO_EXTENSION,
            **({"base": self.base} if self.base else {}),
            "shards": [vars(shard) for shard in self.shards],
        }


def is_shard_index(path: str | Path) -> bool:
    """Whether ``path`` is a shard index, by its content (its first bytes name the format)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(256)
    except OSError:
        return False
    return f'"format": "{INDEX_FORMAT}"'.encode() in head or f'"format":"{INDEX_FORMAT}"'.encode() in head


def read_shard_index(path: str | Path) -> ShardIndex:
    """The index at ``path``, every field checked (sizes bounded before anything is built from them)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise ShardError(f"shard index '{path}' is over {MAX_INDEX_BYTES >> 20} MB")
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise ShardError(f"cannot read shard index '{path}': {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:
        raise ShardError(f"shard index '{path}' is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise ShardError(f'\'{path}\' is not a shard index (no "format": "{INDEX_FORMAT}")')
    if data.get("version") != INDEX_VERSION:
        raise ShardError(f"shard index '{path}' has version {data.get('version')!r}; this dali reads {INDEX_VERSION}")
    shards, frames, base = data.get("shards"), data.get("frames", []), data.get("base")
    if not isinstance(shards, list) or not 0 < len(shards) <= MAX_SHARDS:
        raise ShardError(f"shard index '{path}': 'shards' must list 1-{MAX_SHARDS} shards")
    numbers = isinstance(frames, list) and all(isinstance(k, int) and 0 <= k < NUM_FRAMES for k in frames)
    if not numbers or len(set(frames)) < len(frames):
        raise ShardError(f"shard index '{path}': 'frames' must list distinct frame numbers 0-{NUM_FRAMES - 1}")
    if base is not None and not isinstance(base, str):
        raise ShardError(f"shard index '{path}': 'base' must be a string")
    index = ShardIndex(path, [_shard(entry, path, n) for n, entry in enumerate(shards)], tuple(frames), base)
    commands = [url for url in map(index.url, range(len(index.shards))) if url.startswith("pipe:")]
    if commands and os.environ.get(COMMANDS_CONSENT) != "1":
        raise ShardError(
            f"shard index '{path}' reads its shards through shell commands ('{commands[0][:80]}'); dali runs the "
            f"commands an index names only with {COMMANDS_CONSENT}=1 in the environment"
        )
    return index


def _shard(entry: Any, path: Path, number: int) -> Shard:
    try:
        shard = Shard(entry["name"], entry["samples"], entry["bytes"], entry["sha256"])
        valid = (
            isinstance(shard.name, str)
            and 0 < len(shard.name) <= 4096
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (shard.samples, shard.bytes))
            and 0 <= shard.samples <= MAX_SHARD_SAMPLES
            and shard.bytes >= 0
            and isinstance(shard.sha256, str)
        )
    except (KeyError, TypeError):
        valid = False
    if not valid:
        raise ShardError(
            f"shard index '{path}': shard {number} needs a 'name', 'samples' (0-{MAX_SHARD_SAMPLES}), 'bytes' and "
            "'sha256'"
        )
    return shard


# -- writing ------------------------------------------------------------------------------------------------
def sample_key(position: int) -> str:
    """A sample's key in its shard: its position in the set. Clip ids may hold dots, which WebDataset reads as the
    start of a member's extension; the id itself is in the sample's JSON."""
    return f"{position:09d}"


class _HashingFile(io.RawIOBase):
    """A file that hashes what is written to it (the index's sha256 without reading each shard back)."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.stream.write(data)


@dataclass
class ShardSample:
    """One sample to write: its record (id, source, seconds, labels), audio as flac bytes, frames as JPEG bytes."""

    record: dict
    audio: bytes
    frames: dict[int, bytes]


def write_shard(
    path: Path, samples: Iterator[ShardSample], first_position: int, max_bytes: int, max_samples: int | None = None
) -> Shard | None:
    """Write samples taken from ``samples`` into one tar at ``path`` until it holds ``max_bytes`` or ``max_samples``
    (or ``samples`` ends), keyed by position from ``first_position``; None when ``samples`` is already empty.
    Atomic: a killed write leaves no shard under the name."""
    import webdataset

    from dali.files import atomic_write

    first = next(samples, None)
    if first is None:
        return None
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        count = 0
        with open(tmp, "wb") as raw:
            stream = _HashingFile(raw)
            # mtime fixed: the same samples give the same bytes, so the same sha256
            with webdataset.TarWriter(stream, mtime=0.0, encoder=False) as tar:
                for sample in itertools.chain([first], samples):
                    tar.write(_members(sample, first_position + count))
                    count += 1
                    if stream.size >= max_bytes or count == max_samples:
                        break
            written.update(samples=count, bytes=stream.size, sha256=stream.digest.hexdigest())

    atomic_write(path, write)
    return Shard(path.name, written["samples"], written["bytes"], written["sha256"])


def _members(sample: ShardSample, position: int) -> dict[str, Any]:
    members = {"__key__": sample_key(position), AUDIO_EXTENSION: sample.audio}
    members["json"] = json.dumps(sample.record, ensure_ascii=False).encode("utf-8")
    return members | {f"frame_{k}.jpg": data for k, data in sample.frames.items()}


def sample_of_clip(clip: Clip, frames: Sequence[int]) -> ShardSample:
    """A prepared clip (a wav and frame files) as a sample: its audio re-encoded as 16 kHz flac, frames as they are."""
    from dali.audio import file_as_flac

    record = {"id": clip.id, "source": str(clip.audio)}
    audio, seconds = file_as_flac(clip.audio)
    record["seconds"] = seconds
    if clip.labels is not None:
        record["labels"] = clip.labels
    images = {}
    for k in frames:
        path = clip.frame_path(k)
        if path is not None and path.is_file():
            images[k] = path.read_bytes()
    return ShardSample(record, audio, images)


# -- reading ------------------------------------------------------------------------------------------------
@dataclass
class SampleProblem:
    """A sample that could not be read from its shard: where, and why (a corrupt member, a truncated tar)."""

    key: str | None
    reason: str


def read_samples(url: str) -> Iterator[Clip | SampleProblem]:
    """The samples of one shard, in order, as clips holding their members' bytes.

    Written on WebDataset's opener (``gopen``: files, URLs, ``pipe:``) with our own tar loop: WebDataset's reads
    each member whole whatever size its header declares, and stops a shard's samples with an exception we could not
    tie to a key. Here a member over :data:`MAX_MEMBER_BYTES` makes its sample a problem, and a truncated or corrupt
    tar ends the shard with one problem naming the last key read.
    """
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as error:
        yield SampleProblem(None, f"cannot open the shard ({type(error).__name__}: {error})")
        return
    try:
        yield from _samples_in(stream, url, "r|*")
    finally:
        stream.close()


def _samples_in(stream, url: str, mode: str) -> Iterator[Clip | SampleProblem]:
    """The samples of a tar stream from where it stands (see :func:`read_samples`)."""
    from webdataset.tariterators import base_plus_ext

    key, members, problem, last = None, {}, None, None
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, extension = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield _sample(key, members, url) if problem is None else SampleProblem(key, problem)
                        last = key
                    key, members, problem = prefix, {}, None
                if info.size > MAX_MEMBER_BYTES:
                    problem = f"its member '{info.name}' declares {info.size} bytes, over {MAX_MEMBER_BYTES}"
                    continue
                members[extension.lower()] = tar.extractfile(info).read()
        if key is not None:
            yield _sample(key, members, url) if problem is None else SampleProblem(key, problem)
    except (tarfile.TarError, OSError, EOFError) as error:
        if problem is not None:  # a member declaring more than the shard holds: its own reason first
            yield SampleProblem(key, problem)
        after = f" after sample {last}" if last is not None else ""
        yield SampleProblem(None, f"the shard ends early or is corrupt{after}: {type(error).__name__}: {error}")


# -- reading one sample where it starts ---------------------------------------------------------------------
class SampleLocator:
    """Where each sample of a shard starts, for the stages that read samples in any order (training): found once
    per shard and process by a walk over the tar's headers (no member is read), kept as two arrays (8 bytes a
    sample each). A shard must then be a file (a path on a shared filesystem), not a stream."""

    def __init__(self):
        self._shards: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, url: str, key: str) -> Clip | SampleProblem:
        """The sample ``key`` of shard ``url``, read where it starts."""
        keys, starts = self._shards.get(url) or self._shards.setdefault(url, _sample_starts(url))
        number = _key_number(key)
        found = int(np.searchsorted(keys, number)) if number is not None else len(keys)
        if found == len(keys) or keys[found] != number:
            return SampleProblem(key, f"the shard holds no sample '{key}'")
        with open(url, "rb") as stream:
            stream.seek(int(starts[found]))
            sample = next(_samples_in(stream, url, "r|"), None)
        if isinstance(sample, Clip) and sample.key != key:
            return SampleProblem(key, f"the shard changed since it was read: sample '{sample.key}' is where it was")
        return sample if sample is not None else SampleProblem(key, "the shard ends before it")


def is_stream(url: str) -> bool:
    """Whether a shard's URL is read as a stream (a URL, a command), not a file that can be sought in."""
    return "://" in url or url.startswith("pipe:")


def _key_number(key: str) -> int | None:
    return int(key) if key.isascii() and key.isdigit() and len(key) < 19 else None


def _sample_starts(url: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys as numbers, ascending; the byte offset of each one's first member) of a shard that is a file."""
    from webdataset.tariterators import base_plus_ext

    if is_stream(url):
        raise ShardError(
            f"'{url}': samples are read where they start only from a file (copy the shards to a filesystem)"
        )
    keys, starts, last = [], [], None
    try:
        with tarfile.open(url, "r:") as tar:
            for info in tar:
                prefix, _ = base_plus_ext(info.name)
                if prefix is not None and prefix != last:
                    number = _key_number(prefix)
                    if number is None or (keys and number <= keys[-1]) or len(keys) >= MAX_SHARD_SAMPLES:
                        raise ShardError(f"'{url}' is not a shard of dali prepare (sample key '{prefix}')")
                    keys.append(number)
                    starts.append(info.offset)
                    last = prefix
                tar.members = []  # the walk keeps nothing it has passed
    except (tarfile.TarError, OSError, EOFError) as error:
        if not keys:
            raise ShardError(f"cannot read shard '{url}': {type(error).__name__}: {error}") from None
    return np.asarray(keys, dtype=np.int64), np.asarray(starts, dtype=np.int64)


def _sample(key: str, members: dict[str, bytes], url: str) -> Clip | SampleProblem:
    raw = members.pop("json", None)
    if raw is None or len(raw) > MAX_RECORD_BYTES:
        return SampleProblem(key, "no JSON record, or one over 1 MB")
    try:
        record = json.loads(raw)
        clip_id = record["id"]
        if not isinstance(clip_id, str) or not clip_id:
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        return SampleProblem(key, "its JSON record is not an object with an 'id'")
    return Clip(id=clip_id, media=members, shard=url, key=key, labels=record.get("labels"))
