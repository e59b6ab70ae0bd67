"""``dali prepare INPUT OUTPUT_DIR``: media files -> 16 kHz mono wav + 10 frames per clip + a CAV-MAE JSON
(what it does and its flags: ``command_configs.PrepareConfig``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import soundfile

from dali.audio import samples_for_frames
from dali.command_configs import PrepareConfig
from dali.constants import NUM_FRAMES, SAMPLE_RATE, TARGET_FRAMES
from dali.data import Clip, write_cavmae_json
from dali.files import atomic_write, atomic_write_json, read_json_object
from dali.flags import parse_config
from dali.jsonl import atomic_write_jsonl
from dali.logs import log, setup_logging
from dali.media import VIDEO_EXTENSIONS, MediaError
from dali.progress import progress
from dali.tools.prepare_inputs import REPORT, WINDOW_S, check_unique_ids, decode_clip, list_inputs, save_frame
from dali.workers import ordered_map, worker_pool

LIST = "clips.json"
RECORDS = "made_from"  # <id>.json per clip: its source (path, size, mtime, hash) and settings, written last


def outputs_of(out: Path, clip_id: str, video: bool) -> list[Path]:
    files = [out / "audio" / f"{clip_id}.wav"]
    if video:
        files += [out / "frames" / f"frame_{k}" / f"{clip_id}.jpg" for k in range(NUM_FRAMES)]
    return files


def prepare_one(path: Path, out: Path, max_seconds: float) -> dict:
    """Write one clip's wav (and frames for a video) and, last, the record of what they were made from; returns its
    report record. Outputs are reused only when their record matches the source and the settings now.

    Only the first ``max_seconds`` are decoded and written: the clip is cut there, and the report says so."""
    clip_id = path.stem
    video = path.suffix.lower() in VIDEO_EXTENSIONS
    record = {"id": clip_id, "source": str(path), "video": video}
    made_from = {"source": source_identity(path), "settings": settings_of(max_seconds)}
    outputs = outputs_of(out, clip_id, video)
    stale = all(p.exists() for p in outputs) and why_stale(out / RECORDS / f"{clip_id}.json", made_from)
    if stale is None:
        return record | {"status": "ok", "reused": True}
    try:
        wave, frames = decode_clip(path, max_seconds)
        atomic_write(
            out / "audio" / f"{clip_id}.wav",
            lambda tmp: soundfile.write(str(tmp), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV"),
        )
        for k, frame in enumerate(frames):
            atomic_write(out / "frames" / f"frame_{k}" / f"{clip_id}.jpg", lambda tmp, f=frame: save_frame(f, tmp))
    except MediaError as error:
        return record | {"status": "failed", "reason": error.reason}
    atomic_write_json(out / RECORDS / f"{clip_id}.json", made_from)
    cut = {"cut_at_s": max_seconds} if len(wave) >= round(max_seconds * SAMPLE_RATE) else {}
    redone = {"redone": stale} if stale else {}
    return record | {"status": "ok", "seconds": round(len(wave) / SAMPLE_RATE, 3), **cut, **redone}


def source_identity(path: Path) -> dict:
    """A source file by content, cheaply: where it is, its size and mtime, and a hash of its first and last MiB
    (with the size, enough to tell another file or a re-encoded one; a full hash would read every video twice)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        digest.update(stream.read(1 << 20))
        if stat.st_size > 2 << 20:
            stream.seek(-(1 << 20), os.SEEK_END)
            digest.update(stream.read())
    return {
        "path": os.path.abspath(path),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "head_tail_sha256": digest.hexdigest(),
    }


def settings_of(max_seconds: float) -> dict:
    """Every setting that shapes a clip's outputs."""
    return {"max_seconds": max_seconds, "sample_rate": SAMPLE_RATE, "frames": NUM_FRAMES, "frames_over_s": WINDOW_S}


def why_stale(record_path: Path, made_from: dict) -> str | None:
    """Why existing outputs cannot be reused for ``made_from``, or None when their record matches it."""
    recorded = read_json_object(record_path)
    if recorded is None:
        return "no record of what its outputs were made from"
    if recorded.get("settings") != made_from["settings"]:
        return "made with other settings (--max-seconds)"
    source = recorded.get("source") or {}
    if source.get("path") != made_from["source"]["path"]:
        return f"made from another file, '{source.get('path')}'"
    if source != made_from["source"]:
        return "its source file changed since"
    return None


def _job(args: tuple[str, str, float]) -> dict:
    """One file; whatever goes wrong with it (a name the file system or a library refuses, a full disk) is that
    file's failure, not the run's."""
    path, out, max_seconds = Path(args[0]), Path(args[1]), args[2]
    try:
        return prepare_one(path, out, max_seconds)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        return {"id": path.stem, "source": str(path), "video": False, "status": "failed", "reason": reason}


def main(argv: list[str] | None = None) -> int:
    args = parse_config(PrepareConfig, argv)
    setup_logging()
    out = Path(args.output)
    if args.shards:
        from dali.tools.prepare_shards import write_shards

        return write_shards(args, out)
    inputs = list_inputs(Path(args.input), out)
    check_unique_ids(inputs)
    for k in range(NUM_FRAMES):
        (out / "frames" / f"frame_{k}").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    seconds = samples_for_frames(TARGET_FRAMES) / SAMPLE_RATE if args.max_seconds is None else args.max_seconds
    jobs = [(str(p), str(out), seconds) for p in inputs]
    if args.workers > 1 and len(jobs) > 1:
        with worker_pool(args.workers) as pool:
            records = list(
                progress(ordered_map(pool, _job, jobs, ahead=8 * args.workers), total=len(jobs), desc="preparing")
            )
    else:
        records = [_job(job) for job in progress(jobs, desc="preparing")]
    atomic_write_jsonl(out / REPORT, records)
    good = [r for r in records if r["status"] == "ok"]
    clips = [
        Clip(id=r["id"], audio=out / "audio" / f"{r['id']}.wav", frames_root=(out / "frames") if r["video"] else None)
        for r in good
    ]
    write_cavmae_json(clips, out / LIST, root=out)
    for record in records:
        if record.get("redone"):
            log.info("redone %s: %s", record["source"], record["redone"])
    failed = [r for r in records if r["status"] != "ok"]
    for record in failed:
        log.warning("failed %s: %s", record["source"], record["reason"])
    log.info("%d clips prepared in %s, %d failed (see %s)", len(good), out, len(failed), out / REPORT)
    return 0 if good or not records else 1
