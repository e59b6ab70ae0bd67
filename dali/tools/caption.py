"""``dali caption --run RUN FILE...``: captions for any audio or video file, window by window.

Each file is decoded (its first ``--max-seconds``), cut into 10.24 s windows (CAV-MAE's 1024 frames) with
their timestamps and captioned before the next is read; the last partial window is kept when it is at least
``--min-window`` long. A file that fails, out of memory included, is its own line in the report.
``--modality audio_vis`` pairs each window with the video frame at its middle. A command over
:class:`dali.audio_captioner.AudioCaptioner`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dali.audio_captioner import AudioCaptioner
from dali.command_configs import CaptionConfig
from dali.files import atomic_write_json
from dali.flags import parse_config
from dali.logs import log, setup_logging
from dali.media import MediaError
from dali.progress import progress
from dali.runs import stage_main


@stage_main
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(CaptionConfig, argv)
    captioner = load_captioner(config)
    results, failures = [], []
    bar = progress(total=len(config.files), desc="captioning", unit="file")
    for name in config.files:  # one file at a time: decoded, cut and captioned before the next is read
        try:
            windows = captioner.windows(Path(name), config.first_window_only, config.min_window, config.max_seconds)
            for window, caption in captioner.iter_captions(windows, config.batch_size):
                start, end = window.span
                results.append({"file": window.file, "start": start, "end": end, "caption": caption})
                print(f"{window.file} [{window.start:7.2f}s - {window.end:7.2f}s] {caption}")
        except (MediaError, MemoryError, torch.OutOfMemoryError) as error:  # that file's line, not the command's end
            reason = error.reason if isinstance(error, MediaError) else "out of memory while captioning it"
            failures.append({"file": name, "error": reason})
            log.error("%s: %s", name, reason)
        bar.update(1)
    bar.close()
    if config.json:
        atomic_write_json(config.json, caption_report(results, failures, captioner, config.run or config.model))
    return 1 if failures and not results else 0


def load_captioner(config: CaptionConfig) -> AudioCaptioner:
    """The run's captioner (``--run``), or an exported model's (``--model``), with the command's settings."""
    settings = {"modality": config.modality, "decoding": config.decoding(), "conv_mode": config.conv_mode}
    if config.model is not None:
        loading = {name: getattr(config, name) for name in ("llava", "dtype", "device", "allow_modified")}
        return AudioCaptioner.from_pretrained(config.model, **loading, **settings)
    chosen = {"projector": config.projector, "use_prefix": config.use_prefix}
    return AudioCaptioner.from_run(config.run, **config.loading(), **chosen, **settings)


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
