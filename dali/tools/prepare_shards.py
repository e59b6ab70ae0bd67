"""``dali prepare --shards``: media files, or a CAV-MAE list of clips already prepared, -> WebDataset shards and
their index (``dali.shards``), resumable shard by shard.

Inputs are decoded by a pool of processes, in order; their samples stream into one tar at a time, which is renamed
into place when it holds ``--shard-mb``. Each finished shard is a durable line of ``shards.progress.jsonl`` (the
inputs it consumed, its sha256, the inputs that failed); a killed run resumes after the last such line, and the
index, written last, is made from them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

from dali.command_configs import PrepareConfig
from dali.constants import SAMPLE_RATE, TARGET_FRAMES
from dali.data import read_cavmae_json
from dali.errors import DaliError
from dali.files import atomic_write_json
from dali.jsonl import JsonlWriter, atomic_write_jsonl, iter_jsonl
from dali.logs import log
from dali.media import MediaError
from dali.progress import progress
from dali.shards import INDEX_FILE, Shard, ShardIndex, ShardSample, sample_of_clip, write_shard
from dali.tools.prepare_inputs import REPORT, check_unique_ids, decode_clip, list_inputs, save_frame
from dali.workers import ordered_map, worker_pool

PROGRESS = "shards.progress.jsonl"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def jobs_of(args: PrepareConfig, out: Path) -> list[tuple]:
    """One job per input: ('clip', Clip) for a CAV-MAE list's clips, ('media', path) for media files."""
    source = Path(args.input)
    if source.is_file() and source.suffix == ".json":
        return [("clip", clip) for clip in read_cavmae_json(source)]
    inputs = list_inputs(source, out)
    check_unique_ids(inputs)
    return [("media", str(path)) for path in inputs]


def inputs_key(jobs: list[tuple], args: PrepareConfig, seconds: float) -> str:
    """What a shard was made from: the inputs in order and every setting that shapes a sample."""
    digest = hashlib.sha256(json.dumps([seconds, list(args.shard_frames), args.shard_mb, args.shard_samples]).encode())
    for kind, item in jobs:
        digest.update(f"{kind}\0{item.id + chr(0) + str(item.audio) if kind == 'clip' else item}\n".encode())
    return digest.hexdigest()


def sample_job(job: tuple) -> tuple[dict, ShardSample | None]:
    """One input as a sample, or its failure record; whatever goes wrong with it is that input's failure."""
    kind, item, seconds, frames = job
    source = item.audio if kind == "clip" else item
    try:
        if kind == "clip":
            sample = sample_of_clip(item, frames)
            missing = [k for k in frames if k not in sample.frames and item.frames_root is not None]
            if missing:
                return _failed(item.id, source, f"no frames {missing}"), None
            return {"id": item.id, "status": "ok"}, sample
        return {"id": Path(item).stem, "status": "ok"}, _media_sample(Path(item), seconds, frames)
    except (MediaError, DaliError, OSError) as error:
        reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
        return _failed(item.id if kind == "clip" else Path(item).stem, source, reason), None


def _failed(clip_id: str, source, reason: str) -> dict:
    return {"id": clip_id, "source": str(source), "status": "failed", "reason": reason}


def _media_sample(path: Path, seconds: float, frames: tuple[int, ...]) -> ShardSample:
    from dali.audio import flac_bytes

    wave, images = decode_clip(path, seconds)
    record = {"id": path.stem, "source": str(path), "seconds": round(len(wave) / SAMPLE_RATE, 3)}
    kept = {}
    for k in frames if images else ():
        buffer = io.BytesIO()
        save_frame(images[k], buffer)
        kept[k] = buffer.getvalue()
    return ShardSample(record, flac_bytes(wave), kept)


def write_shards(args: PrepareConfig, out: Path) -> int:
    from dali.audio import samples_for_frames

    seconds = samples_for_frames(TARGET_FRAMES) / SAMPLE_RATE if args.max_seconds is None else args.max_seconds
    jobs = jobs_of(args, out)
    key = inputs_key(jobs, args, seconds)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".shard-*.tmp"):  # a shard a killed run was writing (atomic_write's temporary name)
        partial.unlink()
    done = _finished(out / PROGRESS, key)
    start = done[-1]["next_input"] if done else 0
    if done:
        log.info("resuming: %d shards done, %d of %d inputs left", len(done), len(jobs) - start, len(jobs))
    work = [(kind, item, seconds, tuple(args.shard_frames)) for kind, item in jobs[start:]]
    with worker_pool(max(args.workers, 1)) as pool, JsonlWriter(out / PROGRESS) as writer:
        results = ordered_map(pool, sample_job, work, ahead=8 * args.workers)
        bar = progress(results, total=len(jobs), initial=start, desc="sharding")
        state = {"consumed": start, "failed": []}
        stream = _samples(bar, state)
        while True:
            position = sum(line["shard"]["samples"] for line in done if line["shard"])
            shard = write_shard(out / shard_name(len(done)), stream, position, args.shard_mb << 20, args.shard_samples)
            if shard is None and not state["failed"]:
                break
            line = {"inputs": key, "shard": vars(shard) if shard else None, "next_input": state["consumed"]}
            writer.write([line | {"failed": state["failed"]}])
            done.append(line | {"failed": state["failed"]})
            state["failed"] = []
            if shard is None:
                break
    return _finish(args, out, done)


def _samples(results, state: dict) -> Iterator[ShardSample]:
    for record, sample in results:
        state["consumed"] += 1
        if sample is None:
            state["failed"].append(record)
            log.warning("failed %s: %s", record["source"], record["reason"])
        else:
            yield sample


def _finished(path: Path, key: str) -> list[dict]:
    """The shards a killed run finished for these inputs and settings (none if they changed since)."""
    lines = list(iter_jsonl(path)) if path.exists() else []
    if lines and any(line.get("inputs") != key for line in lines):
        log.info("the inputs or settings changed since '%s' was written: writing every shard again", path)
        path.unlink()
        return []
    return lines


def _finish(args: PrepareConfig, out: Path, done: list[dict]) -> int:
    shards = [Shard(**line["shard"]) for line in done if line["shard"]]
    failed = [record for line in done for record in line["failed"]]
    atomic_write_jsonl(out / REPORT, [{"shard": s.name, "samples": s.samples, "status": "ok"} for s in shards] + failed)
    if not shards:
        log.warning("no input could be prepared (see %s)", out / REPORT)
        return 1 if failed else 0
    index = ShardIndex(out / INDEX_FILE, shards, tuple(args.shard_frames), args.shard_base)
    atomic_write_json(out / INDEX_FILE, index.as_json())
    log.info("%d clips in %d shards, indexed in %s; %d failed (see %s)", index.samples, len(shards),
             out / INDEX_FILE, len(failed), out / REPORT)  # fmt: skip
    return 0
