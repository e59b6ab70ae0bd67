"""Decoding audio and frames from any media file (wav, flac, ogg, mp4, mkv, webm) with PyAV.

PyAV links FFmpeg's libraries into the wheel, so no ffmpeg binary is assumed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dali.audio import pcm_to_float, resample
from dali.constants import SAMPLE_RATE
from dali.errors import DaliError
from dali.limits import (
    DEFAULT_FILE_SECONDS,
    MAX_AUDIO_FRAME_RATE,
    MAX_FRAME_RATE,
    MAX_STREAMS,
    channels_problem,
    frame_problem,
    rate_problem,
)

MEDIA_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4a")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
FRAME_SIZE = 224  # CAV-MAE's frames: resize the short side, centre crop
# Frames decoded for a captioner are shrunk to this long side as they are decoded: LLaVA-1.5 pads a frame to a
# square and resizes it to 336 px, so a larger frame only costs memory (a 4096 x 4096 frame is 50 MB).
FIT_SIDE = 672


class MediaError(DaliError, RuntimeError):
    """A media file cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot decode '{path}': {reason}")


def _open(path: Path):
    import av

    if not path.is_file():
        raise MediaError(path, "no such file")
    try:
        container = av.open(str(path))
    except Exception as error:  # PyAV raises FFmpeg errors of many types for foreign or broken files
        raise MediaError(path, f"unreadable ({type(error).__name__}: {error})") from None
    streams = len(container.streams)
    if streams > MAX_STREAMS:
        container.close()
        raise MediaError(path, f"it declares {streams} streams; dali reads at most {MAX_STREAMS}")
    return container


def decode_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float = DEFAULT_FILE_SECONDS
) -> np.ndarray:
    """The first ``max_seconds`` of channel 0 of the file's first audio stream, as float32 at ``sample_rate``
    (mean not removed): an hour-long file costs no more than its first seconds.

    The rate and channels the stream declares (and each decoded frame's) are checked against :mod:`dali.limits`
    before its samples are kept.

    Raises:
        MediaError: no file, no audio stream, undecodable, empty, out of bounds or out of memory.
    """
    path = Path(path)
    try:
        with _open(path) as container:
            if not container.streams.audio:
                raise MediaError(path, "no audio stream")
            stream = container.streams.audio[0]
            declared = stream.codec_context
            _check_audio(path, declared.sample_rate or stream.rate or SAMPLE_RATE, declared.channels or 1)
            chunks, rate = _decode_channel0(path, container, stream, max_seconds)
        wave = np.concatenate(chunks)
        if not np.isfinite(wave).all():
            raise MediaError(path, "the audio holds NaN or infinite samples")
        return resample(wave, int(rate), sample_rate)[: round(max_seconds * sample_rate)]
    except MemoryError:
        raise MediaError(path, "out of memory while decoding it") from None


def _check_audio(path: Path, rate: int, channels: int) -> None:
    problem = rate_problem(rate) or channels_problem(channels)
    if problem:
        raise MediaError(path, problem)


def _decode_channel0(path: Path, container, stream, max_seconds: float) -> tuple[list[np.ndarray], int]:
    """Channel 0 of ``stream`` in chunks, up to ``max_seconds``; (chunks, their rate)."""
    chunks, rate, kept = [], SAMPLE_RATE, 0
    try:
        for frame in container.decode(stream):
            _check_audio(path, frame.sample_rate, len(frame.layout.channels))
            if chunks and frame.sample_rate != rate:
                raise MediaError(path, f"the sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
            data, rate = frame.to_ndarray(), frame.sample_rate
            channel = data[0] if frame.format.is_planar else data.reshape(-1, len(frame.layout.channels))[:, 0]
            chunks.append(pcm_to_float(channel))
            kept += channel.size
            if len(chunks) > MAX_AUDIO_FRAME_RATE * (kept / rate + 1.0):  # the cost of a file: its seconds
                raise MediaError(path, f"it holds more than {MAX_AUDIO_FRAME_RATE} audio packets per second")
            if kept >= max_seconds * rate:
                break
    except MediaError:
        raise
    except Exception as error:  # FFmpeg errors of many types; what decoded before a broken packet is kept
        if not chunks:
            raise MediaError(path, f"undecodable audio ({type(error).__name__}: {error})") from None
    if kept == 0:
        raise MediaError(path, "the audio stream holds no samples")
    return chunks, rate


def decode_frames(path: str | Path, times: list[float], shape=None) -> list[Image.Image]:
    """The frames nearest to each time (seconds), as RGB PIL images, decoding the stream once in order.

    Each frame kept is passed through ``shape`` (by default :func:`fit_within` the tower-scale
    :data:`FIT_SIDE`) as it is decoded, so only one full-size frame is held at a time; the picture size the
    stream declares, and each frame's, is checked against :mod:`dali.limits` first.
    """
    path, shape = Path(path), shape or fit_within
    try:
        with _open(path) as container:
            if not container.streams.video:
                raise MediaError(path, "no video stream")
            stream = container.streams.video[0]
            _check_picture(path, stream.codec_context.width or 1, stream.codec_context.height or 1)
            return _frames_at(path, container, stream, times, shape)
    except MemoryError:
        raise MediaError(path, "out of memory while decoding it") from None


def _check_picture(path: Path, width: int, height: int) -> None:
    problem = frame_problem(width, height)
    if problem:
        raise MediaError(path, problem)


def _frames_at(path: Path, container, stream, times: list[float], shape) -> list[Image.Image]:
    wanted = sorted(range(len(times)), key=lambda i: times[i])
    found: dict[int, Image.Image] = {}
    previous = None  # (time, the decoded frame): converted to a picture only when chosen
    position = decoded = 0
    try:
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            _check_picture(path, frame.width, frame.height)
            decoded += 1
            if decoded > MAX_FRAME_RATE * (max(frame.time, 0.0) + 1.0):  # the cost of a window: its seconds
                raise MediaError(path, f"it holds more than {MAX_FRAME_RATE} frames per second")
            while position < len(wanted) and frame.time >= times[wanted[position]]:
                target = times[wanted[position]]
                chosen = previous if previous and abs(previous[0] - target) < abs(frame.time - target) else None
                found[wanted[position]] = _picture(chosen[1] if chosen else frame, shape)
                position += 1
            if position == len(wanted):
                break
            previous = (frame.time, frame)
    except MediaError:
        raise
    except Exception as error:  # FFmpeg errors of many types; frames decoded before a broken packet are kept
        if previous is None:
            raise MediaError(path, f"undecodable video ({type(error).__name__}: {error})") from None
    if previous is None and not found:
        raise MediaError(path, "the video stream holds no frames")
    last = _picture(previous[1], shape) if position < len(wanted) else None
    for index in wanted[position:]:  # times past the end: the last frame
        found[index] = last
    return [found[i] for i in range(len(times))]


def _picture(frame, shape) -> Image.Image:
    return shape(frame.to_image().convert("RGB"))


def fit_within(image: Image.Image, side: int | None = None) -> Image.Image:
    """``image`` shrunk (aspect kept, bicubic) so that its long side is at most ``side`` (default
    :data:`FIT_SIDE`); smaller images are returned as they are."""
    side = side or FIT_SIDE
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def resize_center_crop(image: Image.Image, size: int = FRAME_SIZE) -> Image.Image:
    """Resize the short side to ``size`` (bicubic), then crop the centre square (CAV-MAE's frame extraction)."""
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
