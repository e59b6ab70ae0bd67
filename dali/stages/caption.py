"""``dali caption --run RUN_DIR FILE...``: captions for any audio or video file, window by window.

Files of any length are cut into 10.24 s windows (CAV-MAE's 1024 frames) with their timestamps; the last
partial window is kept when it is at least ``--min-window`` long. ``--modality audio_vis`` pairs each window
with the video frame at its middle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dali import distributed
from dali.audio import SAMPLE_RATE, WINDOW_SHIFT, audio_to_features, samples_for_frames
from dali.config import ConfigError, field, parse_config
from dali.files import atomic_write_json
from dali.media import MediaError, decode_audio, decode_frames
from dali.progress import progress
from dali.runs import stage_main
from dali.stages.common import DTYPES, DecodingFlags, load_captioning, log, setup_logging


@dataclass(kw_only=True)
class CaptionConfig(DecodingFlags):
    """Caption audio/video files with a run's aligned encoder (and distilled projector)."""

    run: str = field(help="run folder with align/ (and distill/, prefix/), e.g. expe/DALI_OT_ATT")
    files: tuple[str, ...] = field((), help="audio or video files", positional=True)
    llava: str | None = field(None, help="LLaVA-1.5 (default: the one recorded in the run's align manifest)")
    modality: str = field("audio", choices=("audio", "audio_vis"))
    projector: str = field("distilled", choices=("distilled", "original"))
    use_prefix: bool = field(False)
    first_window_only: bool = field(False, help="caption only the first 10 s of each file")
    min_window: float = field(1.0, help="shortest trailing window to caption, in seconds")
    batch_size: int = field(16)
    strategy: str = field("greedy", choices=("greedy", "beam", "sample"))
    json: str | None = field(None, help="also write the captions to this JSON file")
    dtype: str = field("float32", choices=tuple(DTYPES))
    device: str = field("auto")

    def validate(self) -> None:
        if not self.files:
            raise ConfigError("FILE: give at least one audio or video file")


@dataclass
class Window:
    file: str
    start: float
    end: float
    features: torch.Tensor
    frame: object = None


def cut_windows(path: Path, target_frames: int, first_only: bool, min_window: float, need_frame: bool) -> list[Window]:
    """10.24 s windows of a file, each with exactly the ``target_frames`` fbank frames that ``dali infer`` computes
    for a clip of that audio (a window reads the 240 samples past its end that its last frame needs)."""
    wave = torch.from_numpy(decode_audio(path))
    step = target_frames * WINDOW_SHIFT  # 10.24 s
    span = samples_for_frames(target_frames)
    starts = [0] if first_only else list(range(0, max(len(wave), 1), step))
    windows = []
    for start in starts:
        piece = wave[start : start + span]
        end = min(start + step, len(wave))
        if start > 0 and end - start < min_window * SAMPLE_RATE:
            break
        windows.append(
            Window(str(path), start / SAMPLE_RATE, end / SAMPLE_RATE, audio_to_features(piece - piece.mean()))
        )
    if need_frame:
        frames = decode_frames(path, [(w.start + w.end) / 2 for w in windows])
        for w, frame in zip(windows, frames):
            w.frame = frame
    return windows


@stage_main
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(CaptionConfig, argv)
    run = Path(config.run)
    align, prefix, distill = run / "align", run / "prefix", run / "distill"
    device = distributed.setup(config.device).device
    config, models = load_captioning(
        config,
        device,
        align,
        prefix if config.use_prefix else None,
        distill if config.projector == "distilled" else None,
        flags=("--run", "--run", "--run"),
    )
    options = config.decoding()
    windows, failures = [], []
    for name in config.files:
        try:
            target = models.encoder.config.target_frames
            need_frame = config.modality == "audio_vis"
            windows += cut_windows(Path(name), target, config.first_window_only, config.min_window, need_frame)
        except MediaError as error:
            failures.append({"file": name, "error": error.reason})
            log.error("%s", error)
    results = []
    for start in progress(range(0, len(windows), config.batch_size), desc="captioning", unit="batch"):
        batch = windows[start : start + config.batch_size]
        pixels = None
        if config.modality == "audio_vis":
            pixels = models.captioner.preprocess_images([w.frame for w in batch])
        block = models.block(torch.stack([w.features for w in batch]), pixels)
        for window, caption in zip(batch, models.captioner.generate(block, options)):
            results.append(
                {"file": window.file, "start": round(window.start, 2), "end": round(window.end, 2), "caption": caption}
            )
            print(f"{window.file} [{window.start:7.2f}s - {window.end:7.2f}s] {caption}")
    if config.json:
        atomic_write_json(
            config.json,
            {
                "captions": results,
                "failed": failures,
                "modality": config.modality,
                "decoding": options.__dict__,
                "conv_mode": config.conv_mode,
                "dtype": config.dtype,
                "run": str(run),
                "llava": config.llava,
            },
        )
    return 1 if failures and not results else 0


if __name__ == "__main__":
    from dali.cli import run

    raise SystemExit(run("caption", main))
