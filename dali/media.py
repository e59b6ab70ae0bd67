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

MEDIA_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4a")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
FRAME_SIZE = 224  # CAV-MAE's frames: resize the short side, centre crop


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
        return av.open(str(path))
    except Exception as error:  # PyAV raises FFmpeg errors of many types for foreign or broken files
        raise MediaError(path, f"unreadable ({type(error).__name__}: {error})") from None


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Channel 0 of the file's first audio stream as float32 at ``sample_rate`` (mean not removed); with
    ``max_seconds``, only that much is decoded (an hour-long file costs no more than its first seconds).

    Raises:
        MediaError: no file, no audio stream, undecodable or empty.
    """
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        chunks, rate = [], stream.codec_context.sample_rate or stream.rate
        try:
            for frame in container.decode(stream):
                data = frame.to_ndarray()
                if frame.format.is_planar:
                    channel = data[0]
                else:  # interleaved: [1, samples * channels]
                    channel = data.reshape(-1, len(frame.layout.channels))[:, 0]
                chunks.append(pcm_to_float(channel))
                rate = frame.sample_rate
                if max_seconds is not None and sum(c.size for c in chunks) >= max_seconds * rate:
                    break
        except Exception as error:
            if not chunks:
                raise MediaError(path, f"undecodable audio ({type(error).__name__}: {error})") from None
    if not chunks or sum(chunk.size for chunk in chunks) == 0:
        raise MediaError(path, "the audio stream holds no samples")
    wave = np.concatenate(chunks)
    if not np.isfinite(wave).all():
        raise MediaError(path, "the audio holds NaN or infinite samples")
    wave = resample(wave, int(rate), sample_rate)
    return wave if max_seconds is None else wave[: round(max_seconds * sample_rate)]


def decode_frames(path: str | Path, times: list[float]) -> list[Image.Image]:
    """The frames nearest to each time (seconds), as RGB PIL images, decoding the stream once in order."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        wanted = sorted(range(len(times)), key=lambda i: times[i])
        found: dict[int, Image.Image] = {}
        previous = None
        position = 0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while position < len(wanted) and frame.time >= times[wanted[position]]:
                    target = times[wanted[position]]
                    use_previous = previous is not None and abs(previous[0] - target) < abs(frame.time - target)
                    found[wanted[position]] = previous[1] if use_previous else frame.to_image()
                    position += 1
                if position == len(wanted):
                    break
                previous = (frame.time, frame.to_image())
        except Exception as error:
            if previous is None:
                raise MediaError(path, f"undecodable video ({type(error).__name__}: {error})") from None
        if previous is None and not found:
            raise MediaError(path, "the video stream holds no frames")
        for index in wanted[position:]:  # times past the end: the last frame
            found[index] = previous[1]
    return [found[i].convert("RGB") for i in range(len(times))]


def resize_center_crop(image: Image.Image, size: int = FRAME_SIZE) -> Image.Image:
    """Resize the short side to ``size`` (bicubic), then crop the centre square (CAV-MAE's frame extraction)."""
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
