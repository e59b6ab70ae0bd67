"""The bounds of what a media file may declare about itself, checked before anything is allocated from it.

A small file can claim a huge cost: a 40 KB wav whose header says 10 MHz (the resampling filter grows with the
rate), a 4096 x 4096 video, an hour of 96 kHz audio. Every reader checks the declared figure against these first.
They come from real media, with a margin: AudioSet is 16-48 kHz with at most 8 channels; studio audio reaches
192 kHz and 32 tracks; phone audio is 8 kHz; video tops out at 8K. docs/reliability.md lists them.
"""

import math

MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 32
# A resampling ratio up/down whose terms exceed this (a rate such as 44101 Hz) is approximated to within 1e-6 by
# one with smaller terms: the polyphase filter's length is 20 x max(up, down) taps.
MAX_RESAMPLE_TERM = 1_000
MAX_STREAMS = 64  # a film has a few audio and subtitle tracks; each stream costs FFmpeg a decoder to probe
# Audio packets per second of sound: MP3 and AAC hold about 40, Vorbis's short blocks up to about 350, Opus's
# shortest frames 400; a file of 2-sample packets (8,000 per second) cost 27 s to decode.
MAX_AUDIO_FRAME_RATE = 1_000
MAX_FRAME_RATE = 1_000  # frames per second of stream time: high-speed cameras reach this; video is 24-120
MAX_FRAME_SIDE = 8_192  # pixels, either side of a video frame or an image
MAX_IMAGE_PIXELS = MAX_FRAME_SIDE * MAX_FRAME_SIDE // 4  # 16.7 Mpx: larger JPEG frames are refused, not decoded
# A clip of a stage's list is read up to this many seconds (the stages use its first 10.24 s; AudioSet clips are
# 10 s, Clotho's 15-30 s): a one-hour file in a list costs what its first minute does.
MAX_CLIP_SECONDS = 60.0
# What `dali caption` and the web page decode of one file unless told otherwise (--max-seconds).
DEFAULT_FILE_SECONDS = 600.0


def rate_problem(rate: float) -> str | None:
    """Why a declared sample rate is refused, or None."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        return f"it declares a sample rate of {rate:g} Hz; dali reads {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
    return None


def channels_problem(channels: int) -> str | None:
    """Why a declared channel count is refused, or None."""
    if not 1 <= channels <= MAX_CHANNELS:
        return f"it declares {channels} channels; dali reads 1-{MAX_CHANNELS}"
    return None


def frame_problem(width: int, height: int) -> str | None:
    """Why a declared picture size is refused, or None."""
    if not (0 < width <= MAX_FRAME_SIDE and 0 < height <= MAX_FRAME_SIDE):
        return f"it declares {width}x{height} pixels; dali reads frames of at most {MAX_FRAME_SIDE} per side"
    return None


# Whisper-large, the largest audio encoder family here, is 1.55 B parameters whole (its encoder 0.64 B).
MAX_ENCODER_PARAMETERS = 4e9
# A model a file describes is built on PyTorch's meta device to be checked: no tensor memory, but one Python object
# per module, so its structure is bounded first. Whisper-large has 32 layers a stack; CLAP's HTS-AT 4 stages;
# wav2vec2's front end 7 convolutions; the largest number in these configs is Whisper's vocabulary (51,865).
MAX_DESCRIBED_LAYERS = 256
MAX_DESCRIBED_LIST = 1_024
MAX_DESCRIBED_INTEGER = 10**7
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed
# The bounds (inclusive) of every number a flag, preset or API option declares, by field name, for every
# command: what real use needs with a wide margin (docs/reliability.md). A value outside them is a ConfigError
# naming the flag before anything is allocated from it; a field may set its own (``dali.flags.field(bounds=)``).
BOUNDS: dict[str, tuple[float, float]] = {
    "seed": (0, MAX_SEED),
    "seeds": (1, 100),
    "batch_size": (1, 4096),
    "num_beams": (1, 64),
    "max_new_tokens": (1, 1024),
    "min_new_tokens": (0, 1024),
    "temperature": (1e-3, 100.0),
    "top_p": (1e-6, 1.0),
    "num_workers": (0, 256),
    "workers": (1, 256),
    "emd_workers": (0, 256),
    "epochs": (0, 100_000),
    "captioner_epochs": (1, 10_000),
    "captioner_lr": (1e-6, 1.0),
    "scorer_freeze_epochs": (0, 100_000),
    "checkpoint_every": (1, 10**9),
    "max_non_finite_steps": (0, 10**9),
    "max_steps_per_epoch": (1, 10**9),
    "eval_every": (0, 10**9),
    "patience": (0, 10**6),
    "limit": (1, 10**9),
    "lr": (0.0, 10.0),
    "weight_decay": (0.0, 10.0),
    "warmup_ratio": (0.0, 1.0),
    "val_fraction": (0.0, 1.0),
    "max_grad_norm": (0.0, 1e6),
    "beta1": (0.0, 1.0),
    "beta2": (0.0, 1.0),
    "lr_decay": (0.0, 1.0),
    "lr_decay_start": (0, 10**6),
    "lr_decay_every": (1, 10**6),
    "init_std": (0.0, 10.0),
    "num_prefix_tokens": (1, 256),
    "audio_tokens": (1, 4096),
    "target_frames": (16, 8192),
    "encoder_dim": (8, 8192),
    "encoder_depth": (1, 64),
    "encoder_heads": (1, 128),
    "encoder_patch_time": (1, 1024),
    "scorer_heads": (1, 128),
    "scorer_temperature": (1e-3, 1e6),
    "sinkhorn_reg": (1e-6, 1e3),
    "sinkhorn_iters": (1, 100_000),
    "entropy_weights": (0.0, 1e6),
    "frame_index": (0, 9),  # 10 frames per clip (frame_0 .. frame_9)
    "max_seconds": (0.0, 24 * 3600.0),
    "min_seconds": (0.0, 3600.0),
    "min_window": (0.0, 10.24),
    "max_upload_mb": (1, 10_000),
    "max_scratch_mb": (1, 1_000_000),
    "keep_minutes": (0.05, 7 * 24 * 60.0),
    "max_scratch_files": (10, 10**6),
    "port": (1, 65535),
}


def number_problem(name: str, value: float, bounds: tuple[float, float] | None = None) -> str | None:
    """Why a number given for ``name`` is refused (not finite, or outside ``bounds``, by default
    :data:`BOUNDS`'), or None."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    low, high = bounds or BOUNDS.get(name, (-math.inf, math.inf))
    if not low <= value <= high:
        return f"must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}"
    return None


def _shown(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"
