"""``dali caption --run RUN FILE...``: captions for any audio or video file, window by window.

Each file is decoded (its first ``--max-seconds``), cut into 10.24 s windows (CAV-MAE's 1024 frames) with
their timestamps and captioned before the next is read; the last partial window is kept when it is at least
``--min-window`` long. A file that fails, out of memory included, is its own line in the report.
``--modality audio_vis`` pairs each window with the video frame at its middle. A command over
:class:`dali.audio_captioner.AudioCaptioner`.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import torch

from dali import caption_formats
from dali.audio_captioner import AudioCaptioner, Window
from dali.command_configs import CaptionConfig, FinishedRun
from dali.files import atomic_write_json, atomic_write_text, read_json_object
from dali.flags import ConfigError, parse_config
from dali.jsonl import atomic_write_jsonl
from dali.logs import log, setup_logging
from dali.media import MEDIA_EXTENSIONS, MediaError
from dali.progress import progress
from dali.runs import stage_main


@stage_main
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(CaptionConfig, argv)
    inputs = list_inputs(config)
    out = Path(config.output_dir) if config.output_dir else None
    formats = caption_formats.chosen(config.output_format)
    todo, failures = outputs_to_write(inputs, out, formats, config.overwrite)
    captioner = load_captioner(config)
    results = []
    bar = progress(total=len(todo), desc="captioning", unit="file")
    source = caption_report([], [], captioner, config.run or config.model)  # what made the captions, once

    def finished(index: int, records: list[dict]) -> None:
        results.extend(records)
        if out is not None:
            write_outputs(out, todo[index][1], formats, records, source)
        bar.update(1)

    def failed(index: int, error: BaseException) -> None:
        path = todo[index][0]
        reason = error.reason if isinstance(error, MediaError) else "out of memory while captioning it"
        failures.append({"file": str(path), "error": reason})
        log.error("%s: %s", path, reason)
        bar.update(1)

    caption_files(captioner, [path for path, _ in todo], config, finished, failed)
    bar.close()
    if out is not None:  # this walk's failures and refusals (a rerun tries the failed ones again)
        atomic_write_jsonl(out / REPORT, failures)
    if config.json:
        atomic_write_json(config.json, caption_report(results, failures, captioner, config.run or config.model))
    return 1 if failures and not results else 0


REPORT = "caption_report.jsonl"  # in --output-dir: a line per file the last walk could not caption


FAILURES = (MediaError, MemoryError, torch.OutOfMemoryError)  # a file's own line in the report, not the end


def caption_files(captioner: AudioCaptioner, paths: list[Path], config: CaptionConfig, finished, failed) -> None:
    """Each file's windows, captioned ``--batch-size`` at a time across files (one file's short last window beside
    the next file's first ones), printed as they come; ``finished(index, records)`` once a file's windows are all
    captioned, ``failed(index, error)`` for a file that does not decode or a batch that runs out of memory (each of
    its files). Only a batch's windows and the decoded file are held."""
    queue: list[tuple[int, Window]] = []
    pending: dict[int, list] = {}  # file -> its records so far, while some of its windows wait

    def caption(batch: list[tuple[int, Window]]) -> None:
        files = list(dict.fromkeys(index for index, _ in batch))
        try:
            captions = [text for _, text in captioner.iter_captions([w for _, w in batch], len(batch))]
        except (MemoryError, torch.OutOfMemoryError) as error:
            for index in files:
                if pending.pop(index, None) is not None:
                    failed(index, error)
            return
        for (index, window), text in zip(batch, captions):
            if index in pending:
                pending[index].append(captioner.record(window, text))
                print(f"{window.file} [{window.start:7.2f}s - {window.end:7.2f}s] {text}")
        for index in files:  # a file is done when none of its windows waits any longer
            if index in pending and all(i != index for i, _ in queue):
                finished(index, pending.pop(index))

    for index, path in enumerate(paths):
        try:
            windows = captioner.windows(path, config.first_window_only, config.min_window, config.max_seconds)
        except FAILURES as error:
            failed(index, error)
            continue
        pending[index] = []
        queue += [(index, window) for window in windows]
        if not windows:
            finished(index, pending.pop(index))
        while len(queue) >= config.batch_size:
            batch, queue = queue[: config.batch_size], queue[config.batch_size :]
            caption(batch)
    if queue:
        batch, queue = queue, []
        caption(batch)


