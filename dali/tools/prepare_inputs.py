"""What ``dali prepare`` reads: the media files of its INPUT, and one file decoded into a clip's audio and frames
(CAV-MAE's preprocessing), for loose files and shards alike."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from dali.constants import NUM_FRAMES, SAMPLE_RATE
from dali.flags import ConfigError
from dali.media import MEDIA_EXTENSIONS, VIDEO_EXTENSIONS, decode_audio, decode_frames, resize_center_crop

REPORT = "prepare_report.jsonl"  # what became of each input
WINDOW_S = 10.0  # the frames are spread over the first 10 s


def list_inputs(source: Path, out: Path) -> list[Path]:
    """Media files of a folder (recursively; none under ``out``, the outputs of an earlier run) or of a text file
    with one path per line."""
    if source.is_dir():
        own = out.resolve()
        return sorted(
            p
            for p in source.rglob("*")
            if p.suffix.lower() in MEDIA_EXTENSIONS and p.is_file() and own not in p.resolve().parents
        )
    if source.is_file() and source.suffix == ".txt":
        lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        return [Path(line) if Path(line).is_absolute() else source.parent / line for line in lines]
    raise ConfigError(f"INPUT '{source}' must be a folder of media files or a .txt list of paths")


def check_unique_ids(inputs: list[Path]) -> None:
    duplicates = sorted(clip_id for clip_id, count in Counter(p.stem for p in inputs).items() if count > 1)
    if duplicates:
        raise ConfigError(
            f"INPUT: several files share the ids {duplicates[:10]} (ids are file names without extension)"
        )


def decode_clip(path: Path, max_seconds: float) -> tuple[np.ndarray, list[Image.Image]]:
    """A media file's first ``max_seconds`` of audio at 16 kHz and, for a video, its 10 frames (CAV-MAE's: evenly
    spaced over the first 10 s, short side 224, centre-cropped). Raises MediaError."""
    wave = decode_audio(path, max_seconds=max_seconds)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        return wave, []
    duration = min(len(wave) / SAMPLE_RATE, WINDOW_S)
    return wave, decode_frames(path, [duration * k / NUM_FRAMES for k in range(NUM_FRAMES)], resize_center_crop)


def save_frame(frame: Image.Image, target) -> None:
    frame.save(target, format="JPEG", quality=95)
