"""Captioning from Python: a finished run loaded once, then any number of files or waveforms.

    from dali import AudioCaptioner
    captioner = AudioCaptioner.from_run("expe/demo/ot_att")   # a run folder, or a run's name under expe/
    captioner.caption("clip.wav")    # [(start_s, end_s, caption), ...], one per 10.24 s window
    captioner.caption(samples, sample_rate=44_100)   # an array or tensor: [T], [T, C] or [C, T], int or float

Files of any length (any format PyAV reads, video included) are cut into 10.24 s windows (CAV-MAE's 1024 frames);
a trailing window shorter than ``min_window`` seconds is dropped. ``dali caption`` is this object behind a command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from dali import model_folder
from dali.audio import WINDOW_SHIFT, WaveformError, audio_to_features, samples_for_frames, waveform_to_mono
from dali.captioning import CaptioningModels
from dali.constants import PROJECTORS, RENAMED_PROJECTORS, SAMPLE_RATE
from dali.distributed import pick_device
from dali.errors import DaliError
from dali.limits import DEFAULT_FILE_SECONDS
from dali.media import decode_audio, decode_frames
from dali.models.decoding import DecodingOptions
from dali.run import Run, captioning_stages

Source = str | Path | np.ndarray | torch.Tensor


@dataclass
class Window:
    """One 10.24 s window of a file or waveform: its place in it, its features and (audio + image) its middle frame."""

    file: str
    start: float
    end: float
    features: torch.Tensor
    frame: object = None

    @property
    def span(self) -> tuple[float, float]:
        """(start, end) in seconds, to the hundredth."""
        return round(self.start, 2), round(self.end, 2)


def wave_windows(
    wave: torch.Tensor, name: str, target_frames: int, first_only: bool, min_window: float, front_end=None
) -> list:
    """Windows of a 16 kHz mono waveform, each with exactly the ``target_frames`` fbank frames that ``dali infer``
    computes for a clip of that audio (a window reads the 240 samples past its end that its last frame needs), or
    what another encoder's ``front_end`` makes of the same samples."""
    step = target_frames * WINDOW_SHIFT  # 10.24 s
    span = samples_for_frames(target_frames)
    starts = [0] if first_only else list(range(0, max(len(wave), 1), step))
    windows = []
    for start in starts:
        piece = wave[start : start + span]
        end = min(start + step, len(wave))
        if start > 0 and end - start < min_window * SAMPLE_RATE:
            break
        piece = piece - piece.mean()
        features = front_end(piece) if front_end is not None else audio_to_features(piece)
        windows.append(Window(name, start / SAMPLE_RATE, end / SAMPLE_RATE, features))
    return windows


def file_windows(
    path: Path, target_frames: int, first_only: bool, min_window: float, need_frame: bool,
    max_seconds: float = DEFAULT_FILE_SECONDS, front_end=None,
) -> list:  # fmt: skip
    """Windows of a media file (of its first ``max_seconds``); with ``need_frame`` each gets the video
    frame at its middle."""
    wave = torch.from_numpy(decode_audio(path, max_seconds=max_seconds))
    windows = wave_windows(wave, str(path), target_frames, first_only, min_window, front_end)
    if need_frame:
        for window, frame in zip(windows, decode_frames(path, [(w.start + w.end) / 2 for w in windows])):
            window.frame = frame
    return windows


def _loading(llava: str | None, conv_mode: str | None, dtype: str, device, allow_modified: bool) -> dict:
    """The API's loading keywords as :class:`CaptioningModels`' loaders take them."""
    return {
        "llava": llava,
        "conv_mode": conv_mode,
        "dtype": dtype,
        "device": pick_device(device),
        "allow_modified": allow_modified,
    }


