"""`dali app` as a stranger on the network reaches it: plain HTTP against a running server on 127.0.0.1 (issue 41)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app(pipeline, tmp_path_factory):
    """`dali app` with small caps (1 MB uploads, a 2 MB folder, 15 s of keeping): (url, its scratch root, run)."""
    httpx = pytest.importorskip("httpx")
    _, llava, run = pipeline
    root = tmp_path_factory.mktemp("server_tmp")
    port = free_port()
    log = open(root.parent / f"{root.name}.log", "w")
    command = [sys.executable, "-m", "dali.cli", "app", "--run", str(run), "--port", str(port)]
    command += ["--max-upload-mb", "1", "--max-scratch-mb", "2", "--keep-minutes", "0.25"]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, TMPDIR=str(root))
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            assert process.poll() is None, Path(log.name).read_text()
            time.sleep(0.5)
    yield url, root, run, llava
    process.terminate()
    process.wait(timeout=30)


def upload(url: str, name: str, data: bytes) -> str:
    import httpx

    answer = httpx.post(url + "gradio_api/upload", files={"files": (name, data)}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()[0]


def caption(url: str, path: str, decoding: str = "greedy") -> list:
    """The page's Caption call through Gradio's HTTP API: its outputs (table, message, picture, frames, JSON)."""
    import httpx

    file = {"path": path, "meta": {"_type": "gradio.FileData"}}
    started = httpx.post(url + "gradio_api/call/caption", json={"data": [file, None, "audio", decoding, 3]}, timeout=60)
    assert started.status_code == 200, started.text
    events = httpx.get(url + f"gradio_api/call/caption/{started.json()['event_id']}", timeout=300).text
    lines = events.splitlines()
    assert "event: complete" in lines, events[-2000:]
    return json.loads(lines[lines.index("event: complete") + 1].removeprefix("data: "))


def wav_bytes(tmp_path: Path, seconds: float = 3.0, seed: int = 0) -> bytes:
    path = tmp_path / f"clip{seed}.wav"
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(16_000 * seconds))
    soundfile.write(path, wave.astype(np.float32), 16_000, subtype="PCM_16")
    return path.read_bytes()


def test_an_uploaded_page_or_picture_with_script_is_never_served_as_one(app):
    """An uploaded .html or .svg came back inline as text/html on the page's own origin: stored XSS."""
    import httpx

    url = app[0]
    for name, body in (("x.html", b"<script>alert(1)</script>"), ("x.svg", b"<svg onload='alert(1)'></svg>")):
        path = upload(url, name, body)
        served = httpx.get(url + f"gradio_api/file={path}", timeout=30)
        kind = served.headers.get("content-type", "")
        assert "html" not in kind and "svg" not in kind, (name, kind)
        assert served.headers.get("content-disposition", "").startswith("attachment"), (name, served.headers)
        assert served.headers.get("x-content-type-options") == "nosniff"


def test_a_request_body_over_its_bound_gets_413_before_it_is_read(app):
    """A 100 MB JSON body was accepted (HTTP 200) and left the server at 1.9 GB."""
    import httpx

    url = app[0]
    body = b'{"data": ["' + b"x" * (20 << 20) + b'"]}'
    declared = httpx.post(url + "gradio_api/call/caption", content=body, timeout=60)
    assert declared.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"x" * (1 << 20)

    chunked = httpx.post(url + "gradio_api/call/caption", content=chunks(), timeout=60)
    assert chunked.status_code == 413
    assert httpx.get(url, timeout=30).status_code == 200  # and the server keeps serving


def test_one_users_request_never_deletes_anothers_upload_and_an_upload_captions_again(app, tmp_path):
    """A second Caption of one upload failed (it was deleted after the first), and so did a second user's."""
    url = app[0]
    data = wav_bytes(tmp_path)
    mine = upload(url, "clip.wav", data)
    theirs = upload(url, "clip.wav", data)  # the same file from another user: Gradio gives it the same path
    first = caption(url, mine)
    assert len(first[0]["data"]) == 1 and Path(mine).exists()
    assert caption(url, theirs, "seeded sampling")[0]["data"] and Path(mine).exists()
    assert caption(url, mine, "seeded sampling")[0]["data"]  # pressed again, with other settings


def test_nothing_of_the_server_is_shown(app, tmp_path):
    """/config and each downloaded JSON showed the server's run and LLaVA paths."""
    import httpx

    url, _, run, llava = app
    config = httpx.get(url + "config", timeout=30).text
    outputs = caption(url, upload(url, "clip.wav", wav_bytes(tmp_path, seed=1)))
    report = httpx.get(url + f"gradio_api/file={outputs[4]['path']}", timeout=30)
    for text in (config, report.text):
        assert str(run) not in text and str(llava) not in text and str(run.parent) not in text
    record = report.json()
    assert record["run"] == run.name and record["llava"] == Path(llava).name and len(record["run_sha256"]) == 16


def test_uploads_never_captioned_stay_under_the_cap_and_expire(app, tmp_path):
    """Uploads that were never captioned stayed until the server exited, and nothing capped their folder."""
    url, root, _, _ = app
    (scratch,) = root.glob("dali-app-*")
    for index in range(200):  # 200 uploads of 20 kB: 4 MB against a 2 MB cap
        upload(url, f"u{index}.wav", np.random.default_rng(index).bytes(20_000))

    def held() -> int:
        total = 0
        for folder, _, names in os.walk(scratch):  # a folder or file the janitor removes as we look is passed over
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    pass
        return total

    deadline = time.time() + 60
    while held() > 2 << 20 and time.time() < deadline:
        time.sleep(1)
    assert held() <= 2 << 20
    while held() and time.time() < deadline:
        time.sleep(1)
    assert held() == 0  # all expired: kept 15 s


def test_the_scratch_folder_expires_files_by_age_and_keeps_under_its_cap(tmp_path):
    from dali.tools.app import trim_folder

    uploads = tmp_path / "uploads"
    now = time.time()
    for index in range(10):  # ten 1 kB uploads, one a minute, the oldest 10 min ago
        path = uploads / f"hash{index}" / f"clip{index}.wav"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - 600 + 60 * index,) * 2)
        os.utime(path.parent, (now - 600 + 60 * index,) * 2)
    fresh = uploads / "hash_new" / "now.wav"
    fresh.parent.mkdir()
    fresh.write_bytes(b"x" * 5000)  # arrived now: spared by the cap, whatever its size
    deleted = trim_folder(tmp_path, max_bytes=8000, max_age_s=450)
    names = sorted(p.name for p in deleted)
    assert names[:3] == ["clip0.wav", "clip1.wav", "clip2.wav"]  # older than 7.5 min
    left = sorted(p.name for p in uploads.rglob("*.wav"))
    assert "now.wav" in left and sum(p.stat().st_size for p in uploads.rglob("*.wav")) <= 8000
    assert left == ["clip7.wav", "clip8.wav", "clip9.wav", "now.wav"]  # then the oldest go until the rest fit
    assert not (uploads / "hash0").exists() and uploads.is_dir()  # their emptied folders too, never uploads/
    kept = trim_folder(tmp_path, max_bytes=10**9, max_age_s=10**9, min_age_s=0, max_files=2)
    assert sorted(p.name for p in uploads.rglob("*.wav")) == ["clip9.wav", "now.wav"] and len(kept) == 2
