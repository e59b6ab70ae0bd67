"""A trained model you can share (#46): `dali export` writes a model folder, `AudioCaptioner.from_pretrained` and
`dali caption --model` load it (a path, or a name from the Hub's cache, offline) and caption as the run does."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dali import AudioCaptioner
from dali.cli import main as dali
from dali.models.decoding import DecodingOptions

GREEDY = DecodingOptions(strategy="greedy")


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory):
    world, llava, run = pipeline
    out = tmp_path_factory.mktemp("models") / "tiny-dali"
    assert dali(["export", "--run", str(run), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """23 s of the world's sounds: three windows, the last one short."""
    import numpy as np
    import soundfile

    from dali.synthetic.world import REDUCED, render_audio, sample_scene

    rng = np.random.default_rng(3)
    wave = np.concatenate([render_audio(sample_scene(rng, f"x{i}")) for i in range(3)])[: 23 * 16_000]
    path = tmp_path_factory.mktemp("clips") / "long.wav"
    soundfile.write(path, wave, 16_000)
    assert REDUCED.test_clips  # the reduced world's settings draw the same kinds of scene
    return path


def test_an_exported_run_is_a_model_folder_that_captions_as_the_run(pipeline, exported, long_clip, tmp_path):
    world, llava, run = pipeline
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["projector"] == "llava" and config["prefix"] is True  # no distill stage: the prefix captions
    assert config["audio_encoder"]["family"] == "cav-mae" and config["llava"] == str(llava.resolve())
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dali\n") and "## Licence" in card and "## Intended use" in card
    assert "prefix-tune" in card and "train_list` sha256" in card  # the commands and data that made it
    for decoding in (GREEDY, DecodingOptions(strategy="sample", temperature=0.7, seed=5)):
        ours = AudioCaptioner.from_pretrained(exported, decoding=decoding, device="cpu").caption(long_clip)
        theirs = AudioCaptioner.from_run(run, decoding=decoding, device="cpu").caption(long_clip)
        assert len(ours) == 3 and ours == theirs
    files = [str(long_clip), str(world / "audio" / "test00000.wav")]
    reports = {}
    for how in (["--model", str(exported)], ["--run", str(run)]):
        out = tmp_path / f"{how[0][2:]}.json"
        assert dali(["caption", *how, *files, "--json", str(out)]) == 0
        reports[how[0]] = [(c["file"], c["start"], c["caption"]) for c in json.loads(out.read_text())["captions"]]
    assert reports["--model"] == reports["--run"] and len(reports["--run"]) == 4


def test_an_imported_release_exports_and_captions_as_its_run(tiny_llava_dir, original_weights, long_clip, tmp_path):
    source, _ = original_weights
    run = tmp_path / "DALI_OT_ATT"
    argv = ["import-original", str(source), str(run), "--llava", str(tiny_llava_dir)]
    assert dali([*argv, "--export", str(run / "model")]) == 2  # checked before anything is imported
    assert not run.exists()
    assert dali([*argv, "--export", str(tmp_path / "released")]) == 0  # the release, as a model folder
    config = json.loads((tmp_path / "released" / "config.json").read_text())
    assert config["projector"] == "distilled" and config["conv_mode"] == "llava_v1"  # the original's inference prompt
    ours = AudioCaptioner.from_pretrained(tmp_path / "released", decoding=GREEDY, device="cpu").caption(long_clip)
    assert ours == AudioCaptioner.from_run(run, decoding=GREEDY, device="cpu").caption(long_clip)