class AudioCaptioner:
    """A run's captioning models, loaded once; :meth:`caption` takes files or waveforms, in batches."""

    def __init__(self, models: CaptioningModels, decoding: DecodingOptions | None = None, modality: str = "audio"):
        if modality not in ("audio", "audio_vis"):
            raise DaliError(f"modality must be 'audio' or 'audio_vis', got '{modality}'")
        self.models, self.modality = models, modality
        self.decoding = decoding or DecodingOptions()

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        *,
        llava: str | None = None,
        projector: str | None = None,
        use_prefix: bool | None = None,
        modality: str = "audio",
        decoding: DecodingOptions | None = None,
        dtype: str = "float32",
        device: str | torch.device = "auto",
        conv_mode: str | None = None,
        expe_dir: str | Path = "expe",
        allow_modified: bool = False,
    ) -> "AudioCaptioner":
        """Load a run: its aligned encoder, and its distilled projector when it has one (``projector="distilled"``,
        no prefix, as the original's inference); otherwise LLaVA's projector (``projector="llava"``) with the run's
        prefix. ``llava`` and ``conv_mode`` default to what the run recorded. Each trained file is checked against
        the sha256 its manifest records (:class:`dali.runs.IntegrityError`; ``allow_modified``: a changed file only
        warns)."""
        found = Run.find(run, expe_dir)
        projector = RENAMED_PROJECTORS.get(projector, projector) or found.default_projector()
        if projector not in PROJECTORS:
            raise DaliError(f"projector must be one of {PROJECTORS}, got '{projector}'")
        use_prefix = projector == "llava" if use_prefix is None else use_prefix
        uses = captioning_stages(projector, use_prefix)
        models = CaptioningModels.load(found, uses, **_loading(llava, conv_mode, dtype, device, allow_modified))
        return cls(models, decoding, modality)

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | Path,
        *,
        llava: str | None = None,
        modality: str = "audio",
        decoding: DecodingOptions | None = None,
        dtype: str = "float32",
        device: str | torch.device = "auto",
        conv_mode: str | None = None,
        allow_modified: bool = False,
    ) -> "AudioCaptioner":
        """Load a model folder written by ``dali export`` (:mod:`dali.model_folder`): a local folder, or a Hub name
        through huggingface_hub (its cache first; ``HF_HUB_OFFLINE=1`` stays offline). ``llava`` and ``conv_mode``
        default to those the folder names; its weights must have the sha256 its config records."""
        folder = model_folder.resolve(name_or_folder)
        models = CaptioningModels.from_folder(folder, **_loading(llava, conv_mode, dtype, device, allow_modified))
        return cls(models, decoding, modality)

    def describe(self) -> dict:
        """What makes the captions besides the run's trained files: LLaVA's source, the prompt, dtype and device."""
        llava = self.models.captioner
        return {
            "llava": llava.source,
            "conv_mode": llava.conv_mode,
            "dtype": llava.precision,
            "device": str(llava.device),
        }

    def windows(
        self,
        source: Source,
        first_window_only: bool = False,
        min_window: float = 1.0,
        max_seconds: float = DEFAULT_FILE_SECONDS,
        modality: str | None = None,
        sample_rate: int | None = None,
    ) -> list[Window]:
        """A file (path: its first ``max_seconds``) or a waveform (array or tensor, with its
        ``sample_rate``: :func:`dali.audio.waveform_to_mono` says which) cut into windows; for ``audio_vis`` (by
        default the captioner's modality) each carries its video frame."""
        target, front_end = self.models.encoder.target_frames, self.models.encoder.front_end
        modality = modality or self.modality
        if isinstance(source, (str, Path)):
            need_frame = modality == "audio_vis"
            return file_windows(Path(source), target, first_window_only, min_window, need_frame, max_seconds, front_end)
        if modality == "audio_vis":
            raise DaliError("audio + image captions need a video file, not a waveform")
        if sample_rate is None:
            raise WaveformError("a waveform needs its sample_rate (caption(samples, sample_rate=...))")
        wave = torch.from_numpy(waveform_to_mono(source, sample_rate))
        return wave_windows(wave, "<waveform>", target, first_window_only, min_window, front_end)

    def iter_captions(
        self, windows: Sequence[Window], batch_size: int = 16, decoding: DecodingOptions | None = None
    ) -> Iterator[tuple[Window, str]]:
        """(window, caption) for each window, ``batch_size`` windows at a time: from audio and image where the
        windows carry frames, else from audio; decoded as ``decoding`` says (by default the captioner's)."""
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            with torch.no_grad():
                pixels = None
                if batch[0].frame is not None:
                    pixels = self.models.captioner.preprocess_images([w.frame for w in batch])
                block = self.models.block(torch.stack([w.features for w in batch]), pixels)
                captions = self.models.captioner.generate(block, decoding or self.decoding)
            yield from zip(batch, captions)

    def caption(
        self,
        source: Source,
        first_window_only: bool = False,
        min_window: float = 1.0,
        batch_size: int = 16,
        sample_rate: int | None = None,
    ) -> list[tuple[float, float, str]]:
        """``[(start_s, end_s, caption), ...]`` for one file or waveform (its ``sample_rate`` required), one entry per
        10.24 s window."""
        windows = self.windows(source, first_window_only, min_window, sample_rate=sample_rate)
        return [(*w.span, caption) for w, caption in self.iter_captions(windows, batch_size)]

    def record(self, window: Window, caption: str) -> dict:
        """A window's caption as ``dali caption`` writes it (:mod:`dali.caption_formats`): file, span, caption and the
        modality it was captioned from."""
        start, end = window.span
        return {"file": window.file, "start": start, "end": end, "caption": caption, "modality": self.modality}

    def records(self, source: Source, first_window_only: bool = False, min_window: float = 1.0, batch_size: int = 16,
                sample_rate: int | None = None) -> list[dict]:  # fmt: skip
        """:meth:`caption` as records, for :func:`dali.caption_formats.render` (txt, json, srt, vtt, tsv)."""
        windows = self.windows(source, first_window_only, min_window, sample_rate=sample_rate)
        return [self.record(window, caption) for window, caption in self.iter_captions(windows, batch_size)]
