"""The captioning loop shared by pseudo-labelling (2a) and inference: resumable, sharded, merged in order."""

from __future__ import annotations

import dataclasses
import heapq
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from dali import distributed
from dali.clip_list import clip_ids
from dali.data import Clip, ClipDataset, collate
from dali.jsonl import JsonlWriter, MetricsLog, atomic_write_jsonl, iter_jsonl, repair_jsonl
from dali.logs import log
from dali.models.captioner import Captioner
from dali.models.decoding import DecodingOptions
from dali.progress import progress
from dali.runs import METRICS, StageStateError
from dali.shard_reading import Piece, PieceBatches, rank_pieces
from dali.shards import ShardIndex


def part_file(out: Path, rank: int) -> Path:
    return out / f"part-{rank:03d}.jsonl"


@dataclasses.dataclass
class CaptionJob:
    """What the captioning stages caption with, and where: the captioner, the block a batch becomes, decoding, the
    stage folder, this process, batches and loader workers, and what each record adds about its clip."""

    captioner: Captioner
    make_block: Callable[[dict], torch.Tensor]
    options: DecodingOptions
    out: Path
    context: distributed.Context
    batch_size: int
    num_workers: int
    extra: Callable[[Clip], dict] = lambda clip: {}

    def records(self, batch: dict, position: Callable[[int], int], first: int, clip_at) -> list[dict]:
        """A batch's records, in input order, each with its position in the whole list or set (for the merge);
        the batch's seed is its first position's (``first``), so a resumed run samples as an uninterrupted one."""
        records = [item.as_record() | {"skipped": True, "position": position(item.index)} for item in batch["bad"]]
        for item in batch["bad"]:
            log.warning("skipped clip %s: %s (%s)", item.id, item.reason, item.path)
        if len(batch["index"]):
            with torch.no_grad():
                block = self.make_block(batch)
            seeded = dataclasses.replace(self.options, seed=self.options.seed + position(first))
            for row, (index, caption) in enumerate(
                zip(batch["index"].tolist(), self.captioner.generate(block, seeded))
            ):
                clip = clip_at(index, row)
                records.append({"id": clip.id, "caption": caption, **self.extra(clip), "position": position(index)})
        return sorted(records, key=lambda record: record["position"])


def caption_clips(
    job: CaptionJob, clips: Sequence[Clip], dataset_for: Callable[[Sequence[Clip]], ClipDataset]
) -> Iterator[dict]:
    """Caption this rank's share of ``clips``, appending to its part file; on rank 0, then merge every rank's part.

    Work goes in fixed chunks of ``batch_size`` clips of the rank's share; a chunk's captions and skips are
    written in one durable append. After a kill, only complete chunks are kept and the rest is redone in the
    same chunks with the same per-chunk seed, so even sampled captions equal an uninterrupted run's.

    Returns:
        on rank 0, the records of every clip in the order of ``clips``, read from the parts as they are
        consumed: captions, and the clips that could not be used (``"skipped": True``); nothing on other ranks.
    """
    # Rank 0 has opened the stage folder (an --overwrite moves the old run aside on its first write): no rank
    # may read or write a part before that, or its part would be moved aside with the old run.
    distributed.barrier()
    out, context, batch_size = job.out, job.context, job.batch_size
    mine = distributed.shard(clips, context)  # interleaved: mine[i] is clips[rank + i * world_size]

    def position(index: int) -> int:
        return context.rank + index * context.world_size

    chunks = [range(start, min(start + batch_size, len(mine))) for start in range(0, len(mine), batch_size)]
    part = part_file(out, context.rank)
    done = _complete_chunks(part, clip_ids(mine), chunks)
    todo = [chunk for chunk in chunks if chunk.start not in done]
    if done:
        log.info("rank %d: resuming, %d of %d batches already done", context.rank, len(done), len(chunks))
    loader = _loader(dataset_for(mine), todo, job.num_workers, context.device)
    metrics = MetricsLog(out / METRICS, enabled=context.is_main)
    with JsonlWriter(part) as writer:
        bar = progress(total=len(chunks), initial=len(done), unit="batch", desc=f"captioning (rank {context.rank})")
        batches, waited = iter(loader), time.perf_counter()
        for number, chunk in enumerate(todo, start=len(done) + 1):
            batch = next(batches)  # the time waited here is the loader's share
            started = time.perf_counter()
            records = job.records(batch, position, chunk.start, lambda index, row: mine[index])
            captioned = time.perf_counter()
            writer.write(records)
            _log_batch(
                metrics, context, number, number == len(done) + 1, (waited, started, captioned), clips=len(chunk)
            )
            waited = time.perf_counter()
            bar.update(1)
        bar.close()
    distributed.barrier()
    return merged_records(out, context.world_size) if context.is_main else iter(())


