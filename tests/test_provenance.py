"""Every result knows what it came from: loads, resumes and reuses check identity by content, never by name or path
(issue 39). Each test names the wrong result the code gave before."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import align_flags, prefix_flags

from dali.runs import IntegrityError, Stage, StageStateError


def flip_last_byte(path: Path) -> None:
    """One byte of a weight's data (the last byte of the file: past the safetensors header), changed."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def relative_run(synthetic, tmp_path_factory):
    """A run whose stages were given LLaVA by a relative path (``--llava captioner``, from the folder holding it):
    (LLaVA, run)."""
    from dali.stages import align, prefix_tune

    world, llava = synthetic
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(llava, home / "captioner")
    run = home / "expe" / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        assert prefix_tune.main([*prefix_flags(world, Path("captioner"), 4), "--out", str(run / "prefix")]) == 0
        assert align.main(align_flags(world, Path("captioner")) + ["--out", str(run / "align")]) == 0
    return home / "captioner", run


@pytest.fixture
def run_copy(relative_run, tmp_path):
    copy = tmp_path / "copied_run"
    shutil.copytree(relative_run[1], copy)
    return copy


def test_a_changed_byte_in_a_trained_file_is_refused_at_load_unless_allowed(run_copy, write_wav, caplog):
    """It loaded and captioned silently."""
    from dali.audio_captioner import AudioCaptioner

    encoder = run_copy / "align" / "audio_encoder.safetensors"
    flip_last_byte(encoder)
    with pytest.raises(IntegrityError, match=f"'{encoder}' is not the file its stage wrote"):
        AudioCaptioner.from_run(run_copy)
    captioner = AudioCaptioner.from_run(run_copy, allow_modified=True)
    assert "used anyway (--allow-modified)" in caplog.text and captioner.caption(write_wav("c.wav", seconds=2.0))
    done = subprocess.run(
        [sys.executable, "-m", "dali.cli", "caption", "--run", str(run_copy), str(write_wav("d.wav", seconds=2.0))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(encoder) in done.stderr and "--allow-modified" in done.stderr


def caption_from(folder: Path, run: Path, clip: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dali.cli", "caption", "--run", str(run), str(clip), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=300,
    )


def test_a_run_copied_elsewhere_captions_with_its_own_llava_from_any_folder(
    relative_run, run_copy, tiny_llava_dir, tmp_path, write_wav
):
    """From another folder, the LLaVA recorded as 'captioner' was whatever 'captioner' was there."""
    llava, run = relative_run
    clip = write_wav("clip.wav", seconds=3.0)
    in_place = caption_from(run.parent.parent, run, clip)
    assert in_place.returncode == 0, in_place.stderr
    third = tmp_path / "third"
    shutil.copytree(tiny_llava_dir, third / "captioner")  # another LLaVA at the path as it was typed
    copied = caption_from(third, run_copy, clip)
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout == in_place.stdout and copied.stdout.strip()
    original = (llava / "config.json").read_bytes()
    config = json.loads(original)
    (llava / "config.json").write_text(json.dumps(dict(config, note="edited")))  # not the LLaVA it was made with
    try:
        changed = caption_from(third, run_copy, clip)
        assert changed.returncode == 2 and "is not the LLaVA this run was made with" in changed.stderr
        assert "--allow-modified" in changed.stderr
        moved = llava.rename(llava.with_name("moved"))
        gone = caption_from(third, run_copy, clip)
        assert gone.returncode == 2 and f"the LLaVA this run was made with, '{llava}', is not there" in gone.stderr
    finally:
        if not llava.exists():
            moved.rename(llava)
        (llava / "config.json").write_bytes(original)


def test_resume_refuses_an_input_that_changed_since_the_run_started(tmp_path):
    """An infer run stopped at clip 6, align/ replaced (align --overwrite), --resume: two encoders' captions."""

    def finished(path: Path, text: str) -> Path:
        stage = Stage(path, "align", overwrite=path.exists())
        stage.save_config({})
        (path / "audio_encoder.safetensors").write_text(text)
        stage.finish({}, outputs=["audio_encoder.safetensors"])
        stage.close()
        return path

    align = finished(tmp_path / "run" / "align", "first encoder")
    stage = Stage(tmp_path / "run" / "infer_audio", "infer")
    stage.save_config({"lr": 1})
    stage.add_input("align_dir", align)
    stage.close()  # stopped before finishing
    recorded = json.loads((tmp_path / "run" / "infer_audio" / "inputs.json").read_text())
    assert recorded["align_dir"]["path"] == str(align) and recorded["align_dir"]["in_run"] == "align"
    stage = Stage(tmp_path / "run" / "infer_audio", "infer", resume=True)
    stage.save_config({"lr": 1})
    stage.add_input("align_dir", align)  # the same input: resumed
    stage.close()
    finished(align, "second encoder")
    stage = Stage(tmp_path / "run" / "infer_audio", "infer", resume=True)
    stage.save_config({"lr": 1})
    with pytest.raises(StageStateError, match="--resume: --align-dir .* is not the input .* started with"):
        stage.add_input("align_dir", align)
    stage.close()
    resumed_elsewhere = Stage(tmp_path / "run" / "infer_audio", "infer", overwrite=True)
    resumed_elsewhere.save_config({"lr": 1})
    resumed_elsewhere.add_input("align_dir", Path(os.path.relpath(align)))  # a fresh start takes the new one
    resumed_elsewhere.close()


def test_prepare_reuses_a_clip_only_when_its_source_and_settings_are_the_ones_it_was_made_from(tmp_path, write_wav):
    """A new --max-seconds, a changed source and another dataset's file of the same name were all 'ok, reused'."""
    import soundfile

    from dali.tools import prepare

    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "prepared"
    for folder, seconds in ((first, 2.0), (second, 3.0)):
        folder.mkdir()
        shutil.copy(write_wav("x.wav", seconds=seconds), folder / "clip.wav")

    def prepared(source: Path, *flags: str) -> dict:
        assert prepare.main([str(source), str(out), "--workers", "1", *flags]) == 0
        (record,) = [json.loads(line) for line in (out / "prepare_report.jsonl").read_text().splitlines()]
        return record | {"frames": soundfile.info(str(out / "audio" / "clip.wav")).frames}

    assert prepared(first)["frames"] == 32000
    assert prepared(first)["reused"] is True
    again = prepared(first, "--max-seconds", "1.0")
    assert again["frames"] == 16000 and again["redone"] == "made with other settings (--max-seconds)"
    other = prepared(second, "--max-seconds", "1.0")
    assert other["redone"] == f"made from another file, '{first / 'clip.wav'}'" and "reused" not in other
    shutil.copy(write_wav("y.wav", seconds=0.5), second / "clip.wav")  # the same file, re-encoded shorter
    changed = prepared(second, "--max-seconds", "1.0")
    assert changed["redone"] == "its source file changed since" and changed["frames"] == 8000


def test_what_audio_libraries_return_is_read_as_the_file_is(relative_run, tmp_path):
    """int16 was not scaled, [T, 2] was interleaved into two windows, 22.05 kHz was taken as 16 kHz."""
    import numpy as np
    import soundfile
    import torch

    from dali.audio import WaveformError
    from dali.audio_captioner import AudioCaptioner

    captioner = AudioCaptioner.from_run(relative_run[1], device="cpu")
    rate = 22_050
    t = np.arange(int(rate * 10.0)) / rate
    left = 0.3 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, 0.5 * np.sin(2 * np.pi * 97 * t)], axis=1)  # [T, 2], as soundfile reads it
    soundfile.write(tmp_path / "clip.wav", stereo, rate, subtype="PCM_16")
    expected = captioner.windows(tmp_path / "clip.wav")
    int16, _ = soundfile.read(tmp_path / "clip.wav", dtype="int16")  # as scipy.io.wavfile returns it
    as_read, _ = soundfile.read(tmp_path / "clip.wav")
    for samples in (int16, as_read, as_read.T, torch.from_numpy(as_read.T.copy())):
        windows = captioner.windows(samples, sample_rate=rate)
        assert len(windows) == len(expected) == 1
        assert torch.allclose(windows[0].features, expected[0].features, atol=1e-4)
    cases = {
        "needs its sample_rate": dict(sample_rate=None),
        "NaN or infinite": dict(samples=np.array([0.1, np.nan] * 8000)),
        "holds no samples": dict(samples=np.zeros(0)),
        "cannot tell channels from samples": dict(samples=np.zeros((40, 40))),
        "sample_rate: it declares a sample rate of 16 Hz": dict(sample_rate=16),
        "integer or float samples": dict(samples=np.array(["a"] * 100)),
    }
    for message, case in cases.items():
        with pytest.raises(WaveformError, match=message):
            captioner.windows(case.get("samples", as_read), sample_rate=case.get("sample_rate", rate))


