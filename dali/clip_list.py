"""A clip, and clip lists held compactly, so that an AudioSet-scale list (millions of clips) costs each rank a few
hundred MB.

A ``list[Clip]`` costs about 1 KB a clip (a dataclass and three ``Path`` objects); :class:`ClipList` keeps each
clip's id and paths as UTF-8 bytes in a few flat buffers and builds a :class:`Clip` only when one is
asked for. Slices and reorderings are views over the same buffers.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dali.constants import DEFAULT_FRAME_INDEX


@dataclass
class Clip:
    """One audiovisual clip: an id, its audio file, its frame folder root, its reference captions."""

    id: str
    audio: Path | None = None
    frames_root: Path | None = None
    image: Path | None = None  # an explicit frame file (prefix pairs), overrides frames_root
    captions: list[str] = field(default_factory=list)
    labels: str | None = None  # AudioSet's label ids, as the list or the shard gives them
    # A clip read from a shard (dali.shards): its members' bytes by extension ('flac', 'frame_5.jpg'), in place of
    # files, and where it was read (the shard's URL and the sample's key)
    media: dict[str, bytes] | None = None
    shard: str | None = None
    key: str | None = None

    @property
    def where(self) -> str:
        """What names the clip's data in a message: its shard and key, or its audio file."""
        return f"{self.shard}#{self.key}" if self.shard is not None else str(self.audio or "<none>")

    def frame_path(self, frame_index: int = DEFAULT_FRAME_INDEX) -> Path | None:
        if self.image is not None:
            return self.image
        if self.frames_root is None:
            return None
        return self.frames_root / f"frame_{frame_index}" / f"{self.id}.jpg"


class PackedStrings(Sequence[str]):
    """Strings in one UTF-8 buffer with an array of end offsets: a few bytes of overhead per string, not a Python
    object each. Loader workers forked from the stage then share it untouched (reading a list of ``str`` in a
    forked worker writes every object's reference count, and so copies the list page by page).

    Written by hand: the standard library and numpy have no variable-length string column (pyarrow has one,
    but is a large dependency for these thirty lines).
    """

    def __init__(self, values: Iterable[str] = ()):
        self._data = bytearray()
        self._ends = array("q")
        for value in values:
            self.append(value)

    def append(self, value: str) -> None:
        # surrogatepass: a file name that is not UTF-8 reaches Python as lone surrogates; they round-trip.
        self._data += value.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        start = self._ends[index - 1] if index > 0 else 0
        return self._data[start : self._ends[index]].decode("utf-8", "surrogatepass")


class ClipList(Sequence["Clip"]):
    """A read-only sequence of clips (id, audio file, frame-folder root), stored packed.

    Paths are kept as written in the list and resolved against ``root`` when a clip is built. Frame roots repeat
    across clips (a CAV-MAE list names a handful of folders), so each distinct one is stored once.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._ids = PackedStrings()
        self._audio = PackedStrings()
        self._frame_roots: list[str] = []
        self._frame_root_index: dict[str, int] = {}
        self._frame_of = array("l")  # index into _frame_roots, -1 for none
        self._labels = PackedStrings()  # "" for none
        self._order: Sequence[int] = range(0)

    def append(self, clip_id: str, audio: str, frames_root: str | None, labels: str | None = None) -> None:
        self._ids.append(clip_id)
        self._audio.append(audio)
        self._labels.append(labels or "")
        if frames_root:
            index = self._frame_root_index.setdefault(frames_root, len(self._frame_roots))
            if index == len(self._frame_roots):
                self._frame_roots.append(frames_root)
            self._frame_of.append(index)
        else:
            self._frame_of.append(-1)
        self._order = range(len(self._ids))

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self._view(self._order[index])
        return self._clip(self._order[index])

    def _clip(self, stored: int) -> Clip:
        frame = self._frame_of[stored]
        return Clip(
            id=self._ids[stored],
            audio=resolve_path(self.root, self._audio[stored]),
            frames_root=resolve_path(self.root, self._frame_roots[frame]) if frame >= 0 else None,
            labels=self._labels[stored] or None,
        )

    def _view(self, order: Sequence[int]) -> "ClipList":
        view = object.__new__(ClipList)
        view.__dict__.update(self.__dict__)
        view._order = order
        return view

    @property
    def ids(self) -> Sequence[str]:
        """The clips' ids, without building the clips (a view)."""
        return _Ids(self._ids, self._order)

    def shuffled(self, seed: int) -> "ClipList":
        """The clips in the order ``random.Random(seed).shuffle`` gives a list of them (a view)."""
        order = array("q", self._order)
        random.Random(seed).shuffle(order)
        return self._view(order)


class _Ids(Sequence[str]):
    def __init__(self, ids: PackedStrings, order: Sequence[int]):
        self._ids, self._order = ids, order

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._ids[self._order[index]]


def clip_ids(clips: Sequence["Clip"]) -> Sequence[str]:
    """The ids of ``clips``; for a :class:`ClipList`, without building its clips."""
    return clips.ids if isinstance(clips, ClipList) else [clip.id for clip in clips]


def resolve_path(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path
