"""``dali caption --run RUN_DIR FILE...``: captions for any audio or video file, window by window.

Files of any length are cut into 10.24 s windows (CAV-MAE's 1024 frames) with their timestamps; the last
partial window is kept when it is at least ``--min-window`` long. ``--modality audio_vis`` pairs each window
with the video frame at its middle.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dali import distributed
from dali.artifacts import load_align_stage, load_distill_stage, load_prefix_stage
from dali.audio import SAMPLE_RATE, audio_to_features
from dali.config import ConfigError, field, parse_config
from dali.media import MediaError, decode_audio, decode_frames
from dali.models.captioner import Captioner
from dali.runs import MANIFEST, atomic_write_json
from dali.stages.common import DTYPES, DecodingFlags, log, progress, setup_logging


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
    wave = decode_audio(path)
    wave = torch.from_numpy(wave - wave.mean())
    window = int(round(target_frames * 0.01 * SAMPLE_RATE))  # 10 ms hop per fbank frame
    starts = [0] if first_only else list(range(0, max(len(wave), 1), window))
    windows = []
    for start in starts:
        piece = wave[start : start + window]
        if start > 0 and len(piece) < min_window * SAMPLE_RATE:
            break
        windows.append(
            Window(
                str(path),
                start / SAMPLE_RATE,
                (start + len(piece)) / SAMPLE_RATE,
                audio_to_features(piece - piece.mean(), target_frames),
            )
        )
    if need_frame:
        frames = decode_frames(path, [(w.start + w.end) / 2 for w in windows])
        for w, frame in zip(windows, frames):
            w.frame = frame
    return windows


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(CaptionConfig, argv)
    run = Path(config.run)
    llava = config.llava
    if llava is None:
        manifest = run / "align" / MANIFEST
        llava = json.loads(manifest.read_text())["metrics"].get("llava") if manifest.exists() else None
        if not llava:
            raise ConfigError("--llava is needed: the run's align manifest does not name a LLaVA")
    device = distributed.setup(config.device).device
    captioner = Captioner.from_pretrained(llava, dtype=DTYPES[config.dtype], device=device)
    encoder = load_align_stage(run / "align", captioner.vision_dim, "--run").to(device)
    projector = (
        load_distill_stage(run / "distill", captioner.projector, "--run").to(device)
        if config.projector == "distilled"
        else None
    )
    prefix = load_prefix_stage(run / "prefix", captioner.hidden_size, "--run").to(device) if config.use_prefix else None
    options = config.decoding()
    windows, failures = [], []
    for name in config.files:
        try:
            windows += cut_windows(
                Path(name),
                encoder.config.target_frames,
                config.first_window_only,
                config.min_window,
                config.modality == "audio_vis",
            )
        except MediaError as error:
            failures.append({"file": name, "error": error.reason})
            log.error("%s", error)
    results = []
    for start in progress(range(0, len(windows), config.batch_size), desc="captioning", unit="batch"):
        batch = windows[start : start + config.batch_size]
        with torch.no_grad():
            audio = encoder.project(torch.stack([w.features for w in batch]).to(device))
            image = (
                captioner.image_tokens(captioner.preprocess_images([w.frame for w in batch]))
                if config.modality == "audio_vis"
                else None
            )
            block = captioner.modality_block(
                image,
                audio,
                prefix=prefix() if prefix is not None else None,
                audio_projector=projector,
                image_projector=projector,
            )
        for window, caption in zip(batch, captioner.generate(block, options)):
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
                "run": str(run),
                "llava": llava,
            },
        )
    return 1 if failures and not results else 0


if __name__ == "__main__":
    sys.exit(main())
