"""Captions in the formats people use (#47): txt, json, srt, vtt and tsv for a file or a folder, parsed back by
strict readers; a folder walk that reports bad files, resumes after a kill and never writes an output twice; and
windows batched together caption as they do alone."""

import csv
import io
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch

from dali.caption_formats import FORMATS, render
from dali.cli import main as dali

SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")
VTT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


def _seconds(parts) -> tuple[float, float]:
    h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, parts)
    return h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000


def read_cues(text: str, fmt: str) -> list[tuple[float, float, str]]:
    """A strict reader of what we write: SubRip (numbered cues from 1) or WebVTT (its header first); each cue a
    time line and one line of text, cues apart by one blank line. Anything else fails."""
    if fmt == "vtt":
        assert text.startswith("WEBVTT\n\n"), text[:40]
        text = text[len("WEBVTT\n\n") :]
    assert text.endswith("\n") and not text.endswith("\n\n\n")
    cues = []
    for number, block in enumerate(text.rstrip("\n").split("\n\n"), 1):
        lines = block.split("\n")
        if fmt == "srt":
            assert lines[0] == str(number), block
            lines = lines[1:]
        assert len(lines) == 2 and lines[1].strip() == lines[1] and lines[1], block
        match = (SRT_TIME if fmt == "srt" else VTT_TIME).match(lines[0])
        assert match, lines[0]
        cues.append((*_seconds(match.groups()), lines[1]))
    return cues


RECORDS = [
    {"start": 0.0, "end": 10.24, "caption": "a dog barks", "modality": "audio"},
    {"start": 10.24, "end": 20.48, "caption": "a bell\nrings\tthen", "modality": "audio"},
    {"start": 20.48, "end": 3723.5, "caption": "water flows", "modality": "audio_vis"},
]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse_back_to_the_records(fmt):
    cues = read_cues(render(RECORDS, fmt), fmt)
    assert [(s, e) for s, e, _ in cues] == [(r["start"], r["end"]) for r in RECORDS]
    assert [text for _, _, text in cues] == ["a dog barks", "a bell rings then", "water flows"]


def test_tsv_json_and_txt_parse_back_to_the_records():
    rows = list(csv.DictReader(io.StringIO(render(RECORDS, "tsv")), delimiter="\t"))
    assert [(int(r["start"]), int(r["end"]), r["modality"], r["caption"]) for r in rows] == [
        (0, 10240, "audio", "a dog barks"),
        (10240, 20480, "audio", "a bell rings then"),
        (20480, 3723500, "audio_vis", "water flows"),
    ]
    assert json.loads(render(RECORDS, "json", {"conv_mode": "v1"}))["captions"][2]["modality"] == "audio_vis"
    assert render(RECORDS, "txt").splitlines() == ["a dog barks", "a bell rings then", "water flows"]


def _wav(path, seconds, seed):
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(16_000 * seconds)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, 16_000, subtype="PCM_16")


@pytest.fixture
def folder(tmp_path):
    """50 files: 48 wavs of 2 s (a third of them in a subfolder), and two that do not decode."""
    root = tmp_path / "clips"
    for index in range(48):
        _wav(root / ("sub" if index % 3 == 0 else ".") / f"clip{index:02d}.wav", 2.0, index)
    (root / "empty.wav").write_bytes(b"")
    (root / "sub" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    return root


def test_a_folder_walk_writes_every_format_reports_bad_files_and_resumes_after_a_kill(pipeline, folder, tmp_path):
    run = pipeline[2]
    out = tmp_path / "captions"
    command = [sys.executable, "-m", "dali.cli", "caption", "--run", str(run), str(folder), "-r"]
    command += ["--output-dir", str(out), "--output-format", "all"]
    walk = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    while len(list(out.rglob("*.tsv"))) < 10 and walk.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    walk.send_signal(signal.SIGKILL)  # half-way
    walk.wait()
    made = [path for path in out.rglob("*") if path.suffix.lstrip(".") in FORMATS]
    whole = {
        stem for stem in {p.with_suffix("") for p in made} if all(stem.with_suffix(f".{f}").exists() for f in FORMATS)
    }
    # a set the kill cut between two of its files is redone whole: only whole sets must be left as they are
    before = {path: path.stat().st_mtime_ns for path in made if path.with_suffix("") in whole}
    assert 10 * len(FORMATS) <= len(made) and len(before) < 48 * len(FORMATS)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [path for path in out.rglob("*") if path.suffix.lstrip(".") in FORMATS]
    assert len(outputs) == 48 * len(FORMATS)
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in before.items())  # none written twice
    assert len(list((out / "sub").glob("*.srt"))) == 16  # the subfolders kept
    report = [json.loads(line) for line in (out / "caption_report.jsonl").read_text().splitlines()]
    assert sorted(record["file"].rsplit("/", 1)[-1] for record in report) == ["broken.mp4", "empty.wav"]
    for name in ("clip01", "sub/clip03"):
        cues = read_cues((out / f"{name}.srt").read_text(), "srt")
        assert cues[0][0] == 0.0 and cues[-1][1] == pytest.approx(2.0)  # the file, covered from its start
        assert all(end == start for (_, end, _), (start, _, _) in zip(cues, cues[1:]))  # in order, no gap
        assert json.loads((out / f"{name}.json").read_text())["captions"][0]["modality"] == "audio"
    skipped = subprocess.run([*command, "--glob", "clip0*"], capture_output=True, text=True, timeout=900)
    assert skipped.returncode == 0 and "already have their outputs" in skipped.stderr


