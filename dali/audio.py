"""Audio front end: CAV-MAE's Kaldi log-mel filterbank, in plain torch.

Every constant of the front end lives here. The filterbank reproduces
``torchaudio.compliance.kaldi.fbank`` with the arguments CAV-MAE passes (torchaudio cannot be installed
on our CPU machines), batched and on any device so features can be computed on the GPU.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from dali.constants import SAMPLE_RATE, TARGET_FRAMES
from dali.errors import DaliError
from dali.limits import MAX_CHANNELS, MAX_CLIP_SECONDS, MAX_RESAMPLE_TERM, channels_problem, rate_problem

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
WINDOW_LENGTH = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400 samples
WINDOW_SHIFT = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160 samples
FFT_LENGTH = 1 << (WINDOW_LENGTH - 1).bit_length()  # 512: Kaldi rounds the window up to a power of two
NUM_MEL_BINS = 128
LOW_FREQ = 20.0
HIGH_FREQ = SAMPLE_RATE / 2  # Kaldi's high_freq=0 means the Nyquist frequency
PREEMPHASIS = 0.97
# Kaldi floors mel energies at float32 epsilon before the log. At 128 bins one filter is empty, so that
# column is the constant log(eps), exactly as torchaudio emits it.
LOG_FLOOR = float(torch.finfo(torch.float32).eps)

# AudioSet statistics CAV-MAE normalises with (x - mean) / std (not the AST extractor's 2*std).
FBANK_MEAN = -5.081
FBANK_STD = 4.4849

# CAV-MAE's own call of torchaudio.compliance.kaldi.fbank, which kaldi_fbank reproduces (for parity checks
# on machines that have torchaudio).
TORCHAUDIO_FBANK_ARGS = dict(
    htk_compat=True,
    sample_frequency=SAMPLE_RATE,
    use_energy=False,
    window_type="hanning",
    num_mel_bins=NUM_MEL_BINS,
    dither=0.0,
    frame_shift=FRAME_SHIFT_MS,
)


class AudioLoadError(DaliError, RuntimeError):
    """A clip could not be turned into a waveform; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load audio '{self.path}': {reason}")


def load_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_CLIP_SECONDS, data: bytes | None = None
) -> torch.Tensor:
    """Read the first ``max_seconds`` of a clip as float32 mono at ``sample_rate``, with their mean removed.

    Like CAV-MAE, only channel 0 is kept (no down-mix). Any input rate is resampled with a polyphase
    filter; the original computed the fbank with the file's rate instead (see docs/deviations.md). The rate and
    channels the file declares are checked against :mod:`dali.limits` before anything is read, and channel 0 is
    read in blocks, so a file costs what its first ``max_seconds`` of one channel do.

    ``data``: the file's bytes (a shard's member), read in place of the file; ``path`` then only names it.

    Returns:
        Tensor [T] float32.
    Raises:
        AudioLoadError: missing, unreadable, empty, non-finite or out-of-bounds file (memory included);
            nothing else escapes.
    """
    import soundfile

    if data is None and not Path(path).is_file():
        raise AudioLoadError(path, "no such file")
    try:
        with soundfile.SoundFile(str(path) if data is None else io.BytesIO(data)) as sound:
            problem = rate_problem(sound.samplerate) or channels_problem(sound.channels)
            if problem:
                raise AudioLoadError(path, problem)
            file_rate, wanted = sound.samplerate, int(max_seconds * sound.samplerate)
            blocks = sound.blocks(blocksize=1 << 16, frames=wanted, dtype="float32", always_2d=True)
            wave = np.concatenate([block[:, 0] for block in blocks] or [np.zeros(0, np.float32)])
        if wave.size == 0:
            raise AudioLoadError(path, "the file holds no samples")
        if not np.isfinite(wave).all():
            raise AudioLoadError(path, "the file holds NaN or infinite samples")
        wave = resample(wave, file_rate, sample_rate)
    except AudioLoadError:
        raise
    except MemoryError:
        raise AudioLoadError(path, "out of memory while decoding it") from None
    except Exception as error:  # soundfile raises several types for corrupt or foreign files
        raise AudioLoadError(path, f"unreadable ({type(error).__name__}: {error})") from None
    if wave.size == 0:
        raise AudioLoadError(path, "too short to resample")
    return torch.from_numpy(wave - wave.mean(dtype=np.float64).astype(np.float32))


