"""The README's command flows, run as written: every command below must appear word for word in README.md, and
runs in a sandbox folder laid out as the README assumes (the repository's scripts, configs and .venv linked in,
its data and weights made here, tiny). Only the LLaVA hub id is replaced, by a tiny LLaVA saved in its format."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import original_layout, write_mp4

from dali.jsonl import read_jsonl
from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig
from dali.runs import read_manifest
from dali.synthetic.build import CAPTIONER_FOLDER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
LINKED = ("Makefile", "requirements.txt", "requirements-gpu.txt", "pyproject.toml", "configs", "scripts", "dali")
SCRIPTS = ("prefix_tuning.sh", "alignment.sh", "infere_pseudo_labels.sh", "audio_vis_distil.sh", "inference.sh")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = tmp_path_factory.mktemp("readme")
    for name in (*LINKED, *SCRIPTS):
        (box / name).symlink_to(ROOT / name)
    (box / ".venv").symlink_to(Path(sys.prefix))  # the environment running the tests is the README's .venv
    return box


def run(box: Path, command: str, replace: dict[str, str] | None = None) -> str:
    assert command in README, f"the README no longer shows: {command}"
    for old, new in (replace or {}).items():
        command = command.replace(old, new)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DALI_PROGRESS="0")
    done = subprocess.run(command, shell=True, cwd=box, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_demo_then_caption_your_own_file(sandbox):
    printed = run(sandbox, "make demo ARGS=--reduced")
    results = json.loads((sandbox / "expe" / "demo" / "results.json").read_text())
    made = {"world and image captioner", "encoder pretraining", "prefix", "ot_att/align", "ot_att/distill"}
    assert made | {"image_captioner/infer_image", "unaligned/infer_audio"} <= set(results["seconds"])
    assert all(results["seconds"][part] > 0 for part in made)  # where the time went, part by part
    assert f"Time: {sum(results['seconds'].values()):.0f} s (world and image captioner " in printed
    assert f"; the same table on {results['kernels']['same_table_on']}\n" in printed  # which hosts share it
    names = {row["name"] for row in results["rows"]}
    assert names == {
        "Image captioner on images (*)",
        "Unaligned encoder",
        "DALI-OT-Att",
        "DALI-OT-Att + distillation",
        "DALI-OT-Att (audio + image)",
    }
    assert {claim["claim"] for claim in results["claims"]} >= {"distillation helps OT-Att"}
    _another_encoders_rows_beside_cav_maes(sandbox, results)
    _make_reproduce_repeats_the_demos_rows_at_seed_0(sandbox, results)
    wave = 0.1 * np.random.default_rng(0).standard_normal(16_000 * 12)
    soundfile.write(sandbox / "my_clip.wav", wave, 16_000)
    printed = run(sandbox, ".venv/bin/dali caption --run expe/demo/ot_att my_clip.wav")
    assert printed.count("my_clip.wav [") == 2  # two windows of 10.24 s
    walk = ".venv/bin/dali caption --run expe/demo/ot_att data/synthetic/audio --glob 'test0000*' --output-dir captions"
    walk += " --output-format all"
    run(sandbox, walk)
    srt = sorted((sandbox / "captions").glob("*.srt"))
    assert [path.stem for path in srt] == [
        f"test0000{i}" for i in range(10) if (sandbox / "data" / "synthetic" / "audio" / f"test0000{i}.wav").exists()
    ]
    assert all(len(list((sandbox / "captions").glob(f"{path.stem}.*"))) == 5 for path in srt)
    run(sandbox, ".venv/bin/dali export --run expe/demo/ot_att models/demo")
    assert run(sandbox, ".venv/bin/dali caption --model models/demo my_clip.wav") == printed  # the same captions
    api = (
        "from dali import AudioCaptioner"
        + README.split("```python\nfrom dali import AudioCaptioner")[1].split("```")[0]
    )
    last = 'captioner.caption("my_clip.wav")'
    assert last in api  # the README's example, run as written, its last value printed
    done = subprocess.run([sys.executable, "-c", api.replace(last, f"print({last})")], cwd=sandbox, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    windows = eval(done.stdout.decode().strip().splitlines()[-1])
    assert [(start, end) for start, end, _ in windows] == [(0.0, 10.24), (10.24, 12.0)]
    _make_app_serves_the_demo_and_captions_as_the_api_does(sandbox, windows)


def _make_reproduce_repeats_the_demos_rows_at_seed_0(sandbox: Path, demo: dict) -> None:
    """`make reproduce` on the demo's run: seed 0 of each AudioCaps row is the demo's row of the same captioning,
    computed again in its own infer folder; the world's second test set is scored as Clotho."""
    run(sandbox, "make reproduce", replace={"make reproduce": 'make reproduce ARGS="--seeds 2"'})
    results = json.loads((sandbox / "expe" / "demo" / "ot_att" / "reproduce" / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    same = {
        "AudioCaps, audio": "DALI-OT-Att + distillation",
        "AudioCaps, audio + image": "DALI-OT-Att (audio + image)",
        "AudioCaps, image": "Image captioner on images (*)",
    }
    demo_rows = {row["name"]: row["metrics"] for row in demo["rows"]}
    for ours, theirs in same.items():
        assert rows[ours]["per_seed"]["0"]["cider_d"] == demo_rows[theirs]["cider_d"], ours
        assert rows[ours]["seeds"] == [0, 1] and rows[ours]["std"]["cider_d"] is not None
    clotho = rows["Clotho (cross-domain), audio"]
    assert clotho["set"] == "clotho" and len(clotho["scored"]) == results["clips"]["clotho"]["listed"]


def _another_encoders_rows_beside_cav_maes(sandbox: Path, paper: dict) -> None:
    """`make demo ARGS="--audio-encoder ast"` adds AST's rows; CAV-MAE's stay as they were (reused, unchanged)."""
    run(sandbox, 'make demo ARGS="--audio-encoder ast"', replace={'ARGS="': 'ARGS="--reduced '})
    results = json.loads((sandbox / "expe" / "demo" / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert {"Unaligned encoder [AST]", "DALI-OT-Att [AST]", "DALI-OT-Att [AST] + distillation"} < set(rows)
    assert all(rows[row["name"]]["metrics"] == row["metrics"] for row in paper["rows"])
    recorded = read_manifest(sandbox / "expe" / "demo" / "ot_att-ast" / "align")["metrics"]["audio_encoder"]
    assert recorded["family"] == "ast"
    run(sandbox, "make demo ARGS=--reduced")  # back to the paper's rows for what follows


def _make_app_serves_the_demo_and_captions_as_the_api_does(sandbox: Path, windows: list) -> None:
    """`make app`, as the README says (on its port, 7860), then one request through the page's own HTTP API (what
    the browser sends: tests/test_app.py drives the page itself)."""
    import signal
    import time

    from gradio_client import Client, handle_file

    assert "make app    # serves expe/demo/ot_att on http://127.0.0.1:7860" in README
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    server = subprocess.Popen(
        ["make", "app"],
        cwd=sandbox,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(240):
            try:
                client = Client("http://127.0.0.1:7860/", verbose=False)
                break
            except Exception:  # not serving yet
                assert server.poll() is None, "make app stopped"
                time.sleep(0.5)
        clip = handle_file(str(sandbox / "my_clip.wav"))
        table = client.predict(clip, None, "audio", "greedy", 0, api_name="/caption")
        assert [tuple(row) for row in table[0]["data"]] == [tuple(window) for window in windows]
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the README says, stops it
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)


def test_the_five_scripts_on_the_synthetic_world(sandbox):
    if not (sandbox / "data" / "synthetic" / CAPTIONER_FOLDER).exists():
        run(sandbox, "make demo ARGS=--reduced")  # the README's scripts run after `make demo` built the world
    for script, preset in zip(SCRIPTS, ("prefix_tuning", "alignment", "pseudo_labels", "distillation", "inference")):
        flags = " --modality audio" if script == "inference.sh" else ""
        run(sandbox, f"./{script} --config configs/synthetic/{preset}.yaml --run mine{flags}")
    for stage in ("prefix", "align", "pseudo_label", "distill", "infer_audio"):
        assert read_manifest(sandbox / "expe" / "mine" / stage)["stage"]
    assert (sandbox / "expe" / "mine" / "infer_audio" / "scores.md").exists()


def test_released_weights_from_files_to_scores_and_captions(sandbox, tiny_llava_dir):
    videos, downloaded = sandbox / "VIDEOS", sandbox / "DOWNLOADED"
    videos.mkdir()
    write_mp4(videos / "clipA.mp4", seconds=3.0)
    soundfile.write(videos / "clipB.flac", 0.2 * np.sin(np.arange(16_000 * 3) / 7), 16_000)
    _released_weights(downloaded)
    audiocaps, clotho = sandbox / "data" / "audiocaps", sandbox / "data" / "clotho"
    write_mp4(sandbox / "clip.mp4", seconds=12.0)
    shutil.copy(videos / "clipB.flac", sandbox / "field_recording.flac")
    hub = {"llava-hf/llava-1.5-7b-hf": str(tiny_llava_dir)}

    run(sandbox, "dali prepare VIDEOS/ data/audioset")
    shutil.copytree(sandbox / "data" / "audioset" / "audio", audiocaps / "audio")
    shutil.copytree(sandbox / "data" / "audioset" / "frames", audiocaps / "frames")
    _write_rows(audiocaps / "test.csv", ["youtube_id", "caption"], [["clipA", "a tone"], ["clipA", "a beep"]])
    (clotho / "evaluation").mkdir(parents=True)
    shutil.copy(audiocaps / "audio" / "clipB.wav", clotho / "evaluation" / "clipB.wav")
    _write_rows(
        clotho / "clotho_captions_evaluation.csv",
        ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
        [["clipB.wav"] + [f"a low hum {i}" for i in range(5)]],
    )

    run(sandbox, "dali import-original DOWNLOADED/ expe/DALI_OT_ATT --llava llava-hf/llava-1.5-7b-hf", hub)
    run(
        sandbox,
        "./inference.sh --run DALI_OT_ATT --test-list data/audiocaps/test.csv --audio-dir "
        "data/audiocaps/audio --frames-dir data/audiocaps/frames --modality audio",
    )
    run(
        sandbox,
        "./inference.sh --run DALI_OT_ATT --test-list data/clotho/clotho_captions_evaluation.csv "
        "--audio-dir data/clotho/evaluation --modality audio --tag clotho",
    )
    run(sandbox, "dali caption --run expe/DALI_OT_ATT clip.mp4 field_recording.flac --json out.json")
    run_folder = sandbox / "expe" / "DALI_OT_ATT"
    for name, ids in (("infer_audio", ["clipA"]), ("infer_audio_clotho", ["clipB"])):
        assert [p["id"] for p in read_jsonl(run_folder / name / "predictions.jsonl")] == ids
        assert read_manifest(run_folder / name)["inputs"]["conv_mode"] == {"value": "llava_v1"}
    captions = json.loads((sandbox / "out.json").read_text())
    assert [(c["file"], c["start"]) for c in captions["captions"]] == [
        ("clip.mp4", 0.0),
        ("clip.mp4", 10.24),
        ("field_recording.flac", 0.0),
    ]


def _released_weights(folder: Path) -> None:
    """The three files of the released DALI weights, in the original's layouts, for the tiny LLaVA (32 wide)."""
    folder.mkdir()
    torch.manual_seed(0)
    encoder = CAVMAEAudioEncoder(CAVMAEConfig(embed_dim=32, depth_audio=1, num_heads=2, patch_time=128, proj_dim=32))
    torch.save(original_layout(encoder, with_extras=True), folder / "audio_backbone.pth")
    projector = {}
    for layer in (0, 2):
        projector[f"model.mm_projector.{layer}.weight"] = torch.randn(32, 32) * 0.1
        projector[f"model.mm_projector.{layer}.bias"] = torch.zeros(32)
    torch.save(projector, folder / "prefixMLP.bin")
    torch.save({"model.audio_tower.prefix": torch.randn(16, 32) * 1e-4}, folder / "prefix.bin")


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *rows])
