"""`dali app` in a real browser (Debian's chromium driven by Playwright), on a run trained in the test."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import free_port, write_mp4

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = os.environ.get("DALI_APP_SCREENSHOT")  # where to keep the page's picture (docs/app.png is one)
pytestmark = pytest.mark.slow


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("no chromium on PATH: .ci/run installs it (apt-get install chromium)")
    pytest.skip("no chromium on PATH (apt-get install chromium); CI installs it")


@pytest.fixture(scope="module")
def server(pipeline, tmp_path_factory):
    """`dali app` on a free port of 127.0.0.1, serving the tests' run: (url, run, llava)."""
    world, llava, run = pipeline
    port = free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w")
    command = [sys.executable, "-m", "dali.cli", "app", "--run", str(run), "--port", str(port), "--max-upload-mb", "1"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert process.poll() is None, Path(log.name).read_text()
            time.sleep(0.5)
    yield url, run, llava
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_browser(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def clips(pipeline, tmp_path_factory):
    """A 25 s wav made of the world's test clips, an mp4 with sound, and a corrupt file."""
    world = pipeline[0]
    folder = tmp_path_factory.mktemp("clips")
    waves = [soundfile.read(path, dtype="float32")[0] for path in sorted((world / "audio").glob("*.wav"))[:3]]
    soundfile.write(folder / "clip25.wav", np.concatenate(waves)[: 25 * 16_000], 16_000)
    write_mp4(folder / "scene.mp4", seconds=12.0)
    (folder / "corrupt.wav").write_bytes(b"RIFF, but not a wav at all" * 40)
    soundfile.write(folder / "big.wav", np.zeros(40 * 16_000, dtype=np.float32), 16_000)  # 1.3 MB
    return folder


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(url)
    page.wait_for_selector("#caption")
    return page


def _submit(page, path: Path, modality: str = "audio") -> None:
    page.set_input_files("#upload input[type=file]", str(path))
    page.wait_for_selector(f"#upload >> text={path.name}", timeout=120_000)  # a loaded machine uploads slowly
    page.get_by_label(modality, exact=True).check()
    page.click("#caption")


def _table(page, rows: int, timeout_ms: int = 180_000) -> list[list[str]]:
    try:
        page.wait_for_function(
            f"document.querySelector('#captions [role=grid]')?.getAttribute('aria-rowcount') == '{rows + 1}'",
            timeout=timeout_ms,
        )
    except Exception as error:  # the page's own words say why
        raise AssertionError(f"no {rows}-row table; status: {_page_state(page)}") from error
    texts = page.locator("#captions [role=row]").all_inner_texts()[1:]
    return [[cell.strip() for cell in text.split("\n") if cell.strip()] for text in texts]


def _page_state(page) -> str:
    return f"status {page.locator('#status').inner_text()!r}, upload {page.locator('#upload').inner_text()!r}"


def _status(page, containing: str) -> str:
    try:
        page.wait_for_function(
            f"document.querySelector('#status')?.innerText.includes({containing!r})", timeout=180_000
        )
    except Exception as error:
        raise AssertionError(f"no {containing!r} on the page; {_page_state(page)}") from error
    return page.locator("#status").inner_text()


def _cli_captions(run: Path, path: Path, *flags: str) -> list[list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "dali.cli", "caption", "--run", str(run), str(path), "--json", str(path) + ".json"]
        + list(flags),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    captions = json.loads(Path(str(path) + ".json").read_text())["captions"]
    return _rows(captions)


def _rows(captions: list[dict]) -> list[list[str]]:
    """Captions of a JSON report as the page's table shows them."""
    return [[f"{c['start']:g}", f"{c['end']:g}", c["caption"]] for c in captions]


def test_a_wav_gets_the_captions_dali_caption_gives_and_nothing_comes_from_outside(server, browser, clips):
    url, run, _ = server
    page = _open(browser, url)
    _submit(page, clips / "clip25.wav")
    rows = _table(page, 3)
    assert rows == _cli_captions(run, clips / "clip25.wav")
    assert "3 window(s)" in _status(page, "window")
    assert page.locator("#spectrogram img").count() == 1
    link = page.locator("#json a").first.get_attribute("href")
    report = json.loads(urllib.request.urlopen(urllib.parse.urljoin(url, link)).read())
    assert _rows(report["captions"]) == rows
    outside = {request for request in page.requests if not request.startswith((url, "data:", "blob:"))}
    assert not outside
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)
    page.close()


def test_a_video_with_audio_and_image_shows_the_frame_of_each_window(server, browser, clips):
    url, run, _ = server
    page = _open(browser, url)
    _submit(page, clips / "scene.mp4", "audio + image (videos)")
    rows = _table(page, 2)
    assert rows == _cli_captions(run, clips / "scene.mp4", "--modality", "audio_vis")
    page.wait_for_selector("#frames img >> nth=1")
    assert page.locator("#frames img").count() == 2
    page.close()


def test_bad_input_and_an_oversized_upload_get_a_message_and_the_server_keeps_serving(server, browser, clips):
    url, _, _ = server
    page = _open(browser, url)
    _submit(page, clips / "corrupt.wav")
    message = _status(page, "Could not caption corrupt.wav")
    assert "cannot decode 'corrupt.wav'" in message and "dali-app-" not in message  # the user's name, not the copy's
    page.reload()  # a fresh page, as a user starting over: the server behind it is the same process
    page.wait_for_selector("#caption")
    page.set_input_files("#upload input[type=file]", str(clips / "big.wav"))
    page.wait_for_selector("text=exceed the maximum allowed size of 1.0 Mb")  # --max-upload-mb 1
    page.reload()
    page.wait_for_selector("#caption")
    _submit(page, clips / "clip25.wav")
    assert len(_table(page, 3)) == 3
    page.close()


def test_two_uploads_at_once_are_both_answered(server, browser, clips):
    url, _, _ = server
    pages = [_open(browser, url) for _ in range(2)]
    for page, name in zip(pages, ("clip25.wav", "scene.mp4")):
        _submit(page, clips / name)
    assert [len(_table(page, rows)) for page, rows in zip(pages, (3, 2))] == [3, 2]
    for page in pages:
        page.close()


def test_caption_twice_on_one_upload_and_the_page_states_its_limits(server, browser, clips):
    """The upload was deleted after the first Caption: the second, with other settings, failed."""
    url, _, _ = server
    page = _open(browser, url)
    limits = page.locator("body").inner_text()
    assert "Files up to 1 MB" in limits and "the first 600 s are captioned" in limits
    assert "deleted 30 min after they arrive" in limits
    _submit(page, clips / "clip25.wav")
    greedy = _table(page, 3)
    first = page.locator("#json a").first.get_attribute("href")
    page.get_by_label("seeded sampling", exact=True).check()
    page.click("#caption")  # the same upload, again
    page.wait_for_function(f"document.querySelector('#json a')?.getAttribute('href') != {first!r}", timeout=180_000)
    sampled = _table(page, 3)
    assert [row[:2] for row in sampled] == [row[:2] for row in greedy]
    assert "Could not caption" not in page.locator("#status").inner_text()
    link = page.locator("#json a").first.get_attribute("href")
    report = json.loads(urllib.request.urlopen(urllib.parse.urljoin(url, link)).read())
    assert report["decoding"]["strategy"] == "sample" and _rows(report["captions"]) == sampled
    page.close()
