"""Every size a flag or a file declares is bounded before anything is allocated from it (issue 26, classes 2 and 6).

One table covers every command's numeric flags; the media cases write small files that declare a huge cost."""

import dataclasses
import importlib
import json
import subprocess
import sys
import typing

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from dali import limits
from dali.flags import ConfigError, _base_type, bounds_of, flag, parse_config
from dali.stage_table import COMMANDS


def _config_class(command: str) -> type:
    return getattr(importlib.import_module("dali.command_configs"), COMMANDS[command].config)


def _numeric_fields(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        base, _ = _base_type(hints[item.name])
        if typing.get_origin(base) in (tuple, list):
            base = typing.get_args(base)[0]
        if base in (int, float):
            found.append((item.name, base))
    return found


def _required_argv(cls: type) -> list[str]:
    """Placeholder values for a command's required flags and positionals, so that parsing reaches the bounds."""
    hints = typing.get_type_hints(cls)
    argv = []
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING or _base_type(hints[item.name])[1]:
            continue
        argv += ["x"] if item.metadata.get("positional") else [flag(item.name), "x"]
    return argv


CASES = [
    (command, name, kind)
    for command in COMMANDS
    for name, kind in _numeric_fields(_config_class(command))
    if name != "device_count"
]


def test_every_numeric_flag_of_every_command_declares_its_bounds():
    unbounded = [
        f"{command} {flag(name)}" for command, name, _ in CASES if bounds_of(_config_class(command), name) is None
    ]
    assert not unbounded, unbounded


def _outside(bounds: tuple[float, float], kind: type) -> list[str]:
    low, high = bounds
    values = ["nan", "inf"] if kind is float else []
    values.append(str(high * 2 + 1 if kind is int else high * 2 + 1.0))
    if low > -1e300:
        values.append(str(low - 1 if kind is int else low - 1.0))
    return values


@pytest.mark.parametrize("command,name,kind", CASES)
def test_a_value_outside_a_flags_bounds_is_an_error_naming_the_flag(command, name, kind):
    cls = _config_class(command)
    for value in _outside(bounds_of(cls, name), kind):
        with pytest.raises(ConfigError, match=flag(name)):
            parse_config(cls, [*_required_argv(cls), flag(name), value])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-size", "0"], "--batch-size must be between 1 and 4096, got 0"),
        (["--num-beams", "0"], "--num-beams must be between 1 and 64"),
        (["--num-beams", "100000"], "--num-beams must be between 1 and 64"),
        (["--seed", str(2**64)], "--seed must be between 0 and"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be between 1 and 1024"),
        (["--max-seconds", "1e9"], "--max-seconds must be between"),
    ],
)
def test_caption_flags_out_of_bounds_are_one_line_and_status_2(argv, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dali.cli", "caption", "--run", "nowhere", "a.wav", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr


def test_the_decoding_options_of_the_api_are_bounded_as_the_flags():
    from dali.models.decoding import DecodingOptions

    for options in ({"num_beams": 100_000}, {"max_new_tokens": 0}, {"temperature": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(options))):
            DecodingOptions(**options)


def _wav_declaring(path, rate: int, seconds: float = 0.5, channels: int = 1):
    """A short wav whose header declares ``rate``: written at 16 kHz, then its rate fields patched."""
    soundfile.write(str(path), np.zeros((8000, channels), np.float32), 16_000)
    data = bytearray(path.read_bytes())
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = min(rate * 4 * channels, 2**32 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("rate", [10_000_000, 2**31 - 1, 1])
def test_a_wav_that_declares_an_absurd_rate_is_refused_before_resampling(tmp_path, rate):
    from dali.audio import AudioLoadError, load_audio

    path = _wav_declaring(tmp_path / "loud.wav", rate)
    assert path.stat().st_size < 40_000
    with pytest.raises(AudioLoadError, match="sample rate"):
        load_audio(path)


def test_a_wav_that_declares_too_many_channels_is_refused(tmp_path):
    from dali.audio import AudioLoadError, load_audio

    path = tmp_path / "many.wav"
    soundfile.write(str(path), np.zeros((100, limits.MAX_CHANNELS + 1), np.float32), 16_000)
    with pytest.raises(AudioLoadError, match="channels"):
        load_audio(path)


def test_a_long_file_is_read_only_up_to_its_bound(tmp_path, write_wav):
    from dali.audio import load_audio

    path = write_wav("long.wav", rate=8000, seconds=30.0)
    wave = load_audio(path, max_seconds=5.0)
    assert wave.numel() <= 16_000 * 5 + 1


def test_a_clip_that_runs_out_of_memory_is_a_skipped_clip_not_the_stages_end(tmp_path, write_wav, monkeypatch):
    """MemoryError (here forced, as a 2^31-1 Hz wav raised it) is that clip's BadClip; the others still load."""
    from dali import data
    from dali.data import BadClip, Clip, ClipDataset

    good = write_wav("good.wav")
    absurd = _wav_declaring(tmp_path / "absurd.wav", 2**31 - 1)
    starving = write_wav("starving.wav")
    real = data.load_audio

    def load(path, *args, **kwargs):
        if "starving" in str(path):
            raise MemoryError
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_audio", load)
    clips = [Clip(id=p.stem, audio=p) for p in (good, absurd, starving)]
    dataset = ClipDataset(clips, need_audio=True, need_image=False, on_error="skip")
    items = [dataset[i] for i in range(3)]
    assert not isinstance(items[0], BadClip)
    assert isinstance(items[1], BadClip) and "sample rate" in items[1].reason
    assert isinstance(items[2], BadClip) and "memory" in items[2].reason


def _video(path, width: int, height: int, frames: int = 3):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            picture = np.full((height, width, 3), 40 * index % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_large_video_frames_are_shrunk_as_they_are_decoded(tmp_path):
    from dali.media import FIT_SIDE, decode_frames

    frames = decode_frames(_video(tmp_path / "big.mp4", 2048, 1024), [0.0, 0.3])
    assert len(frames) == 2 and all(max(frame.size) <= FIT_SIDE for frame in frames)
    assert frames[0].size == (FIT_SIDE, FIT_SIDE // 2)


def test_a_video_that_declares_frames_beyond_the_bound_is_refused(tmp_path, monkeypatch):
    from dali.media import MediaError, decode_frames

    path = _video(tmp_path / "wide.mp4", 256, 128)
    monkeypatch.setattr(limits, "MAX_FRAME_SIDE", 200)
    with pytest.raises(MediaError, match="256x128"):
        decode_frames(path, [0.0])


def test_an_image_that_declares_too_many_pixels_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    from PIL import Image

    from dali import data
    from dali.data import Clip, ClipError, load_frame

    path = tmp_path / "frame.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(limits, "MAX_FRAME_SIDE", 200)
    with pytest.raises(ClipError, match="300x300"):
        load_frame(Clip(id="c", image=path))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 300 * 300 - 1)
    monkeypatch.setattr(limits, "MAX_FRAME_SIDE", 8192)
    with pytest.raises(ClipError, match="in all"):
        load_frame(Clip(id="c", image=path))


def test_bounds_are_documented(tmp_path):
    """docs/reliability.md shows the media bounds with the figures the code uses."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    for figure in (limits.MAX_SAMPLE_RATE, limits.MIN_SAMPLE_RATE, limits.MAX_CHANNELS, limits.MAX_FRAME_SIDE):
        assert f"{figure:,}" in text or str(figure) in text
    assert json.dumps(limits.MAX_CLIP_SECONDS) in text or f"{limits.MAX_CLIP_SECONDS:g}" in text


# -- model files and configs are checked before anything is built from them ----------------------------------------
_PEAK = """
import resource, sys
sys.path.insert(0, {tests!r})
try:
    exec(sys.argv[1])
    print("loaded")
except Exception as error:
    print(type(error).__name__, error)
print("peak_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _probe(code: str) -> tuple[str, int]:
    """Run ``code`` in a fresh process: (what it printed, its peak RSS in MB)."""
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _PEAK.format(tests=str(Path(__file__).parent)), code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("peak_mb"), done.stderr[-2000:]
    return "\n".join(lines[:-1]), int(lines[-1].split()[1])


def test_an_encoder_file_describing_a_huge_model_is_refused_before_it_is_built(tmp_path):
    """1.4 KB of metadata describing a 77 GB AST was built before any tensor was checked."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dali.models.audio_encoders import ENCODER_METADATA_KEY, new_encoder, save_encoder

    path = tmp_path / "audio_encoder.safetensors"
    save_encoder(new_encoder("ast", 48, 32, 2, 2), path)
    with safe_open(str(path), framework="pt") as handle:
        state, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    described = json.loads(metadata[ENCODER_METADATA_KEY])
    described["config"].update(hidden_size=16_384, num_hidden_layers=96, intermediate_size=65_536)
    save_file(state, str(path), metadata={ENCODER_METADATA_KEY: json.dumps(described)})
    printed, peak = _probe(f"from dali.models.audio_encoders import load_encoder; load_encoder({str(path)!r})")
    assert printed.startswith("CheckpointError") and "describes a model its tensors do not fit" in printed
    assert peak < 2_000, peak


def test_an_init_encoder_folder_whose_config_declares_a_huge_model_is_refused_before_it_is_built(tmp_path):
    from test_audio_encoders import _save_released

    folder = tmp_path / "released"
    _save_released("hubert", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=8_192, num_hidden_layers=128, intermediate_size=32_768, num_attention_heads=64)
    (folder / "config.json").write_text(json.dumps(config))
    code = (
        f"from dali.models.audio_encoders import pretrained_encoder; pretrained_encoder('hubert', {str(folder)!r}, 48)"
    )
    printed, peak = _probe(code)
    assert printed.startswith("CheckpointError") and "parameters; its weight files hold" in printed, printed
    assert peak < 2_000, peak


def test_a_description_of_a_million_layers_is_refused_before_it_is_built_even_on_the_meta_device(tmp_path):
    """Checking a described model built it on the meta device: no tensor memory, but one module per layer."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_audio_encoders import _save_released

    from dali.models.audio_encoders import ENCODER_METADATA_KEY, new_encoder, save_encoder

    folder = tmp_path / "released"
    _save_released("hubert", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1_000_000)))
    path = tmp_path / "audio_encoder.safetensors"
    save_encoder(new_encoder("hubert", 48, 32, 2, 2), path)
    with safe_open(str(path), framework="pt") as handle:
        state, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    described = json.loads(metadata[ENCODER_METADATA_KEY])
    described["config"]["num_hidden_layers"] = 1_000_000
    save_file(state, str(path), metadata={ENCODER_METADATA_KEY: json.dumps(described)})
    for code in (
        f"from dali.models.audio_encoders import pretrained_encoder; pretrained_encoder('hubert', {str(folder)!r}, 48)",
        f"from dali.models.audio_encoders import load_encoder; load_encoder({str(path)!r})",
    ):
        printed, peak = _probe(code)
        assert printed.startswith("CheckpointError") and "'num_hidden_layers' = 1000000 (at most 256)" in printed
        assert peak < 2_000, peak


def test_a_torch_checkpoint_with_a_compressed_record_is_refused_before_it_is_inflated(tmp_path):
    """2 MB of DEFLATE inflated to 2.4 GB before any key or size check."""
    import zipfile

    import torch

    from dali.models.checkpoints import CheckpointError, read_state_dict

    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1000)}, plain)
    assert read_state_dict(plain)[0]["w"].shape == (1000,)
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record.filename))
    with pytest.raises(CheckpointError, match="has compressed records"):
        read_state_dict(packed)