def caption_shards(
    job: CaptionJob, index: ShardIndex, dataset: ClipDataset, limit: int | None = None
) -> Iterator[dict]:
    """:func:`caption_clips` for a set in shards (its first ``limit`` samples): this rank's pieces of it
    (``dali.shard_reading``), each captioned into its own file (``piece-<shard>-<start>-<stop>.jsonl``), batch by
    batch.

    A killed run resumes each piece after its last complete batch, with the same batches and seeds; a piece
    already whole is not read again. ``dataset`` builds each sample's item (:meth:`ClipDataset.item`).

    Returns:
        on rank 0, every sample's record in set order, streamed from the pieces' files; nothing on other ranks.
    """
    distributed.barrier()  # rank 0 has opened the stage folder (see caption_clips)
    out, context, batch_size, num_workers = job.out, job.context, job.batch_size, job.num_workers
    pieces = rank_pieces(index, context.rank, context.world_size, limit)
    todo = [(piece, done) for piece in pieces if (done := _piece_done(out / piece.name, piece)) < piece.size]
    batches_of = [-(-(piece.size - done) // batch_size) for piece, done in todo]
    if len(todo) < len(pieces) or any(done for _, done in todo):
        log.info(
            "rank %d: resuming, %d of %d pieces of shards whole", context.rank, len(pieces) - len(todo), len(pieces)
        )
    reader = PieceBatches(index, todo, batch_size, dataset)
    loader = torch.utils.data.DataLoader(
        reader,
        batch_size=None,
        num_workers=min(num_workers, len(todo)),
        pin_memory=context.device.type == "cuda",
        prefetch_factor=4 if num_workers and todo else None,
    )
    metrics = MetricsLog(out / METRICS, enabled=context.is_main)
    writers: dict[Piece, JsonlWriter] = {}
    bar = progress(total=sum(batches_of), unit="batch", desc=f"captioning shards (rank {context.rank})")
    waited = time.perf_counter()
    for number, batch in enumerate(loader, start=1):
        piece, started = batch["piece"], time.perf_counter()
        records = job.records(batch, piece.position, batch["start"], _sample_clip(batch))
        captioned = time.perf_counter()
        writer = writers.get(piece) or writers.setdefault(piece, JsonlWriter(out / piece.name))
        writer.write(records)
        if batch["end"]:
            writers.pop(piece).close()
        _log_batch(
            metrics, context, number, number == 1, (waited, started, captioned), clips=len(records), shard=piece.shard
        )
        waited = time.perf_counter()
        bar.update(1)
    bar.close()
    for writer in writers.values():
        writer.close()
    distributed.barrier()
    return merged_pieces(out, index, context.world_size, limit) if context.is_main else iter(())


def _sample_clip(batch: dict) -> Callable[[int, int], Clip]:
    """The batch's row as a clip naming where it was read (what a record's ``extra`` needs)."""
    return lambda index, row: Clip(
        id=batch["id"][row], shard=batch["shard"][row], key=batch["key"][row], labels=batch["labels"][row]
    )


def _piece_done(part: Path, piece: Piece) -> int:
    """How many of the piece's samples ``part`` holds, in order from its first (a killed run wrote them a batch
    at a time; a torn last line is dropped). A file that is not such a prefix is started again."""
    if not part.exists():
        return 0
    repair_jsonl(part)
    count = 0
    for count, record in enumerate(iter_jsonl(part), start=1):
        if record.get("position") != piece.position(count - 1) or count > piece.size:
            log.warning("'%s' does not hold the piece's samples in order: captioning the piece again", part)
            part.unlink()
            return 0
    return count


def merged_pieces(out: Path, index: ShardIndex, world_size: int, limit: int | None = None) -> Iterator[dict]:
    """Every rank's pieces' records in set order, streamed; a piece not whole is an error naming its file."""
    for rank in range(world_size):
        for piece in rank_pieces(index, rank, world_size, limit):
            count = 0
            for count, record in enumerate(iter_jsonl(out / piece.name), start=1):
                del record["position"]
                yield record
            if count != piece.size:
                raise StageStateError(f"'{out / piece.name}' holds {count} of its {piece.size} samples")


def _log_batch(metrics: MetricsLog, context, number: int, first: bool, times: tuple, **counts) -> None:
    """A batch's metrics line: the time waited for the loader, spent captioning and writing (``times``: when the
    wait began, captioning began and ended); a process's first batch is logged too, to see a straggler."""
    waited, started, captioned = times
    if first:
        log.info(
            "rank %d: first batch written: %.1f s waiting for the loader, %.1f s captioning (compiling)",
            *(context.rank, started - waited, captioned - started),
        )
    metrics.log(
        batch=number,
        **counts,
        loader_wait_s=round(started - waited, 4),
        caption_s=round(captioned - started, 4),
        write_s=round(time.perf_counter() - captioned, 4),
    )


def _loader(dataset: ClipDataset, chunks: list[range], workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",  # batches copied to the GPU without blocking the stage
        prefetch_factor=4 if workers else None,  # batches decoded ahead of the captioner
    )


def merged_records(out: Path, world_size: int) -> Iterator[dict]:
    """Every rank's part merged in input order, streamed (each part is in input order already)."""
    parts = [_positions_checked(part_file(out, rank)) for rank in range(world_size)]
    for record in heapq.merge(*parts, key=lambda record: record["position"]):
        del record["position"]
        yield record


def _positions_checked(part: Path) -> Iterator[dict]:
    last = -1
    for record in iter_jsonl(part):
        if not isinstance(record.get("position"), int) or record["position"] <= last:
            raise StageStateError(
                f"'{part}' is not in input order (or was written by an older dali): pass --overwrite to redo the stage"
            )
        last = record["position"]
        yield record


def write_captions(records: Iterator[dict], path: Path, skipped: list[dict]) -> int:
    """Stream the merged records' non-empty captions to ``path``; the rest go to ``skipped``. Returns the count."""
    count = 0

    def captions() -> Iterator[dict]:
        nonlocal count
        for record in records:
            if record.pop("skipped", False):
                skipped.append(record)
            elif not record["caption"].strip():
                skipped.append({"id": record["id"], "path": "", "reason": "empty caption generated"})
            else:
                count += 1
                yield record

    atomic_write_jsonl(path, captions())
    return count


def split_skipped(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(captions, skipped clips without their marker), for a list small enough to hold."""
    captions, skipped = [], []
    for record in records:
        if record.pop("skipped", False):
            skipped.append(record)
        else:
            captions.append(record)
    return captions, skipped


def remove_parts(out: Path, world_size: int) -> None:
    """The per-rank and per-piece files, once merged."""
    for rank in range(world_size):
        part_file(out, rank).unlink(missing_ok=True)
    for part in out.glob("piece-*.jsonl"):
        part.unlink()


def _complete_chunks(part: Path, ids: Sequence[str], chunks: list[range]) -> set[int]:
    """Starts of the chunks whose every clip is in ``part``; the file is rewritten without the other records.

    One pass over the file and one over the share: linear in both, holding only the ids present.
    """
    present = {record["id"] for record in iter_jsonl(part)}
    if not present:
        return set()
    complete = {chunk.start for chunk in chunks if all(ids[i] in present for i in chunk)}
    dropped = {ids[i] for chunk in chunks if chunk.start not in complete for i in chunk} & present
    if dropped or not _ends_with_newline(part):
        atomic_write_jsonl(part, (record for record in iter_jsonl(part) if record["id"] not in dropped))
    return complete


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as stream:
        stream.seek(-1, 2)
        return stream.read(1) == b"\n"
