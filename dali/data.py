"""Datasets in the formats the original used, read with clear errors.

* prefix pairs: the original ``prefixDS.json`` (a list of LLaVA conversations with ``image``/``audio``
  paths) or a CSV with columns ``image,caption[,audio]``;
* alignment pairs: CAV-MAE's JSON ``{"data": [{"video_id", "wav", "video_path", "labels"}]}`` where frames
  live at ``<video_path>/frame_<k>/<video_id>.jpg``;
* test lists: AudioCaps-style CSV (one row per caption: ``youtube_id`` or ``file_id``, ``caption``) or
  Clotho-style (``file_name, caption_1..caption_5``).

Relative paths are resolved against a data root (by default the folder of the list file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dali.audio import (
    AudioLoadError,
    audio_to_features,
    fit_wave,
    kaldi_fbank,
    load_audio,
    normalize_fbank,
    num_frames,
    samples_for_frames,
)
from dali.clip_list import Clip, ClipList, resolve_path
from dali.constants import DEFAULT_FRAME_INDEX, ON_ERROR_CHOICES, TARGET_FRAMES
from dali.errors import DaliError
from dali.limits import MAX_IMAGE_PIXELS, frame_problem
from dali.shards import AUDIO_EXTENSION

if TYPE_CHECKING:
    from dali.models.audio_encoders import AudioEncoder

log = logging.getLogger(__name__)


class DataError(DaliError, ValueError):
    """A dataset list is malformed; the message names the file, the line and the problem."""


class ClipError(DaliError, RuntimeError):
    """One clip's audio or frame cannot be used; the message names the file."""

    def __init__(self, clip_id: str, path: str | Path, reason: str):
        self.clip_id, self.path, self.reason = clip_id, str(path), reason
        super().__init__(f"clip '{clip_id}': cannot use '{path}': {reason}")


def _check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: empty or missing caption")
    return " ".join(caption.split())