_ALIASES = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(12)
)


def test_yaml_with_aliases_is_refused_before_it_expands(tmp_path):
    """A few hundred bytes expanded to tens of millions of strings when an error message printed the value."""
    from dali.runs import Stage, StageStateError

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_ALIASES + "lr: *m\n")
    done = subprocess.run(
        [sys.executable, "-m", "dali.cli", "prefix-tune", "--config", str(bomb), "--llava", "x", "--pairs", "p"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "uses YAML anchors or aliases" in done.stderr and len(done.stderr) < 1000
    stage = Stage(tmp_path / "stage", "test")
    stage.save_config({"lr": 1.0})
    stage.metrics().log(step=1)
    stage.close()
    (tmp_path / "stage" / "config.yaml").write_text(_ALIASES + "lr: *m\n")  # a stage's config, on --resume
    with pytest.raises(StageStateError, match="is not a dali test stage folder"):
        Stage(tmp_path / "stage", "test", resume=True)


def test_values_printed_in_errors_are_shortened():
    from dali.errors import shown

    assert len(shown("x" * 10**6)) <= 80 and len(shown([[1] * 10**6] * 10**3)) <= 80
    assert "too large" in shown(10**5000) if sys.get_int_max_str_digits() else True


# -- decoding is linear in what the file holds -------------------------------------------------------------------
def _packets(path, count: int, samples: int = 2):
    """A Matroska file of ``count`` PCM packets of ``samples`` samples each."""
    import av

    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=16_000, layout="mono")
        for index in range(count):
            frame = av.AudioFrame.from_ndarray(
                np.full((1, samples), index % 100, np.int16), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts = 16_000, index * samples
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_audio_decoding_time_grows_linearly_with_the_packets(tmp_path):
    """The kept length was re-summed for every packet: 320 KB of 2-sample packets took 27 s, 640 KB 327 s."""
    import time

    from dali.media import MediaError, decode_audio

    seconds = []
    for count in (10_000, 20_000):  # 20 and 40 s of 32-sample packets: 500 per second, as dense as real codecs
        path = _packets(tmp_path / f"p{count}.mkv", count, samples=32)
        start = time.perf_counter()
        wave = decode_audio(path, max_seconds=600.0)
        seconds.append(time.perf_counter() - start)
        assert wave.size == count * 32
    assert seconds[1] / seconds[0] < 3.0, seconds  # linear: 2; quadratic: 4
    dense = _packets(tmp_path / "dense.mkv", 40_000)  # 2-sample packets: 8,000 per second
    start = time.perf_counter()
    with pytest.raises(MediaError, match="more than 1000 audio packets per second"):
        decode_audio(dense, max_seconds=600.0)
    assert time.perf_counter() - start < seconds[0]  # refused after its first packets


def test_a_video_with_more_frames_per_second_than_any_camera_is_refused(tmp_path):
    from dali.media import MediaError, decode_frames

    path = _video(tmp_path / "fast.mp4", 16, 16, frames=40)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dali.media.MAX_FRAME_RATE", 2)  # the file is 5 fps
        with pytest.raises(MediaError, match="more than 2 frames per second"):
            decode_frames(path, [7.0])
    assert len(decode_frames(path, [7.0])) == 1


def test_a_stream_count_beyond_the_bound_is_refused(tmp_path):
    from dali.media import MediaError, decode_audio

    path = _packets(tmp_path / "one.mkv", 100, samples=160)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dali.media.MAX_STREAMS", 0)
        with pytest.raises(MediaError, match="declares 1 streams"):
            decode_audio(path)


def test_a_list_whose_id_is_a_5000_digit_number_is_a_data_error(tmp_path):
    """A ValueError from the number's conversion escaped as a traceback, or the parser crashed the process."""
    from dali.data import DataError, read_cavmae_json

    big = tmp_path / "clips.json"
    big.write_text('{"data": [{"video_id": ' + "9" * 5000 + ', "wav": "a.wav"}]}')
    for _ in range(20):  # ijson's C backend crashed the process now and then (SystemError, segmentation fault)
        with pytest.raises(DataError, match="holds a run of 1000 digits or more"):
            read_cavmae_json(big)
    digits = tmp_path / "digits.json"
    head = '{"data": [{"video_id": 12, "wav": "'
    digits.write_text(head + "a" * (65_536 - 600 - len(head)) + "1" * 1_200 + '.wav"}]}')  # across ijson's 64 KiB reads
    with pytest.raises(DataError, match="holds a run of"):  # one run across two reads is a run too
        read_cavmae_json(digits)


@pytest.mark.slow
def test_dali_caption_keeps_memory_flat_over_many_long_files(pipeline, tmp_path, write_wav):
    """Every window of every file was computed before the first caption: memory grew with the files."""
    run = pipeline[2]
    long_clip = write_wav("long.wav", seconds=60.0)
    peaks = []
    for count in (2, 20):
        files = [str(long_clip)] * count
        code = (
            "from dali.cli import main; import sys; "
            f"sys.argv = ['dali', 'caption', '--run', {str(run)!r}, '--max-new-tokens', '2', *{files!r}]; main()"
        )
        printed, peak = _probe(code)
        assert "Error" not in printed, printed
        peaks.append(peak)
    assert peaks[1] < peaks[0] + 60, peaks  # 18 more minutes of audio: no more memory


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(st.tuples(st.integers(0, 2500), st.sampled_from([b"a", b",", b"a,\n"])), min_size=1, max_size=12),
    size=st.sampled_from([1, 7, 999, 1000, 1001, 4096, 65536, -1]),
)
def test_the_digit_run_guard_finds_a_long_run_wherever_the_chunks_cut(runs, size):
    """The guard looks at a sample of each chunk's bytes: it must refuse exactly the streams that hold a run of
    MAX_DIGITS digits, however the reads cut them."""
    import io
    import re
    from pathlib import Path

    from dali.data import MAX_DIGITS, DataError, _NoLongDigitRuns

    blob = b"".join(b"5" * count + sep for count, sep in runs)
    stream = _NoLongDigitRuns(io.BytesIO(blob), Path("list.json"))
    try:
        while stream.read(size):
            pass
        refused = False
    except DataError:
        refused = True
    assert refused == (re.search(rb"[0-9]{%d}" % MAX_DIGITS, blob) is not None)