def test_two_inputs_that_would_write_the_same_output_are_refused(pipeline, tmp_path, capsys):
    for index, sub in enumerate(("a", "b")):
        _wav(tmp_path / sub / "same.wav", 1.0, index)
    argv = ["caption", "--run", str(pipeline[2]), str(tmp_path / "a" / "same.wav"), str(tmp_path / "b" / "same.wav")]
    assert dali([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert "would both write 'same.*'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_windows_batched_with_other_files_windows_caption_as_they_do_alone(pipeline, tmp_path):
    """The first token's logits of each window, alone and in a batch of windows of three files (a short last
    window among them), agree within float32 noise, and so do the greedy captions."""
    from dali import AudioCaptioner
    from dali.models.decoding import DecodingOptions

    for index, seconds in enumerate((23.0, 5.0, 12.0)):
        _wav(tmp_path / f"f{index}.wav", seconds, 10 + index)
    captioner = AudioCaptioner.from_run(pipeline[2], decoding=DecodingOptions(strategy="greedy"), device="cpu")
    windows = [w for i in range(3) for w in captioner.windows(tmp_path / f"f{i}.wav", False, 1.0, 600.0)]
    assert len(windows) == 6 and windows[2].end - windows[2].start < 10.24  # 23 s: the third window is short
    models = captioner.models

    def first_logits(batch):
        block = models.block(torch.stack([w.features for w in batch]))
        inputs = models.captioner.build_inputs(block)
        with torch.no_grad():
            return models.captioner.llava(**inputs).logits[:, -1].float()

    together = first_logits(windows)
    for index, window in enumerate(windows):
        torch.testing.assert_close(together[index], first_logits([window])[0], atol=1e-4, rtol=0)
    batched = [caption for _, caption in captioner.iter_captions(windows, batch_size=6)]
    assert batched == [caption for _, caption in captioner.iter_captions(windows, batch_size=1)]


def test_the_api_gives_the_records_the_command_writes(pipeline, tmp_path):
    from dali import AudioCaptioner
    from dali.models.decoding import DecodingOptions

    _wav(tmp_path / "a.wav", 12.0, 7)
    argv = ["caption", "--run", str(pipeline[2]), str(tmp_path / "a.wav"), "--output-dir", str(tmp_path / "out")]
    assert dali([*argv, "--output-format", "all"]) == 0
    captioner = AudioCaptioner.from_run(pipeline[2], decoding=DecodingOptions(strategy="greedy"), device="cpu")
    records = captioner.records(tmp_path / "a.wav")
    assert len(records) == 2 and records == json.loads((tmp_path / "out" / "a.json").read_text())["captions"]
    for fmt in ("srt", "vtt", "tsv", "txt"):
        assert render(records, fmt) == (tmp_path / "out" / f"a.{fmt}").read_text()


def test_a_file_that_dali_did_not_write_is_never_written_over_without_overwrite(pipeline, tmp_path):
    """An output name taken by the user's own file is refused (a report line); a set a killed walk left
    half-written (its JSON ours, written first) is completed."""
    for index, name in enumerate(("notes", "half")):
        _wav(tmp_path / "in" / f"{name}.wav", 1.5, index)
    out = tmp_path / "out"
    argv = ["caption", "--run", str(pipeline[2]), str(tmp_path / "in"), "--output-dir", str(out)]
    assert dali([*argv, "--output-format", "all", "--glob", "half*"]) == 0
    (out / "half.srt").unlink()  # as a kill between two of its files leaves it
    (out / "notes.txt").write_text("my own notes\n")
    assert dali([*argv, "--output-format", "all"]) == 0
    assert (out / "notes.txt").read_text() == "my own notes\n" and not (out / "notes.srt").exists()
    report = [json.loads(line) for line in (out / "caption_report.jsonl").read_text().splitlines()]
    assert [r["file"].rsplit("/", 1)[-1] for r in report] == ["notes.wav"] and "--overwrite" in report[0]["error"]
    assert (out / "half.srt").is_file()
    assert dali([*argv, "--output-format", "all", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() != "my own notes\n"  # asked for