def read_prefix_pairs(path: str | Path, root: str | Path | None = None) -> list[Clip]:
    """The (frame, audio caption) pairs of stage 1a, from the original JSON layout or a CSV."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise DataError(f"prefix pairs file '{path}' does not exist")
    clips = []
    if path.suffix == ".csv":
        for number, row in _csv_rows(path, required=("image", "caption")):
            where = f"'{path}' line {number}"
            clips.append(
                Clip(
                    id=row.get("id") or Path(row["image"]).stem,
                    image=resolve_path(root, row["image"]),
                    audio=resolve_path(root, row["audio"]) if row.get("audio") else None,
                    captions=[_check_caption(row["caption"], where)],
                )
            )
        return clips
    records = _load_json(path)
    if not isinstance(records, list):
        raise DataError(f"'{path}' must hold a JSON list of conversation records")
    for number, record in enumerate(records):
        where = f"'{path}' record {number}"
        try:
            answer = next(turn["value"] for turn in record["conversations"] if turn.get("from") == "gpt")
            clips.append(
                Clip(
                    id=str(record.get("id", number)),
                    image=resolve_path(root, record["image"]),
                    audio=resolve_path(root, record["audio"]) if record.get("audio") else None,
                    captions=[_check_caption(answer, where)],
                )
            )
        except (KeyError, TypeError, StopIteration):
            raise DataError(f"{where}: needs 'image' and a 'conversations' list with a 'gpt' turn") from None
    return clips


def read_cavmae_json(path: str | Path, root: str | Path | None = None) -> ClipList:
    """Alignment / pseudo-captioning clips from CAV-MAE's JSON format, streamed into a compact :class:`ClipList`
    (a 2M-clip AudioSet list is never held as JSON objects; see ``benchmarks/clip_lists.py``)."""
    path = Path(path)
    clips, seen = ClipList(Path(root) if root is not None else path.parent), set()
    for number, record in enumerate(_cavmae_records(path)):
        try:
            clip_id, wav, frames = str(record["video_id"]), record["wav"], record.get("video_path")
            if not isinstance(wav, str) or not isinstance(frames, (str, type(None))):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"'{path}' record {number}: needs 'video_id' and 'wav'") from None
        if clip_id in seen:
            log.warning("'%s' record %d: duplicate video_id '%s' ignored", path, number, clip_id)
            continue
        seen.add(clip_id)
        labels = record.get("labels")
        clips.append(clip_id, wav, frames, labels if isinstance(labels, str) else None)
    return clips


MAX_JSON_DEPTH = 64  # deeper than any list file; a deeper one is refused before the parser's memory grows with it
MAX_DIGITS = 1_000  # no id or path holds a run of 1000 digits; Python converts at most 4300 to an int
_DIGITS = b"0123456789"
_DIGIT_MARKS = bytes(57 if 48 <= byte <= 57 else 32 for byte in range(256))  # a digit -> b"9", anything else -> b" "


class _NoLongDigitRuns:
    """A binary stream that refuses a run of :data:`MAX_DIGITS` digits before the parser sees it: ijson's C backend
    crashes the process (SystemError, then a segmentation fault) on an integer past Python's 4300-digit limit.

    Linear and cheap (written here: no library checks this): the runs at a chunk's ends are measured and carried
    across chunks; inside it, a run of ``MAX_DIGITS`` digits covers a position that is a multiple of ``MAX_DIGITS``
    from the first non-digit, so only the digits found at those positions are looked at, and only a run not closed
    within 32 bytes on both sides is measured whole."""

    def __init__(self, stream, path: Path):
        self.stream, self.path, self.run = stream, path, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        lead = len(chunk) - len(chunk.lstrip(_DIGITS))
        if lead == len(chunk):  # all digits (or the end): the run goes on
            self.run += lead
            long = self.run >= MAX_DIGITS
        else:
            tail = len(chunk) - len(chunk.rstrip(_DIGITS))
            long = self.run + lead >= MAX_DIGITS or tail >= MAX_DIGITS or self._inner_run(chunk, lead)
            self.run = tail
        if long:
            raise DataError(f"'{self.path}' holds a run of {MAX_DIGITS} digits or more: not a clip list")
        return chunk

    @staticmethod
    def _inner_run(chunk: bytes, lead: int) -> bool:
        samples = chunk[lead::MAX_DIGITS].translate(_DIGIT_MARKS)
        at = samples.find(b"9")
        while at != -1:
            p = lead + at * MAX_DIGITS
            if not (chunk[p : p + 32].lstrip(_DIGITS) and chunk[max(lead, p - 32) : p].rstrip(_DIGITS)):
                after, before = chunk[p : p + MAX_DIGITS], chunk[max(0, p - MAX_DIGITS) : p]
                if len(after) - len(after.lstrip(_DIGITS)) + len(before) - len(before.rstrip(_DIGITS)) >= MAX_DIGITS:
                    return True
            at = samples.find(b"9", at + 1)
        return False


def _cavmae_records(path: Path) -> Iterator[Any]:
    """Each element of a CAV-MAE list's ``data`` array, parsed one at a time from the file (ijson, C backend)."""
    import ijson

    if not path.is_file():
        raise DataError(f"list file '{path}' does not exist")
    shape_error = DataError(f'\'{path}\' must be a CAV-MAE list: {{"data": [{{"video_id", "wav", "video_path"}}]}}')
    with open(path, "rb") as stream:
        if stream.read(3) != b"\xef\xbb\xbf":  # a byte-order mark is fine
            stream.seek(0)
        events = _depth_checked(ijson.basic_parse(_NoLongDigitRuns(stream, path)), path)
        try:
            if next(events, None) != ("start_map", None):
                raise shape_error
            found = False
            for event, value in events:
                if event == "end_map":
                    break
                if value == "data" and not found:
                    found = True
                    if next(events) != ("start_array", None):
                        raise shape_error
                    yield from _array_values(events)
                else:
                    _value(events)
            if not found:
                raise shape_error
            if next(events, None) is not None:
                raise DataError(f"'{path}' is not valid JSON: extra data after the list")
        except DataError:
            raise
        except (ijson.JSONError, ValueError) as error:  # ValueError: a number past Python's 4300-digit limit
            raise DataError(f"'{path}' is not valid JSON: {str(error).splitlines()[0][:200]}") from None