def list_inputs(config: CaptionConfig) -> list[tuple[Path, Path]]:
    """(file, its output name without suffix): a FILE as given, a folder's media files (``--recursive``: its
    subfolders' too; ``--glob``: the names that match) under their path in it. Two inputs may not share an output."""
    found = []
    for given in map(Path, config.files):
        if not given.is_dir():
            found.append((given, Path(given.name).with_suffix("")))
            continue
        walk = given.rglob("*") if config.recursive else given.glob("*")
        pattern = config.glob or "*"
        media = sorted(p for p in walk if p.suffix.lower() in MEDIA_EXTENSIONS and fnmatch(p.name, pattern))
        media = [p for p in media if p.is_file()]
        found += [(path, path.relative_to(given).with_suffix("")) for path in media]
    names: dict[Path, Path] = {}
    for path, name in found:
        if names.setdefault(name, path) != path and config.output_dir:
            raise ConfigError(f"--output-dir: '{names[name]}' and '{path}' would both write '{name}.*'")
    return found


def outputs_to_write(
    inputs: list[tuple[Path, Path]], out: Path | None, formats: tuple[str, ...], overwrite: bool
) -> tuple[list[tuple[Path, Path]], list[dict]]:
    """The files to caption, and those refused: without --overwrite, a file whose outputs all exist is skipped
    (done by an earlier walk); one with only some of them is redone when the JSON among them is ours (written
    first, it marks a set a killed walk left half-written), else refused, its line in the report (a file of that
    name may be the user's: dali caption never writes over what it did not make)."""
    if out is None or overwrite:
        return inputs, []
    todo, refused, skipped = [], [], 0
    for path, name in inputs:
        existing = [fmt for fmt in formats if (out / f"{name}.{fmt}").exists()]
        if len(existing) == len(formats):
            skipped += 1
        elif existing and ours(out / f"{name}.json"):  # a walk killed while writing its set: redone
            todo.append((path, name))
        elif existing:
            shown = ", ".join(f"{name}.{fmt}" for fmt in existing)
            refused.append({"file": str(path), "error": f"{shown} already in --output-dir; --overwrite replaces it"})
        else:
            todo.append((path, name))
    if skipped:
        log.info("%d of %d files already have their outputs in %s: skipped (--overwrite)", skipped, len(inputs), out)
    for record in refused:
        log.error("%s: %s", record["file"], record["error"])
    return todo, refused


def ours(path: Path) -> bool:
    """Whether ``path`` is a JSON of captions that dali caption wrote (bounded: a caption file is a few MB)."""
    try:
        if path.is_symlink() or path.stat().st_size > 64 << 20:
            return False
    except OSError:
        return False
    found = read_json_object(path)
    return found is not None and isinstance(found.get("captions"), list) and "decoding" in found


def write_outputs(out: Path, name: Path, formats: tuple[str, ...], records: list[dict], source: dict) -> None:
    """Each format's file, written atomically (a killed walk leaves whole files, and reruns skip them)."""
    made = {key: source[key] for key in ("modality", "decoding", "conv_mode", "dtype", "run", "llava") if key in source}
    for fmt in sorted(formats, key=lambda fmt: fmt != "json"):  # the JSON first: it marks the set as ours
        text = caption_formats.render(records, fmt, made)
        atomic_write_text(out / f"{name}.{fmt}", text)


def load_captioner(config: CaptionConfig) -> AudioCaptioner:
    """The command's captioner: the run's (``--run``, with its projector choice) or an exported model's."""
    settings = {"modality": config.modality, "decoding": config.decoding(), "conv_mode": config.conv_mode}
    if config.run is not None:
        settings |= {"projector": config.projector, "use_prefix": config.use_prefix}
    return open_captioner(config, **settings)


def open_captioner(config: FinishedRun, **settings) -> AudioCaptioner:
    """A finished run's captioner (``--run``) or an exported model's (``--model``), loaded as the flags say."""
    if config.model is not None:
        loading = {name: getattr(config, name) for name in ("llava", "dtype", "device", "allow_modified")}
        return AudioCaptioner.from_pretrained(config.model, **loading, **settings)
    return AudioCaptioner.from_run(config.run, **config.loading(), **settings)


def caption_report(
    results: list[dict],
    failures: list[dict],
    captioner: AudioCaptioner,
    run: str,
    modality: str | None = None,
    decoding=None,
) -> dict:
    """The captions of ``dali caption --json`` (and the web page's download), with what made them."""
    described = captioner.describe()
    return {
        "captions": results,
        "failed": failures,
        "modality": modality or captioner.modality,
        "decoding": (decoding or captioner.decoding).__dict__,
        "conv_mode": described["conv_mode"],
        "dtype": described["dtype"],
        "run": str(run),
        "llava": described["llava"],
    }
