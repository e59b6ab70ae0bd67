import numpy as np
import pytest
import soundfile
import torch

from dali import audio
from dali.audio import TORCHAUDIO_FBANK_ARGS, AudioLoadError, audio_to_features, kaldi_fbank, load_audio


def transformers_fbank(wave: np.ndarray) -> np.ndarray:
    """Kaldi fbank through transformers.audio_utils (numpy, float64), CAV-MAE's settings."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    filters = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=128,
        min_frequency=20,
        max_frequency=8000,
        sampling_rate=16000,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    return spectrogram(
        wave,
        window_function(400, "hann", periodic=False),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=filters,
        log_mel="log",
        mel_floor=audio.LOG_FLOOR,
        remove_dc_offset=True,
    ).T


def test_fbank_matches_transformers_audio_utils(rng):
    wave = (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)
    wave -= wave.mean()
    ours = kaldi_fbank(torch.from_numpy(wave)).numpy()
    reference = transformers_fbank(wave.astype(np.float64))
    assert ours.shape == reference.shape == (audio.num_frames(wave.size), 128)
    assert np.abs(ours - reference).max() < 1e-3


def test_fbank_empty_filter_is_log_floor_like_torchaudio(rng):
    # At 16 kHz / 512-point FFT one of the 128 Kaldi filters covers no FFT bin; torchaudio emits log(eps) there.
    empty = (audio.mel_filterbank().sum(dim=1) == 0).nonzero().flatten().tolist()
    assert len(empty) == 1
    features = kaldi_fbank(torch.from_numpy(rng.standard_normal(16000).astype(np.float32)))
    column = features[:, empty[0]]
    assert torch.allclose(column, torch.full_like(column, float(np.log(audio.LOG_FLOOR))))


def test_fbank_batched_equals_per_sample_and_frame_count(rng):
    waves = torch.from_numpy(rng.standard_normal((3, 16000)).astype(np.float32))
    batched = kaldi_fbank(waves)
    assert batched.shape == (3, 1 + (16000 - 400) // 160, 128)
    for i in range(3):
        assert torch.allclose(batched[i], kaldi_fbank(waves[i]), atol=1e-5)
    assert kaldi_fbank(torch.zeros(399)).shape == (0, 128)


@pytest.mark.gpu
def test_fbank_parity_with_torchaudio_on_gpu(rng):
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    wave = torch.from_numpy((0.1 * rng.standard_normal(160_000)).astype(np.float32))
    wave = wave - wave.mean()
    reference = kaldi.fbank(wave.unsqueeze(0), **TORCHAUDIO_FBANK_ARGS)
    ours = kaldi_fbank(wave.cuda()).cpu()
    assert (ours - reference).abs().max() < 1e-3


def test_load_audio_resamples_takes_channel_zero_and_removes_mean(write_wav):
    stereo = write_wav("stereo.wav", rate=44_100, seconds=0.5, channels=2)
    wave = load_audio(stereo)
    assert wave.dtype == torch.float32 and wave.shape == (8000,)
    assert abs(float(wave.mean())) < 1e-6
    data, _ = soundfile.read(str(stereo), dtype="float32")
    # channel 0 has half the amplitude of channel 1 in this file: loudness tells which one was kept
    assert abs(float(wave.std()) - float(data[:, 0].std())) < 0.02


def test_resampled_8k_clip_has_the_same_fbank_as_16k(tmp_path):
    t = np.arange(16000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(tmp_path / "a16.wav", tone, 16000)
    soundfile.write(tmp_path / "a8.flac", tone[::2], 8000)
    low, high = audio_to_features(tmp_path / "a8.flac"), audio_to_features(tmp_path / "a16.wav")
    # a 440 Hz tone: the same peak mel bin and frame count, whatever the file's rate
    assert low.shape == high.shape == (1024, 128)
    assert int(low[50].argmax()) == int(high[50].argmax())


@pytest.mark.parametrize(
    "content,reason", [(None, "no such file"), (b"", "unreadable"), (b"RIFF0000WAVEjunk", "unreadable")]
)
def test_load_audio_errors_name_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioLoadError, match=reason) as error:
        load_audio(path)
    assert str(path) in str(error.value)


def test_load_audio_rejects_empty_clip(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioLoadError, match="no samples"):
        load_audio(path)


def test_audio_to_features_pads_crops_and_normalises():
    short = audio_to_features(torch.zeros(16000))
    assert short.shape == (1024, 128)
    # padded frames are zeros before normalisation, as in CAV-MAE
    assert torch.allclose(short[-1], torch.full((128,), (0 - audio.FBANK_MEAN) / audio.FBANK_STD))
    long = audio_to_features(torch.randn(16000 * 12))
    assert long.shape == (1024, 128)


@pytest.mark.parametrize("seconds", [0.005, 0.5, 10.24, 12.0])
def test_fbank_from_loader_waves_equals_the_loaders_fbank(write_wav, seconds):
    """The GPU path (the loader yields waves, the stage computes the fbank of the batch) gives the features the CPU
    path computes per clip: shorter clips' missing frames zero before normalising, longer clips cut."""
    from dali.data import Clip, ClipDataset, batch_features, collate

    clips = [Clip("a", write_wav("a.wav", seconds=seconds)), Clip("b", write_wav("b.wav", seconds=3.0))]
    fbanks, waves = (
        ClipDataset(clips, need_audio=True, need_image=False, audio_as=kind) for kind in ("features", "wave")
    )
    from_fbanks = batch_features(collate([fbanks[0], fbanks[1]]), torch.device("cpu"))
    from_waves = batch_features(collate([waves[0], waves[1]]), torch.device("cpu"))
    assert from_waves.shape == from_fbanks.shape == (2, 1024, 128)
    torch.testing.assert_close(from_waves, from_fbanks, atol=1e-4, rtol=1e-5)