def _depth_checked(events: Iterator[tuple[str, Any]], path: Path) -> Iterator[tuple[str, Any]]:
    depth = 0
    for event, value in events:
        depth += event in ("start_map", "start_array")
        depth -= event in ("end_map", "end_array")
        if depth > MAX_JSON_DEPTH:
            raise DataError(f"'{path}' is not a list file: its JSON nests too deeply")
        yield event, value


def _array_values(events: Iterator[tuple[str, Any]]) -> Iterator[Any]:
    """The values of an array whose ``start_array`` was just read, up to its ``end_array``."""
    while (item := _value(events, end="end_array")) is not _END:
        yield item


_END = object()


def _value(events: Iterator[tuple[str, Any]], end: str | None = None) -> Any:
    """The next whole JSON value from the events (``_END`` where the ``end`` event comes instead)."""
    event, value = next(events)
    if event == end:
        return _END
    if event == "start_map":
        record = {}
        while (key := next(events))[0] != "end_map":
            record[key[1]] = _value(events)
        return record
    if event == "start_array":
        return list(_array_values(events))
    return value


def write_cavmae_json(clips: Sequence[Clip], path: str | Path, root: str | Path | None = None) -> None:
    from dali.files import atomic_write_json

    root = Path(root) if root is not None else Path(path).parent

    def rel(p: Path) -> str:
        try:
            return str(Path(p).relative_to(root))
        except ValueError:
            return str(p)

    atomic_write_json(
        path,
        {
            "data": [
                {
                    "video_id": clip.id,
                    "wav": rel(clip.audio),
                    "video_path": rel(clip.frames_root) if clip.frames_root else "",
                    "labels": "",
                }
                for clip in clips
            ]
        },
    )


def read_caption_csv(
    path: str | Path, audio_dir: str | Path | None = None, frames_dir: str | Path | None = None
) -> list[Clip]:
    """A test list with several references per clip, AudioCaps (long) or Clotho (wide) layout.

    Audio is ``<audio_dir>/<id>.wav`` (or the row's ``file_name``/``file_path``); frames are under
    ``<frames_dir>/frame_<k>/<id>.jpg`` when ``frames_dir`` is given. Rows keep their first-seen order;
    references are kept per clip as written (the original deduplicated them across clips).
    """
    path = Path(path)
    audio_dir = Path(audio_dir) if audio_dir is not None else path.parent
    rows = list(_csv_rows(path))
    if not rows:
        raise DataError(f"'{path}' has no rows")
    columns = {name for name in rows[0][1] if name}
    wide = [name for name in sorted(columns) if name.startswith("caption_")]
    id_column = next((name for name in ("file_id", "youtube_id", "file_name", "id") if name in columns), None)
    if id_column is None or not (wide or "caption" in columns):
        raise DataError(
            f"'{path}' needs an id column (file_id, youtube_id, file_name or id) and 'caption' or "
            f"'caption_1'..; it has {sorted(columns)}"
        )
    clips: dict[str, Clip] = {}
    for number, row in rows:
        where = f"'{path}' line {number}"
        raw_id = (row.get(id_column) or "").strip()
        if not raw_id:
            raise DataError(f"{where}: empty {id_column}")
        clip_id = Path(raw_id).stem if id_column == "file_name" else raw_id
        captions = (
            [_check_caption(row[name], f"{where} {name}") for name in wide]
            if wide
            else [_check_caption(row["caption"], where)]
        )
        if clip_id not in clips:
            if row.get("file_path"):
                audio = resolve_path(audio_dir, row["file_path"])
            elif id_column == "file_name":
                audio = audio_dir / raw_id
            else:
                audio = audio_dir / f"{clip_id}.wav"
            clips[clip_id] = Clip(id=clip_id, audio=audio, frames_root=Path(frames_dir) if frames_dir else None)
        clips[clip_id].captions.extend(captions)
    return list(clips.values())


