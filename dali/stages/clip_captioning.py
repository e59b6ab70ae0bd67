"""The captioning loop shared by pseudo-labelling (2a) and inference: resumable, sharded, merged in order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from dali import distributed
from dali.data import Clip, ClipDataset, collate
from dali.jsonl import JsonlWriter, atomic_write_jsonl, read_jsonl
from dali.models.captioner import Captioner
from dali.models.decoding import DecodingOptions
from dali.progress import progress
from dali.stages.common import log


def part_file(out: Path, rank: int) -> Path:
    return out / f"part-{rank:03d}.jsonl"


def caption_clips(
    captioner: Captioner,
    clips: list[Clip],
    dataset_for: Callable[[list[Clip]], ClipDataset],
    make_block: Callable[[dict], torch.Tensor],
    options: DecodingOptions,
    out: Path,
    context: distributed.Context,
    batch_size: int,
    num_workers: int,
    extra: Callable[[Clip], dict] = lambda clip: {},
) -> tuple[list[dict], list[dict]]:
    """Caption ``clips`` (this rank's share), append to this rank's part file, and merge on rank 0.

    Work goes in fixed chunks of ``batch_size`` clips of the rank's share; a chunk's captions and skips are
    written in one durable append. After a kill, only complete chunks are kept and the rest is redone in the
    same chunks with the same per-chunk seed, so even sampled captions equal an uninterrupted run's.

    Returns:
        (captions, skipped) on rank 0, in the order of ``clips``; empty lists on other ranks.
    """
    positions = {clip.id: position for position, clip in enumerate(clips)}
    mine = distributed.shard(clips, context)
    chunks = [list(range(start, min(start + batch_size, len(mine)))) for start in range(0, len(mine), batch_size)]
    part = part_file(out, context.rank)
    kept = _complete_chunk_records(part, mine, chunks)
    done_ids = {record["id"] for record in kept}
    todo = [chunk for chunk in chunks if mine[chunk[0]].id not in done_ids]
    if kept:
        log.info("rank %d: resuming, %d of %d batches already done", context.rank, len(chunks) - len(todo), len(chunks))
    loader = torch.utils.data.DataLoader(
        dataset_for(mine), batch_sampler=todo, num_workers=num_workers, collate_fn=collate
    )
    with JsonlWriter(part) as writer:
        bar = progress(
            total=len(chunks), initial=len(chunks) - len(todo), unit="batch", desc=f"captioning (rank {context.rank})"
        )
        for chunk, batch in zip(todo, loader):
            records = [item.as_record() | {"skipped": True} for item in batch["bad"]]
            for item in batch["bad"]:
                log.warning("skipped clip %s: %s (%s)", item.id, item.reason, item.path)
            if len(batch["index"]):
                with torch.no_grad():
                    block = make_block(batch)
                seeded = dataclasses.replace(options, seed=options.seed + positions[mine[chunk[0]].id])
                captions = captioner.generate(block, seeded)
                records += [
                    {"id": mine[index].id, "caption": caption, **extra(mine[index])}
                    for index, caption in zip(batch["index"].tolist(), captions)
                ]
            writer.write(records)
            bar.update(1)
        bar.close()
    distributed.barrier()
    if not context.is_main:
        return [], []
    records = [record for rank in range(context.world_size) for record in read_jsonl(part_file(out, rank))]
    skipped = [{k: v for k, v in record.items() if k != "skipped"} for record in records if record.get("skipped")]
    captions = sorted((record for record in records if not record.get("skipped")), key=lambda r: positions[r["id"]])
    return captions, skipped


def remove_parts(out: Path, world_size: int) -> None:
    for rank in range(world_size):
        part_file(out, rank).unlink(missing_ok=True)


def _complete_chunk_records(part: Path, mine: list[Clip], chunks: list[list[int]]) -> list[dict]:
    """Records of the chunks whose every clip is in ``part``; the file is rewritten without the others."""
    records = read_jsonl(part)
    if not records:
        return []
    present = {record["id"] for record in records}
    complete = {mine[i].id for chunk in chunks if all(mine[i].id in present for i in chunk) for i in chunk}
    kept = [record for record in records if record["id"] in complete]
    if len(kept) != len(records) or part.read_bytes()[-1:] != b"\n":
        atomic_write_jsonl(part, kept)
    return kept