def test_a_model_is_loaded_by_name_from_the_hub_cache_offline(exported, long_clip, tmp_path):
    """The Hub's cache layout (models--owner--name/snapshots/<revision>, refs/main), read with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-dali" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(exported, snapshot)
    (cache / "models--someone--tiny-dali" / "refs").mkdir()
    (cache / "models--someone--tiny-dali" / "refs" / "main").write_text(snapshot.name)
    code = (
        "import sys; from dali import AudioCaptioner; from dali.models.decoding import DecodingOptions; "
        "print(AudioCaptioner.from_pretrained(sys.argv[1], decoding=DecodingOptions(strategy='greedy'), "
        "device='cpu').caption(sys.argv[2]))"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code, "someone/tiny-dali", str(long_clip)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    direct = AudioCaptioner.from_pretrained(exported, decoding=GREEDY, device="cpu").caption(long_clip)
    assert done.stdout.strip().splitlines()[-1] == str(direct)
    missing = [sys.executable, "-m", "dali.cli", "caption", "--model", "someone/absent", str(long_clip)]
    done = subprocess.run(missing, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'someone/absent' is not a local folder and the Hub did not give it" in done.stderr


def test_a_tampered_or_newer_model_folder_is_a_clear_error(exported, long_clip, tmp_path, capsys):
    def caption_with(folder):
        code = dali(["caption", "--model", str(folder), str(long_clip)])
        return code, capsys.readouterr().err

    tampered = shutil.copytree(exported, tmp_path / "tampered")
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "model.safetensors").write_bytes(bytes(data))
    code, error = caption_with(tampered)
    assert code == 2 and "model.safetensors' is not the file this model was exported with" in error
    for change, message in (
        ({"dali_model_format": 2, "dali_version": "9.0"}, "of format 2, made by another dali (version '9.0')"),
        ({"window_hop_s": 5.0}, "fields this dali does not know: ['window_hop_s']"),
    ):
        newer = shutil.copytree(exported, tmp_path / f"newer{len(message)}")
        config = json.loads((newer / "config.json").read_text())
        (newer / "config.json").write_text(json.dumps(config | change))
        code, error = caption_with(newer)
        assert code == 2 and message in error and "Traceback" not in error


def test_export_refuses_an_unfinished_run_and_never_writes_into_a_run(pipeline, exported, tmp_path, capsys):
    world, llava, run = pipeline
    assert dali(["export", "--run", str(run), str(run / "model")]) == 2
    assert "inside the run folder" in capsys.readouterr().err and not (run / "model").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert dali(["export", "--run", str(run), str(foreign)]) == 2
    assert "is not a model folder dali exported" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert dali(["export", "--run", str(run), str(exported)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert dali(["export", "--run", str(tmp_path / "no_run"), str(tmp_path / "out")]) == 2
    assert "is a run folder with a finished" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert dali(["export", "--run", str(run), str(tmp_path / "out"), "--projector", "distilled"]) == 2
    assert "distill" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_exported_folder(pipeline, tmp_path, monkeypatch):
    """The Hub cannot be reached from here: huggingface_hub's client is replaced at its calls, which get the folder."""
    import huggingface_hub

    world, llava, run = pipeline
    calls = []

    class Recorder:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            files = sorted(p.name for p in (tmp_path / "out").iterdir())
            assert files == ["README.md", "config.json", "model.safetensors"]

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    assert dali(["export", "--run", str(run), str(tmp_path / "out"), "--push-to-hub", "someone/tiny-dali"]) == 0
    assert [(name, repo) for name, repo, _ in calls] == [
        ("create_repo", "someone/tiny-dali"),
        ("upload_folder", "someone/tiny-dali"),
    ]
    assert calls[1][2]["folder_path"] == str(tmp_path / "out")


def test_the_web_page_serves_an_exported_model_and_shows_no_path(exported, pipeline, tmp_path):
    """`dali app --model`: the page captions as from_pretrained does; the page and its JSON name the model, never
    the server's folders."""
    httpx = pytest.importorskip("httpx")
    from helpers import free_port
    from test_app_http import caption, upload, wav_bytes

    world, llava, run = pipeline
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    command = [sys.executable, "-m", "dali.cli", "app", "--model", str(exported), "--port", str(port)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert server.poll() is None, (tmp_path / "app.log").read_text()
                time.sleep(0.5)
        data = wav_bytes(tmp_path, seconds=4.0, seed=2)
        outputs = caption(url, upload(url, "clip.wav", data))
        page = httpx.get(url + "config", timeout=30).text
        report = httpx.get(url + f"gradio_api/file={outputs[4]['path']}", timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
    direct = AudioCaptioner.from_pretrained(exported, decoding=GREEDY, device="cpu").caption(tmp_path / "clip2.wav")
    assert [row[2] for row in outputs[0]["data"]] == [text for _, _, text in direct]
    for text in (page, report.text):
        assert str(exported.parent) not in text and str(llava) not in text and str(run) not in text
    record = report.json()
    assert record["model"] == exported.name and len(record["model_sha256"]) == 16 and "run" not in record
    assert f"**Model** `{exported.name}`" in page