def flac_bytes(wave: np.ndarray) -> bytes:
    """A 16 kHz float wave as 16-bit flac (what a shard holds), holding the samples ``dali prepare``'s 16-bit wav of
    it holds: libsndfile scales float to 16 bits differently for the two formats, so the wav's quantisation is used."""
    import soundfile

    wav = io.BytesIO()
    soundfile.write(wav, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    wav.seek(0)
    samples, _ = soundfile.read(wav, dtype="int16")
    return _int16_flac(samples)


def _int16_flac(samples: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return buffer.getvalue()


def file_as_flac(path: str | Path) -> tuple[bytes, float]:
    """A clip's audio file as a shard's flac and its seconds. A 16 kHz mono 16-bit file (what ``dali prepare`` and
    CAV-MAE's preprocessing write) keeps its samples exactly, so a clip reads the same from either; any other is
    read as the stages read it (:func:`load_audio`) and stored at 16 kHz. Raises :class:`AudioLoadError`."""
    import soundfile

    try:
        info = soundfile.info(str(path))
        exact = (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        if exact:
            samples, _ = soundfile.read(str(path), frames=int(MAX_CLIP_SECONDS * SAMPLE_RATE), dtype="int16")
    except Exception as error:  # soundfile raises several types for corrupt or foreign files
        raise AudioLoadError(path, f"unreadable ({type(error).__name__}: {error})") from None
    if exact and len(samples):
        return _int16_flac(samples), len(samples) / SAMPLE_RATE
    wave = load_audio(path).numpy()
    return flac_bytes(np.clip(wave, -1.0, 1.0)), len(wave) / SAMPLE_RATE


class WaveformError(DaliError, ValueError):
    """An array given as audio cannot be read as one: the message says what it is and what is expected."""


def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1]: integer PCM scaled by its dtype's range (unsigned PCM centred), float as is."""
    if samples.dtype.kind == "f":
        return samples.astype(np.float32)
    info = np.iinfo(samples.dtype)
    scale = max(abs(info.min), info.max)
    return (samples.astype(np.float32) - (0 if info.min < 0 else scale / 2)) / scale


def waveform_to_mono(samples, sample_rate: int) -> np.ndarray:
    """What audio libraries return, as the files' loader reads a file: float32 mono at 16 kHz, [T].

    ``samples``: a NumPy array or tensor, [T], [T, C] (soundfile, scipy) or [C, T] (librosa, torchaudio): the axis
    of at most :data:`dali.limits.MAX_CHANNELS` entries, shorter than the other, is the channels', and channel 0 is
    kept, as for files (CAV-MAE keeps channel 0). Integer PCM (scipy's int16, say) is scaled by its dtype; any rate is
    resampled. Raises :class:`WaveformError` for an empty, non-finite, non-numeric or ambiguous array.
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise WaveformError(f"sample_rate must be an integer number of samples per second, got {sample_rate!r}")
    problem = rate_problem(sample_rate)
    if problem:
        raise WaveformError(f"sample_rate: {problem}")
    if samples.dtype.kind not in "iuf":
        raise WaveformError(f"a waveform holds integer or float samples, got dtype {samples.dtype}")
    if samples.ndim == 2:
        channel_axis = int(np.argmin(samples.shape))
        if samples.shape[0] == samples.shape[1] or samples.shape[channel_axis] > MAX_CHANNELS:
            raise WaveformError(
                f"cannot tell channels from samples in a waveform of shape {samples.shape}: give [T], [T, C] or "
                f"[C, T] with at most {MAX_CHANNELS} channels"
            )
        samples = np.take(samples, 0, axis=channel_axis)
    if samples.ndim != 1:
        raise WaveformError(f"a waveform is [T], [T, C] or [C, T], got shape {samples.shape}")
    if samples.size == 0:
        raise WaveformError("the waveform holds no samples")
    wave = pcm_to_float(samples)
    if not np.isfinite(wave).all():
        raise WaveformError("the waveform holds NaN or infinite samples")
    return resample(wave, int(sample_rate), SAMPLE_RATE)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling [T] -> [T * rate_out / rate_in] (scipy; torchaudio is unavailable on CPU). The ratio's
    terms are kept under :data:`dali.limits.MAX_RESAMPLE_TERM` (the filter's length grows with them)."""
    if rate_in == rate_out:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    ratio = Fraction(int(rate_out), int(rate_in))
    if max(ratio.numerator, ratio.denominator) > MAX_RESAMPLE_TERM:
        ratio = ratio.limit_denominator(MAX_RESAMPLE_TERM)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_filterbank(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's triangular mel filters (triangles in the mel domain, no area normalisation).

    Returns:
        Tensor [NUM_MEL_BINS, FFT_LENGTH // 2 + 1]; the Nyquist column is zero as in Kaldi.
    """
    num_fft_bins = FFT_LENGTH // 2
    bin_width = SAMPLE_RATE / FFT_LENGTH
    mel_low, mel_high = (
        _mel(torch.tensor(LOW_FREQ, dtype=torch.float64)),
        _mel(torch.tensor(HIGH_FREQ, dtype=torch.float64)),
    )
    delta = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    index = torch.arange(NUM_MEL_BINS, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + index * delta, mel_low + (index + 1) * delta, mel_low + (index + 2) * delta
    mel_of_bin = _mel(bin_width * torch.arange(num_fft_bins, dtype=torch.float64)).unsqueeze(0)
    up = (mel_of_bin - left) / (center - left)
    down = (right - mel_of_bin) / (right - center)
    filters = torch.clamp(torch.minimum(up, down), min=0.0)
    filters = torch.nn.functional.pad(filters, (0, 1))  # [NUM_MEL_BINS, 257]
    return filters.to(device=device, dtype=dtype)


def kaldi_fbank(wave: torch.Tensor) -> torch.Tensor:
    """Kaldi log-mel filterbank exactly as CAV-MAE computes it, batched.

    Settings: 25 ms 'hanning' window (symmetric Hann), 10 ms shift, snip_edges, per-frame DC removal,
    pre-emphasis 0.97, 512-point FFT power spectrum, 128 mel bins from 20 Hz to 8 kHz, log with a
    float32-epsilon floor, no dither, no energy (htk_compat then changes nothing).

    Args:
        wave: [..., T] waveform at 16 kHz (any float dtype, any device).
    Returns:
        Tensor [..., frames, 128] with frames = 1 + (T - 400) // 160 (0 when T < 400), in the wave's float dtype.
    """
    if wave.dtype not in (torch.float32, torch.float64):
        wave = wave.float()
    num_samples = wave.shape[-1]
    if num_samples < WINDOW_LENGTH:
        return wave.new_zeros(*wave.shape[:-1], 0, NUM_MEL_BINS)
    # Computed in the wave's precision, as torchaudio does: float32 matches it to ~1e-4 on the same device.
    # (In bins 100+ dB below a pure tone's peak, float32 FFT rounding differs between devices by up to ~0.03
    # in log units, for torchaudio as for us; see docs/benchmarks.md.)
    frames = wave.unfold(-1, WINDOW_LENGTH, WINDOW_SHIFT)  # [..., F, 400]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    # Kaldi's pre-emphasis treats the sample before the first one as the first one itself.
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(WINDOW_LENGTH, periodic=False, device=wave.device, dtype=wave.dtype)
    spectrum = torch.fft.rfft(frames * window, n=FFT_LENGTH)  # [..., F, 257]
    power = spectrum.real.square() + spectrum.imag.square()
    mel_energies = power @ mel_filterbank(wave.device, wave.dtype).T  # [..., F, 128]
    return torch.clamp(mel_energies, min=LOG_FLOOR).log()


def pad_or_crop(fbank: torch.Tensor, target_frames: int = TARGET_FRAMES) -> torch.Tensor:
    """Zero-pad or cut [..., frames, bins] at the end to [..., target_frames, bins] (before normalising, as CAV-MAE)."""
    missing = target_frames - fbank.shape[-2]
    if missing > 0:
        return torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    return fbank[..., :target_frames, :]


def fit_wave(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """A waveform [T] cut or zero-padded at its end to [samples]."""
    return torch.nn.functional.pad(wave[:samples], (0, max(samples - wave.shape[-1], 0)))


def normalize_fbank(fbank: torch.Tensor) -> torch.Tensor:
    return (fbank - FBANK_MEAN) / FBANK_STD


def audio_to_features(path_or_wave: str | Path | torch.Tensor, target_frames: int = TARGET_FRAMES) -> torch.Tensor:
    """CAV-MAE encoder input for one clip: fbank, padded or cropped, then normalised.

    Args:
        path_or_wave: an audio file (read with :func:`load_audio`) or a 16 kHz waveform [T] or [..., T].
    Returns:
        Tensor [target_frames, 128] (or [..., target_frames, 128] for batched waves), float32.
    """
    wave = path_or_wave if isinstance(path_or_wave, torch.Tensor) else load_audio(path_or_wave)
    return normalize_fbank(pad_or_crop(kaldi_fbank(wave), target_frames)).float()


def num_frames(num_samples: int) -> int:
    """Frames :func:`kaldi_fbank` gives for ``num_samples`` samples (snip_edges)."""
    return 0 if num_samples < WINDOW_LENGTH else 1 + (num_samples - WINDOW_LENGTH) // WINDOW_SHIFT


def samples_for_frames(frames: int) -> int:
    """The fewest samples that give ``frames`` fbank frames (the inverse of :func:`num_frames`)."""
    return WINDOW_LENGTH + (frames - 1) * WINDOW_SHIFT