def read_label_names(path: str | Path) -> dict[str, str]:
    """AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``): label id -> its name."""
    return {row["mid"]: row["display_name"] for _, row in _csv_rows(Path(path), ("mid", "display_name"))}


def _csv_rows(path: Path, required: Sequence[str] = ()):
    if not path.is_file():
        raise DataError(f"list file '{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:  # a spreadsheet's byte-order mark is fine
            reader = csv.DictReader(stream)
            missing = [name for name in required if name not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"'{path}' lacks columns {missing}; it has {reader.fieldnames}")
            rows = []
            for number, row in enumerate(reader, start=2):
                if None in row:  # DictReader files surplus fields under the key None
                    raise DataError(f"'{path}' line {number} has more fields than the header")
                rows.append((number, row))
            return rows
    except UnicodeDecodeError as error:
        raise DataError(f"'{path}' is not UTF-8 text: {error}") from None
    except csv.Error as error:
        raise DataError(f"'{path}' is not a valid CSV: {error}") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"list file '{path}' does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"'{path}' is not valid JSON: {error}") from None
    except RecursionError:
        raise DataError(f"'{path}' is not a list file: its JSON nests too deeply") from None


# -- loading one clip -------------------------------------------------------------------------------------
def load_frame(clip: Clip, frame_index: int = DEFAULT_FRAME_INDEX) -> Image.Image:
    if clip.shard is not None and clip.media is None:
        clip = read_shard_clip(clip)
    if clip.media is not None:
        path, data = clip.where, clip.media.get(f"frame_{frame_index}.jpg")
        if data is None:
            raise ClipError(clip.id, path, f"the sample holds no frame {frame_index}")
        source = io.BytesIO(data)
    else:
        path = source = clip.frame_path(frame_index)
        if path is None:
            raise ClipError(clip.id, "<none>", "this clip has no frames (audio-only list)")
        if not path.is_file():
            raise ClipError(clip.id, path, "no such frame")
    try:
        with Image.open(source) as image:  # reads the header only: the declared size is checked before decoding
            problem = frame_problem(*image.size)
            if problem is None and image.width * image.height > MAX_IMAGE_PIXELS:
                problem = f"it declares {image.width}x{image.height} pixels, over {MAX_IMAGE_PIXELS} in all"
            if problem:
                raise ClipError(clip.id, path, problem)
            image.load()
            return image.convert("RGB")
    except MemoryError:
        raise ClipError(clip.id, path, "out of memory while decoding it") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:  # DecompressionBombError is a ValueError
        raise ClipError(clip.id, path, f"unreadable image ({error})") from None


def load_clip_audio(clip: Clip) -> torch.Tensor:
    if clip.shard is not None and clip.media is None:
        clip = read_shard_clip(clip)
    if clip.media is not None:
        data = clip.media.get(AUDIO_EXTENSION)
        if data is None:
            raise ClipError(clip.id, clip.where, f"the sample holds no {AUDIO_EXTENSION} audio")
        try:
            return load_audio(clip.where, data=data)
        except AudioLoadError as error:
            raise ClipError(clip.id, clip.where, error.reason) from None
    if clip.audio is None:
        raise ClipError(clip.id, "<none>", "this clip has no audio")
    try:
        return load_audio(clip.audio)
    except AudioLoadError as error:
        raise ClipError(clip.id, clip.audio, error.reason) from None


_LOCATOR = None  # this process's SampleLocator (a loader worker forked from the stage starts with its copy)


def read_shard_clip(clip: Clip) -> Clip:
    """A clip that names its shard and key (a set's sample taken in any order, a pseudo-caption read from a set),
    with its members read where its sample starts. Raises ClipError."""
    from dali.shards import SampleLocator, SampleProblem

    global _LOCATOR
    _LOCATOR = _LOCATOR or SampleLocator()
    sample = _LOCATOR.read(clip.shard, clip.key)
    if isinstance(sample, SampleProblem):
        raise ClipError(clip.id, clip.where, sample.reason)
    return dataclasses.replace(sample, captions=clip.captions)


def clip_features(clip: Clip, target_frames: int, front_end=None) -> torch.Tensor:
    """The encoder's input for one clip: CAV-MAE's fbank, or what another encoder's front end makes of its wave."""
    if front_end is not None:
        return front_end(load_clip_audio(clip))
    return audio_to_features(load_clip_audio(clip), target_frames)


def clip_wave(clip: Clip, target_frames: int) -> tuple[torch.Tensor, int]:
    """The clip's waveform cut or zero-padded to the samples of ``target_frames`` fbank frames, and how many of
    those frames its own samples give: what :func:`batch_features` needs to compute the fbank on the GPU."""
    wave = load_clip_audio(clip)
    samples = samples_for_frames(target_frames)
    frames = min(num_frames(wave.shape[-1]), target_frames)
    return fit_wave(wave, samples), frames


def loader_audio(device: torch.device, encoder: AudioEncoder | None = None) -> str:
    """What a captioning loader yields for audio: waves for a GPU to turn into CAV-MAE's fbanks (the workers then
    only decode files), fbanks on a CPU or for another encoder's front end (computed in the workers, in parallel)."""
    front_end = encoder.front_end if encoder is not None else None
    return "wave" if device.type == "cuda" and front_end is None else "features"


def batch_features(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """The batch's encoder input [B, frames, 128] on ``device``: the loader's features, or the fbank of its waves
    computed there (frames past a short clip's end zeroed before normalising, as :func:`pad_or_crop` pads)."""
    if "features" in batch:
        return batch["features"].to(device, non_blocking=True)
    if "wave" not in batch:
        return None
    fbank = kaldi_fbank(batch["wave"].to(device, non_blocking=True))  # [B, frames, 128]
    real = torch.arange(fbank.shape[-2], device=device) < batch["frames"].to(device)[:, None]
    return normalize_fbank(fbank * real[..., None])


def augment_features(features: torch.Tensor, generator: random.Random) -> torch.Tensor:
    """The original's training noise: + U[0,1) * r / 10 per bin (r ~ U[0,1) per clip), then a circular time roll."""
    scale = generator.random() / 10
    noise = torch.from_numpy(np.random.default_rng(generator.getrandbits(32)).random(features.shape, dtype=np.float32))
    features = features + noise * scale
    frames = features.shape[0]
    return torch.roll(features, generator.randint(-frames, frames), dims=0)


@dataclass
class BadClip:
    """What a dataset yields for a clip it could not load (with on_error='skip')."""

    id: str
    path: str
    reason: str
    index: int = -1  # its index in the dataset
    shard: str | None = None  # where a shard's sample was read: the shard and the sample's key
    key: str | None = None

    def as_record(self) -> dict[str, str | None]:
        where = {"shard": self.shard, "key": self.key} if self.shard is not None else {}
        return {"id": self.id, "path": self.path, "reason": self.reason, **where}


class ClipDataset(torch.utils.data.Dataset):
    """Features of clips for the stages: audio features and/or frame pixels, or a :class:`BadClip` marker.

    Args:
        clips: the list.
        need_audio / need_image: what to load.
        image_transform: PIL image -> tensor (the captioner's preprocessing).
        frame_index: which of the 10 frames.
        augment: the original's noise + time roll (alignment training only).
        audio_as: 'features' (computed in the loader) or 'wave' (the waveform, for :func:`batch_features` to turn
            into the fbank on the GPU: loader workers then only decode files).
        front_end: another encoder's feature extractor (``audio_encoders.FrontEnd``), in place of CAV-MAE's fbank
            (the item's ``features`` are then its output); the augmentation applies only to [frames, bins] features.
        on_error: 'skip' yields a BadClip for the collate to drop and the stage to list; 'stop' raises.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        need_audio: bool,
        need_image: bool,
        image_transform=None,
        frame_index: int = DEFAULT_FRAME_INDEX,
        target_frames: int = TARGET_FRAMES,
        augment: bool = False,
        on_error: str = "skip",
        seed: int = 0,
        audio_as: str = "features",
        front_end=None,
    ):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got '{on_error}'")
        self.clips = clips  # not copied: a ClipList stays packed
        self.need_audio, self.need_image = need_audio, need_image
        self.image_transform = image_transform
        self.frame_index, self.target_frames = frame_index, target_frames
        self.on_error, self.seed = on_error, seed
        self.audio_as, self.front_end = audio_as, front_end
        self.augment = augment and getattr(front_end, "time_major", True)
        self.epoch = 0
        self.feature_cache: dict[int, torch.Tensor] | None = None
        # Precomputed image tokens [len(clips), M, D] (alignment's vision-token cache): items carry their row,
        # so the gather and the pinning happen in the loader workers, not in the training process.
        self.image_tokens: torch.Tensor | None = None

    def preload_audio(self) -> list[dict[str, str]]:
        """Compute every clip's un-augmented features once and keep it (float16) in memory; returns the bad clips.

        Loader workers started afterwards share the cache copy-on-write.
        """
        from dali.progress import progress

        cache, bad = {}, []
        for index, clip in enumerate(progress(self.clips, desc="caching audio features", leave=False)):
            try:
                cache[index] = clip_features(clip, self.target_frames, self.front_end).half()
            except ClipError as error:
                if self.on_error == "stop":
                    raise
                bad.append(BadClip(error.clip_id, error.path, error.reason, index).as_record())
        self.feature_cache = cache
        return bad

    def usable(self, index: int) -> bool:
        """False for a clip that already failed while preloading."""
        return self.feature_cache is None or index in self.feature_cache

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any] | BadClip:
        return self.item(self.clips[index], index)

    def item(self, clip: Clip, index: int) -> dict[str, Any] | BadClip:
        """What the loader yields for ``clip`` (of this list or read from a shard) at ``index``."""
        try:
            if clip.shard is not None and clip.media is None:
                clip = read_shard_clip(clip)
            item: dict[str, Any] = {"index": index, "id": clip.id}
            if clip.shard is not None:
                item |= {"shard": clip.shard, "key": clip.key, "labels": clip.labels}
            if self.need_audio and self.audio_as == "wave":
                item["wave"], item["frames"] = clip_wave(clip, self.target_frames)
            elif self.need_audio:
                cached = self.feature_cache.get(index) if self.feature_cache is not None else None
                if cached is not None:
                    features = cached.float()
                else:
                    features = clip_features(clip, self.target_frames, self.front_end)
                if self.augment:
                    features = augment_features(features, random.Random(hash((self.seed, self.epoch, index))))
                item["features"] = features
            if self.image_tokens is not None:
                item["image_tokens"] = self.image_tokens[index]
            if self.need_image:
                image = load_frame(clip, self.frame_index)
                item["pixels"] = self.image_transform([image])[0] if self.image_transform else image
            return item
        except ClipError as error:
            if self.on_error == "stop":
                raise
            return BadClip(error.clip_id, error.path, error.reason, index, clip.shard, clip.key)
        except MemoryError:  # whatever a clip costs, it is that clip's report line, never the stage's end
            if self.on_error == "stop":
                raise ClipError(clip.id, clip.where, "out of memory while loading it") from None
            return BadClip(clip.id, clip.where, "out of memory while loading it", index, clip.shard, clip.key)


def collate(items: list[dict[str, Any] | BadClip]) -> dict[str, Any]:
    """Stack good items; bad ones travel in ``bad`` for the stage to report."""
    good = [item for item in items if not isinstance(item, BadClip)]
    batch: dict[str, Any] = {"bad": [item for item in items if isinstance(item, BadClip)]}
    batch["index"] = torch.tensor([item["index"] for item in good], dtype=torch.long)
    batch["id"] = [item["id"] for item in good]
    if good and "key" in good[0]:  # a shard's samples: where each was read, and their labels
        for name in ("shard", "key", "labels"):
            batch[name] = [item[name] for item in good]
    for key in ("features", "wave", "pixels", "image_tokens"):
        if good and key in good[0]:
            batch[key] = torch.stack([item[key] for item in good])
    if good and "frames" in good[0]:
        batch["frames"] = torch.tensor([item["frames"] for item in good], dtype=torch.long)
    return batch
