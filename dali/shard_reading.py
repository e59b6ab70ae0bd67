"""Reading an indexed set of shards in a stage: its samples split among processes and loader workers, in batches
of fixed positions (so that work resumes batch by batch and sampled captions keep their seeds).

Each process takes one contiguous range of the set's positions, equal to within a sample whatever the shard count,
cut at shard boundaries into :class:`Piece` s: whole shards, and at most two partial ones at the range's ends (read
from their start, the samples before the range skipped unread). Its loader workers take its pieces in turn, so a
worker reads whole shards, sequentially, as WebDataset is meant to be read.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dali.clip_list import Clip
from dali.data import BadClip, ClipDataset, ClipError, collate, read_cavmae_json
from dali.flags import ConfigError
from dali.shards import SampleProblem, ShardIndex, is_shard_index, is_stream, read_samples, read_shard_index, sample_key


@dataclass(frozen=True)
class Piece:
    """Samples ``start`` to ``stop`` (excluded) of shard ``shard``, at set positions ``offset + start`` on."""

    shard: int
    start: int
    stop: int
    offset: int  # the shard's first position in the set

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """The name of the file of its results: the same piece has the same name in a resumed run."""
        return f"piece-{self.shard:06d}-{self.start:07d}-{self.stop:07d}.jsonl"

    def position(self, index: int) -> int:
        """The set position of the piece's ``index``-th sample."""
        return self.offset + self.start + index


def rank_pieces(index: ShardIndex, rank: int, world_size: int, limit: int | None = None) -> list[Piece]:
    """This rank's pieces: positions ``[rank * N / W, (rank + 1) * N / W)`` of the set's first ``N`` (``limit``)."""
    total = index.samples if limit is None else min(limit, index.samples)
    first, last = rank * total // world_size, (rank + 1) * total // world_size
    pieces = []
    for number, (shard, offset) in enumerate(zip(index.shards, index.offsets)):
        start, stop = max(first, offset), min(last, offset + shard.samples)
        if start < stop:
            pieces.append(Piece(number, start - offset, stop - offset, offset))
    return pieces


class PieceBatches(torch.utils.data.IterableDataset):
    """Collated batches of pieces' samples, each ``batch_size`` positions of one piece from where it resumes
    (``todo``: (piece, samples already done)); loader worker ``w`` of ``n`` reads pieces ``w, w + n, ...``.

    ``dataset`` builds a sample's item (:meth:`ClipDataset.item`). A sample its shard cannot give (a corrupt member,
    a truncated tar: :class:`SampleProblem`) is a :class:`BadClip` naming its shard and key, or stops the reading
    with a :class:`ClipError` under the dataset's ``on_error="stop"``. Each batch carries ``piece``, ``start`` (its
    first index in the piece) and ``end`` (whether it is the piece's last).
    """

    def __init__(self, index: ShardIndex, todo: list[tuple[Piece, int]], batch_size: int, dataset: ClipDataset):
        self.index, self.todo, self.batch_size, self.dataset = index, todo, batch_size, dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for piece, done in self.todo[worker::workers]:
            yield from self._batches(piece, done)

    def _batches(self, piece: Piece, done: int) -> Iterator[dict[str, Any]]:
        items, start = [], done
        for index, item in self._items(piece, done):
            items.append(item)
            if len(items) == self.batch_size or index == piece.size - 1:
                batch = collate(items)
                yield batch | {"piece": piece, "start": start, "end": index == piece.size - 1}
                items, start = [], index + 1

    def _items(self, piece: Piece, done: int) -> Iterator[tuple[int, Any]]:
        """(index in the piece, item) for each sample from ``done`` on; every index gets one."""
        url = self.index.url(piece.shard)
        samples = read_samples(url)
        index, ended = done, None
        for number, sample in enumerate(samples):
            if isinstance(sample, SampleProblem) and sample.key is None:
                ended = sample.reason  # the shard ends here: the rest are missing
                break
            if number >= piece.stop:
                break
            if number < piece.start + done:
                continue  # before the range, or done before a kill: skipped unread
            index = number - piece.start
            if isinstance(sample, SampleProblem):
                yield index, self._bad(url, sample.key, sample.reason, index)
            else:
                yield index, self.dataset.item(sample, index)
            index += 1
        else:
            ended = "the shard holds fewer samples than its index says"
        samples.close()
        for missing in range(index, piece.size):
            yield missing, self._bad(url, None, ended or "", missing)

    def _bad(self, url: str, key: str | None, reason: str, index: int) -> BadClip:
        where = f"{url}#{key}" if key is not None else url
        if self.dataset.on_error == "stop":
            raise ClipError(key or "", where, reason)
        return BadClip(id=key or "", path=where, reason=reason, index=index, shard=url, key=key)


class ShardedClips(Sequence[Clip]):
    """A set in shards as a list of clips, for the stages that take clips in any order (the training stages): clip
    ``i`` names the shard and key of position ``i``, and its members are read when a loader asks for it, where its
    sample starts (:func:`dali.data.read_shard_clip`). Slices are views, as a :class:`ClipList`'s."""

    def __init__(self, index: ShardIndex, positions: Sequence[int] | None = None):
        self.index = index
        self._positions = range(index.samples) if positions is None else positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return ShardedClips(self.index, self._positions[item])
        position = self._positions[item]
        shard = bisect.bisect_right(self.index.offsets, position) - 1
        key = sample_key(position)
        return Clip(id=key, shard=self.index.url(shard), key=key)


def read_clip_source(path: str | Path, root: str | Path | None, frame_index: int | None) -> Sequence[Clip]:
    """The clips a training stage's list flag names: a CAV-MAE list, or a set in shards (its frame checked)."""
    index = read_stage_shards(str(path), frame_index)
    if index is None:
        return read_cavmae_json(path, root)
    streamed = [index.url(k) for k in range(len(index.shards)) if is_stream(index.url(k))]
    if streamed:
        raise ConfigError(
            f"'{path}': the training stages read samples in any order, from shards that are files; "
            f"'{streamed[0]}' is a stream (copy the shards to a filesystem, or index them there)"
        )
    return ShardedClips(index)


def read_stage_shards(path: str, frame_index: int | None, shuffle: bool = False) -> ShardIndex | None:
    """The shard index a stage's clip list flag names (None for a clip list), checked against the stage's flags:
    a frame the samples hold, and no --shuffle (a set in shards is read in its order, shard by shard)."""
    if not is_shard_index(path):
        return None
    index = read_shard_index(path)
    if shuffle:
        raise ConfigError(f"--shuffle reorders a clip list; '{path}' is a set in shards, read in its order")
    if frame_index is not None and frame_index not in index.frames:
        raise ConfigError(f"--frame-index {frame_index}: the samples of '{path}' hold frames {list(index.frames)}")
    return index