def test_a_llava_folder_whose_weights_do_not_fit_its_config_is_refused(tiny_llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from dali.errors import ModelLoadError
    from dali.models.captioner import Captioner

    broken = tmp_path / "llava"
    shutil.copytree(tiny_llava_dir, broken)
    (weights,) = broken.glob("*.safetensors")
    state = load_file(str(weights))
    dropped = next(key for key in sorted(state) if "language_model" in key)
    state.pop(dropped)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="its config describes for the LLaVA captioner: missing keys \\["):
        Captioner.from_pretrained(broken)


def test_the_prompt_and_llava_are_inputs_and_runs_that_kept_them_as_metrics_still_load(relative_run, tmp_path):
    """A run records its LLaVA and prompt as manifest inputs (#42); a run written before, which kept them as
    metrics, loads from there: its folders rewritten here to that format (the LLaVA typed, the prompt a metric)."""
    from dali.audio_captioner import AudioCaptioner
    from dali.run import Run
    from dali.runs import MANIFEST

    llava, run = relative_run
    assert json.loads((run / "prefix" / MANIFEST).read_text())["inputs"]["conv_mode"] == {"value": "v1"}
    assert "llava" not in json.loads((run / "align" / MANIFEST).read_text())["metrics"]
    assert Run.find(run).conv_mode() == "v1" and Run.find(run).llava() == str(llava)

    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    for stage in ("prefix", "align"):
        manifest = json.loads((old / stage / MANIFEST).read_text())
        manifest["inputs"].pop("llava"), manifest["inputs"].pop("conv_mode", None)
        manifest["metrics"] |= {"llava": str(llava)} | ({"conv_mode": "llava_v1"} if stage == "prefix" else {})
        (old / stage / MANIFEST).write_text(json.dumps(manifest))
    found = Run.find(old)
    assert found.llava() == str(llava) and found.conv_mode() == "llava_v1"
    captioner = AudioCaptioner.from_run(old, device="cpu")
    described = captioner.describe()
    assert described["conv_mode"] == "llava_v1" and described["llava"] == str(llava)
