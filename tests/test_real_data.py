"""Real-data path, end to end on files made here: prepare media -> import original-format weights ->
caption files and evaluate a Clotho-style list, with no manual step."""

import csv
import json

import numpy as np
import pytest
import soundfile
import torch
from helpers import write_mp4

from dali.jsonl import read_jsonl
from dali.models.checkpoints import CheckpointError
from dali.runs import StageStateError, read_manifest
from dali.stages import infer
from dali.tools import caption, import_original, prepare


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    write_mp4(folder / "video_clip.mp4", seconds=12.5)
    t = np.arange(44_100 * 2) / 44_100
    soundfile.write(
        folder / "stereo44k.wav", np.stack([np.sin(2 * np.pi * 300 * t), np.zeros_like(t)], 1) * 0.3, 44_100
    )
    soundfile.write(folder / "mono8k.flac", 0.2 * np.sin(2 * np.pi * 200 * np.arange(8000 * 3) / 8000), 8000)
    soundfile.write(folder / "short48k.ogg", 0.1 * np.random.default_rng(0).standard_normal(4800), 48_000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes((folder / "video_clip.mp4").read_bytes()[:600])
    return folder


@pytest.fixture(scope="module")
def prepared(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert prepare.main([str(media), str(out), "--workers", "2"]) == 0
    return out


def test_prepare_writes_16k_wavs_frames_list_and_report(prepared):
    report = {r["id"]: r for r in read_jsonl(prepared / "prepare_report.jsonl")}
    assert {i for i, r in report.items() if r["status"] == "failed"} == {"empty", "truncated"}
    assert all(r["reason"] for r in report.values() if r["status"] == "failed")
    for clip_id in ("video_clip", "stereo44k", "mono8k", "short48k"):
        info = soundfile.info(prepared / "audio" / f"{clip_id}.wav")
        assert info.samplerate == 16_000 and info.channels == 1
    assert soundfile.info(prepared / "audio" / "stereo44k.wav").duration == pytest.approx(2.0, abs=0.01)
    from PIL import Image

    frames = [Image.open(prepared / "frames" / f"frame_{k}" / "video_clip.jpg") for k in range(10)]
    assert all(frame.size == (224, 224) for frame in frames)
    # the red square moves left to right over the first 10 s: its centre moves right frame after frame
    centres = [np.argwhere(np.asarray(f)[..., 0] > 150)[:, 1].mean() for f in frames]
    assert all(a < b for a, b in zip(centres, centres[1:]))
    assert not (prepared / "frames" / "frame_0" / "stereo44k.jpg").exists()
    listed = json.loads((prepared / "clips.json").read_text())["data"]
    assert sorted(r["video_id"] for r in listed) == ["mono8k", "short48k", "stereo44k", "video_clip"]


def test_prepare_resumes_without_redoing(media, prepared):
    before = (prepared / "audio" / "mono8k.wav").stat().st_mtime_ns
    assert prepare.main([str(media), str(prepared), "--workers", "1"]) == 0
    assert (prepared / "audio" / "mono8k.wav").stat().st_mtime_ns == before
    assert all(r.get("reused") for r in read_jsonl(prepared / "prepare_report.jsonl") if r["status"] == "ok")


def test_import_then_caption_files_and_evaluate_clotho(tiny_llava_dir, original_weights, prepared, media, tmp_path):
    source, encoder = original_weights
    run = tmp_path / "DALI_OT_ATT"
    assert import_original.main([str(source), str(run), "--llava", str(tiny_llava_dir)]) == 0
    for stage in ("align", "distill", "prefix"):
        assert read_manifest(run / stage)["stage"].startswith("import_original")
    assert (run / "align" / "token_weights.safetensors").exists()

    # Clotho-style list: wide captions, file names, audio only (no frames anywhere on this path)
    clotho = tmp_path / "clotho_eval.csv"
    with open(clotho, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name in ("mono8k.wav", "stereo44k.wav", "short48k.wav"):
            writer.writerow([name] + [f"a tone number {i} plays" for i in range(1, 6)])
    assert (
        infer.main(
            [
                "--test-list",
                str(clotho),
                "--audio-dir",
                str(prepared / "audio"),
                "--expe-dir",
                str(tmp_path),
                "--run",
                "DALI_OT_ATT",
                "--max-new-tokens",
                "6",
                "--num-workers",
                "0",
                "--no-sbert",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    predictions = read_jsonl(run / "infer_audio" / "predictions.jsonl")
    assert [p["id"] for p in predictions] == ["mono8k", "stereo44k", "short48k"]
    assert "cider_d" in json.loads((run / "infer_audio" / "scores.json").read_text())["scores"]

    out = tmp_path / "captions.json"
    assert (
        caption.main(
            [
                "--run",
                str(run),
                str(media / "video_clip.mp4"),
                str(media / "mono8k.flac"),
                "--modality",
                "audio_vis",
                "--max-new-tokens",
                "5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    written = json.loads(out.read_text())
    assert [f["file"].split("/")[-1] for f in written["failed"]] == ["mono8k.flac"]  # audio_vis needs a video
    assert "no video stream" in written["failed"][0]["error"] and len(written["captions"]) == 2
    assert (
        caption.main(
            [
                "--run",
                str(run),
                str(media / "video_clip.mp4"),
                str(media / "mono8k.flac"),
                "--max-new-tokens",
                "5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    captions = json.loads(out.read_text())["captions"]
    windows = [(c["file"].split("/")[-1], c["start"]) for c in captions]
    assert windows == [("video_clip.mp4", 0.0), ("video_clip.mp4", 10.24), ("mono8k.flac", 0.0)]
    assert (
        caption.main(
            [
                "--run",
                str(run),
                str(media / "video_clip.mp4"),
                "--modality",
                "audio_vis",
                "--first-window-only",
                "--max-new-tokens",
                "5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert len(json.loads(out.read_text())["captions"]) == 1


def test_import_stops_on_mis_shaped_keys(tiny_llava_dir, original_weights, tmp_path):
    source, _ = original_weights
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "audio_backbone.pth").write_bytes((source / "audio_backbone.pth").read_bytes())
    torch.save(
        {
            "model.mm_projector.0.weight": torch.zeros(32, 48),
            "model.mm_projector.0.bias": torch.zeros(32),
            "model.mm_projector.2.weight": torch.zeros(32, 32),
            "model.mm_projector.2.bias": torch.zeros(32),
        },
        bad / "prefixMLP.bin",
    )
    with pytest.raises(CheckpointError, match="linear_1.weight"):
        import_original.main([str(bad), str(tmp_path / "run"), "--llava", str(tiny_llava_dir)])


def test_public_audiocaps_layout_groups_five_references(tmp_path):
    from dali.data import read_caption_csv

    listing = tmp_path / "test.csv"
    rows = ["audiocap_id,youtube_id,start_time,caption"]
    rows += [f"{i},yt{i // 5},30,caption number {i}" for i in range(10)]
    listing.write_text("\n".join(rows) + "\n")
    clips = read_caption_csv(listing, audio_dir=tmp_path / "audio")
    assert [c.id for c in clips] == ["yt0", "yt1"] and [len(c.captions) for c in clips] == [5, 5]
    assert clips[1].audio == tmp_path / "audio" / "yt1.wav"


def test_import_refuses_a_finished_run_without_overwrite(tiny_llava_dir, original_weights, tmp_path):
    source, _ = original_weights
    run = tmp_path / "run"
    argv = [str(source), str(run), "--llava", str(tiny_llava_dir)]
    assert import_original.main(argv) == 0
    before = {stage: read_manifest(run / stage) for stage in ("align", "distill", "prefix")}
    with pytest.raises(StageStateError, match="--overwrite"):
        import_original.main(argv)
    assert {stage: read_manifest(run / stage) for stage in before} == before
    assert import_original.main(argv + ["--overwrite"]) == 0
    assert all(read_manifest(run / stage)["finished"] for stage in before)


def test_imported_run_captions_as_the_original_with_no_llava_flag(tiny_llava_dir, original_weights, media, tmp_path):
    """After import-original with --llava, `dali caption` and `dali infer` need no --llava, and caption as the
    original's eval_captions_AC.py: llava_v1 prompt, distilled projector for the audio tokens, greedy."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from dali.audio import audio_to_features
    from dali.constants import CONV_MODES
    from dali.models.captioner import QUESTION

    source, encoder = original_weights
    run = tmp_path / "expe" / "DALI_OT_ATT"
    assert import_original.main([str(source), str(run), "--llava", str(tiny_llava_dir)]) == 0
    clip = media / "mono8k.flac"
    out = tmp_path / "captions.json"
    flags = ["--max-new-tokens", "8", "--json", str(out)]
    assert caption.main(["--run", str(run), str(clip), "--conv-mode", "llava_v1", *flags]) == 0
    written = json.loads(out.read_text())
    assert written["llava"] == str(tiny_llava_dir) and written["conv_mode"] == "llava_v1"
    assert caption.main(["--run", str(run), str(clip), *flags]) == 0  # imported runs default to llava_v1
    assert json.loads(out.read_text())["captions"] == written["captions"]

    # the original's computation, written out by hand from its files
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)
    weights = torch.load(source / "prefixMLP.bin")
    projector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    projector.load_state_dict({k.replace("model.mm_projector.", ""): v for k, v in weights.items()})
    with torch.no_grad():
        audio = projector(encoder.eval().project(audio_to_features(clip).unsqueeze(0)))
        embed = llava.get_input_embeddings()
        head = tokenizer(f"{CONV_MODES['llava_v1']} USER: ")["input_ids"]
        tail = tokenizer(f"\n{QUESTION} ASSISTANT:", add_special_tokens=False)["input_ids"]
        embeds = torch.cat([embed(torch.tensor([head])), audio, embed(torch.tensor([tail]))], dim=1)
        ids = llava.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = " ".join(tokenizer.decode(ids[0], skip_special_tokens=True).split())
    assert written["captions"][0]["caption"] == expected

    listing = tmp_path / "list.csv"
    listing.write_text("file_name,caption_1\nmono8k.wav,a tone\n")
    soundfile.write(tmp_path / "mono8k.wav", *soundfile.read(clip))
    infer_flags = ["--run", "DALI_OT_ATT", "--expe-dir", str(tmp_path / "expe"), "--test-list", str(listing)]
    infer_flags += ["--strategy", "greedy", "--max-new-tokens", "8", "--num-workers", "0", "--no-evaluate"]
    assert infer.main(infer_flags) == 0
    predictions = read_jsonl(run / "infer_audio" / "predictions.jsonl")
    assert predictions[0]["caption"] == expected
    assert read_manifest(run / "infer_audio")["inputs"]["conv_mode"] == {"value": "llava_v1"}
    assert read_manifest(run / "infer_audio")["inputs"]["llava"]["path"] == str(tiny_llava_dir)


def test_the_python_api_captions_files_and_waveforms_as_dali_caption(tiny_llava_dir, original_weights, media, tmp_path):
    """``AudioCaptioner.from_run`` (by folder or by name) loads once and gives `dali caption`'s captions, for a file
    and for the same audio as an array; a missing run is a clear error."""
    from dali import AudioCaptioner
    from dali.models.decoding import DecodingOptions
    from dali.run import RunNotFound

    source, _ = original_weights
    run = tmp_path / "expe" / "DALI_OT_ATT"
    assert import_original.main([str(source), str(run), "--llava", str(tiny_llava_dir)]) == 0
    clip, out = media / "video_clip.mp4", tmp_path / "captions.json"
    assert caption.main(["--run", str(run), str(clip), "--max-new-tokens", "8", "--json", str(out)]) == 0
    expected = [(c["start"], c["end"], c["caption"]) for c in json.loads(out.read_text())["captions"]]

    options = DecodingOptions(max_new_tokens=8)
    captioner = AudioCaptioner.from_run("DALI_OT_ATT", expe_dir=tmp_path / "expe", decoding=options, device="cpu")
    assert captioner.models.projector is not None and captioner.models.prefix is None  # distilled, as inference.sh
    assert captioner.caption(clip) == expected and len(expected) == 2
    wave = (0.2 * np.sin(2 * np.pi * 300 * np.arange(16_000 * 3) / 16_000)).astype(np.float32)  # 16 kHz mono
    soundfile.write(tmp_path / "same.wav", wave, 16_000, subtype="FLOAT")
    assert captioner.caption(wave, sample_rate=16_000) == captioner.caption(tmp_path / "same.wav")
    with pytest.raises(RunNotFound, match="no_such_run"):
        AudioCaptioner.from_run("no_such_run", expe_dir=tmp_path / "expe")


def test_a_caption_window_has_the_features_dali_infer_computes_for_that_audio(tmp_path):
    from dali.audio import audio_to_features, samples_for_frames
    from dali.audio_captioner import file_windows

    wave = (0.2 * np.random.default_rng(3).standard_normal(16_000 * 12)).astype(np.float32)
    soundfile.write(tmp_path / "long.wav", wave, 16_000, subtype="FLOAT")
    soundfile.write(tmp_path / "first.wav", wave[: samples_for_frames(1024)], 16_000, subtype="FLOAT")
    windows = file_windows(tmp_path / "long.wav", 1024, first_only=False, min_window=1.0, need_frame=False)
    assert [(w.start, w.end) for w in windows] == [(0.0, 10.24), (10.24, 12.0)]
    first = windows[0].features
    assert torch.allclose(first, audio_to_features(tmp_path / "first.wav"), atol=1e-5)  # the same audio as a clip
    whole = audio_to_features(tmp_path / "long.wav")  # the whole-clip path keeps the first 1024 frames
    assert (first - whole).abs().max() < 1e-3
