"""``dali app --run RUN``: a web page to caption a clip with a finished run (flags and promises:
``command_configs.AppConfig``). The page is Gradio's; the captioning behind it is :class:`ClipCaptioner`, the same
windows and captions as ``dali caption`` gives for the file."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dali import model_folder
from dali.audio_captioner import AudioCaptioner
from dali.command_configs import AppConfig
from dali.errors import DaliError
from dali.flags import parse_config
from dali.logs import log, setup_logging
from dali.media import MEDIA_EXTENSIONS
from dali.models.decoding import DecodingOptions
from dali.run import Run
from dali.runs import MANIFEST, read_manifest
from dali.stage_table import ALIGN, TRAINED
from dali.tools.caption import caption_report, open_captioner

MODALITIES = {"audio": "audio", "audio + image (videos)": "audio_vis"}
DECODINGS = ("greedy", "seeded sampling")
TABLE_HEADERS = ["start (s)", "end (s)", "caption"]
ACCEPTED = " ".join(MEDIA_EXTENSIONS)


@dataclass
class PageResult:
    """What the page shows for one clip."""

    rows: list[list] = field(default_factory=list)
    message: str = ""
    spectrogram: object = None  # a PIL image
    frames: list = field(default_factory=list)  # (PIL image, "start - end s") per window
    json_path: str | None = None


class ClipCaptioner:
    """One loaded run, captioning one clip per request, with bad input turned into a message. A request never
    deletes a file (it could name another user's upload): the scratch folder's :class:`Janitor` expires files."""

    def __init__(self, captioner: AudioCaptioner, config: AppConfig, outputs: Path, identity: dict | None = None):
        self.captioner, self.config, self.outputs = captioner, config, outputs
        self.identity = identity or {}  # what the downloaded JSON says of the run: names and hashes, no path

    def __call__(self, path: str | None, modality: str, decoding: str, seed: int) -> PageResult:
        if not path:
            return PageResult(message="Upload an audio or video file, or record one, first.")
        name = Path(path).name
        if Path(path).suffix.lower() not in MEDIA_EXTENSIONS:  # the record slot has no type check of its own
            return PageResult(message=f"**Could not caption {name}:** not an audio or video file ({ACCEPTED})")
        try:
            return self._caption(Path(path), MODALITIES[modality], decoding, int(seed))
        except DaliError as error:  # named by the user's file name, not the server's copy of it
            return PageResult(message=f"**Could not caption {name}:** {str(error).replace(path, name)}")

    def _caption(self, path: Path, modality: str, decoding: str, seed: int) -> PageResult:
        config = self.config
        windows = self.captioner.windows(
            path, min_window=config.min_seconds, max_seconds=config.max_seconds, modality=modality
        )
        seconds = windows[-1].end if windows else 0.0
        if seconds < config.min_seconds:
            raise DaliError(f"the clip is {seconds:.2f} s long; at least {config.min_seconds:g} s is needed")
        options = DecodingOptions(strategy="greedy" if decoding == DECODINGS[0] else "sample", seed=seed)
        pairs = list(self.captioner.iter_captions(windows, config.batch_size, options))
        rows = [[*window.span, caption] for window, caption in pairs]
        message = f"{len(rows)} window(s) of 10.24 s, {seconds:.2f} s of audio."
        if seconds >= config.max_seconds - 0.01:
            message += f" The file is longer: only its first {config.max_seconds:g} s were captioned (--max-seconds)."
        captions = [{"file": path.name, "start": s, "end": e, "caption": c} for s, e, c in rows]
        report = caption_report(captions, [], self.captioner, "", modality, options)
        report = {key: value for key, value in report.items() if key != "run"} | self.identity  # names, no path
        json_path = Path(tempfile.mkdtemp(dir=self.outputs)) / f"{path.stem}.captions.json"
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        frames = [(w.frame, "{:.2f} - {:.2f} s".format(*w.span)) for w, _ in pairs if w.frame is not None]
        return PageResult(rows, message, spectrogram_image(windows), frames, str(json_path))


def spectrogram_image(windows: list):
    """The clip's log-mel spectrogram (its windows' fbanks, end to end) with the window boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    parts = [w.features[: max(1, round((w.end - w.start) * 100))].numpy() for w in windows]
    fbank = np.concatenate(parts).T  # [mel bins, frames at 100 per second]
    figure, axis = plt.subplots(figsize=(10, 2.6), dpi=100)
    axis.imshow(fbank, origin="lower", aspect="auto", cmap="magma", extent=(0, windows[-1].end, 0, fbank.shape[0]))
    for index, window in enumerate(windows):
        axis.axvline(window.start, color="white", linewidth=1.5)
        axis.text(window.start + 0.1, fbank.shape[0] - 12, f"window {index + 1}", color="white", fontsize=9)
    axis.set_xlabel("time (s)")
    axis.set_ylabel("mel bin")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(buffer).convert("RGB")


def served_folder(config: AppConfig) -> Path:
    """The run folder, or the exported model's folder (a Hub name resolved once, here)."""
    return model_folder.resolve(config.model) if config.model else Run.find(config.run, config.expe_dir).folder


def public_identity(captioner: AudioCaptioner, config: AppConfig, folder: Path) -> dict:
    """The run (or exported model) in ``folder`` and its LLaVA as a visitor may see them: by name and content hash,
    never by a server path."""
    from dali.files import file_sha256

    source = Path(captioner.describe()["llava"])
    llava = {"llava": source.name}
    if source.is_dir() and (source / "config.json").is_file():
        llava["llava_config_sha256"] = file_sha256(source / "config.json")[:16]
    if config.model is not None:
        name = folder.name if Path(config.model).exists() else config.model  # a Hub name, or the folder's own
        return {"model": name, "model_sha256": file_sha256(folder / model_folder.CONFIG_FILE)[:16], **llava}
    return {"run": folder.name, "run_sha256": file_sha256(folder / ALIGN.folder / MANIFEST)[:16], **llava}


def run_identity(captioner: AudioCaptioner, config: AppConfig, folder: Path, shown: dict) -> str:
    """Markdown: the run or model and its LLaVA (``shown``: names and hashes, :func:`public_identity`), and each
    stage's key facts (a model: its config's)."""
    described = captioner.describe()
    served = (
        f"**Model** `{shown['model']}` (config sha256 {shown['model_sha256']})"
        if "model" in shown
        else f"**Run** `{shown['run']}` (align manifest sha256 {shown['run_sha256']})"
    )
    lines = [
        served
        + f" · **LLaVA** `{shown['llava']}`"
        + (f" (config sha256 {shown['llava_config_sha256']})" if "llava_config_sha256" in shown else "")
        + f" · **prompt** {described['conv_mode']} · **device** {described['device']} · "
        f"**model loaded once**, requests queued",
        "",
    ]
    return "\n".join(lines + (_model_facts(folder) if config.model is not None else _stage_facts(folder)))


def _model_facts(folder: Path) -> list[str]:
    made = model_folder.read_config(folder)
    family = made["audio_encoder"]["family"]
    projector = made["projector"] + (" + prefix" if made["prefix"] else "")
    return [f"exported by dali {made['dali_version']}: {family} encoder, {projector} projector, run `{made['run']}`"]


def _stage_facts(folder: Path) -> list[str]:
    lines = ["| stage | finished | commit | key facts |", "|---|---|---|---|"]
    for row in TRAINED:
        if (folder / row.folder / MANIFEST).is_file():
            manifest = read_manifest(folder / row.folder)
            metrics = {
                k: v
                for k, v in manifest.get("metrics", {}).items()
                if isinstance(v, (int, float)) or (isinstance(v, str) and "/" not in v)  # no path
            }
            facts = ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in list(metrics.items())[:6])
            commit = str(manifest.get("git_commit") or "")[:10]
            lines.append(f"| {row.folder} | {manifest.get('finished', '')} | {commit} | {facts} |")
    return lines


def build_page(gr, service: ClipCaptioner, identity: str, limits: str = ""):
    """The Gradio page: inputs on the left, the captions, spectrogram, frames and JSON on the right."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="DALI: audio captioning", analytics_enabled=False) as page:
        gr.Markdown(
            "# DALI · audio captioning from an image captioner\nCaptions per 10.24 s window of your clip.\n\n" + limits
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Audio or video file", file_types=list(MEDIA_EXTENSIONS), elem_id="upload")
                record = gr.Audio(sources=["microphone"], type="filepath", label="... or record", elem_id="record")
                modality = gr.Radio(list(MODALITIES), value="audio", label="Caption from", elem_id="modality")
                decoding = gr.Radio(list(DECODINGS), value=DECODINGS[0], label="Decoding", elem_id="decoding")
                seed = gr.Number(0, precision=0, label="Sampling seed", elem_id="seed")
                button = gr.Button("Caption", variant="primary", elem_id="caption")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Captions", elem_id="captions", wrap=True)
                spectrogram = gr.Image(label="Log-mel spectrogram, windows marked", elem_id="spectrogram")
                frames = gr.Gallery(label="Frame per window (audio + image)", elem_id="frames", columns=4, height=180)
                download = gr.File(label="Captions as JSON", elem_id="json")
        with gr.Accordion("The run behind this page", open=False):
            gr.Markdown(identity)

        def caption(file, recording, modality, decoding, seed):
            result = service(file or recording, modality, decoding, seed)
            return result.rows, result.message, result.spectrogram, result.frames, result.json_path

        outputs = [table, status, spectrogram, frames, download]
        button.click(caption, [upload, record, modality, decoding, seed], outputs, api_name="caption")
    return page, theme


def main(argv: list[str] | None = None) -> int:
    config = parse_config(AppConfig, argv)
    setup_logging()
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    # A private scratch folder, removed at exit: uploads/ is Gradio's (GRADIO_TEMP_DIR: uploads and its copies of
    # what the page returns), outputs/ holds the JSON files we write. No folder is in allowed_paths, so Gradio
    # serves every file there that is not a picture, sound or video as a download, never as a page.
    with tempfile.TemporaryDirectory(prefix="dali-app-", ignore_cleanup_errors=True) as folder:
        scratch = Path(folder)
        uploads, outputs = scratch / "uploads", scratch / "outputs"
        uploads.mkdir()
        outputs.mkdir()
        os.environ["GRADIO_TEMP_DIR"] = str(uploads)
        import gradio as gr  # after the environment above: analytics off, uploads in the scratch folder

        served = served_folder(config)
        captioner = open_captioner(dataclasses.replace(config, model=str(served)) if config.model else config)
        identity = public_identity(captioner, config, served)
        service = ClipCaptioner(captioner, config, outputs, identity)
        page, theme = build_page(gr, service, run_identity(captioner, config, served, identity), page_limits(config))
        page.queue(default_concurrency_limit=1, max_size=32)
        keep_s = config.keep_minutes * 60
        caps = config.max_scratch_mb * 2**20, config.max_scratch_files
        janitor = Janitor(scratch, *caps, keep_s, period=min(10.0, keep_s / 4))
        janitor.start()
        app = gr.mount_gradio_app(
            BodyLimit.wrap(config.max_upload_mb), page, path="", max_file_size=f"{config.max_upload_mb}mb",
            theme=theme, ssr_mode=False, footer_links=[], show_error=False,
        )  # fmt: skip
        log.info("serving %s on http://%s:%d", config.run or config.model, config.host, config.port)
        serve_until_stopped(app, config.host, config.port)
        janitor.stop()
    return 0


class BodyLimit:
    """ASGI middleware: a request body over its bound is answered 413 before the page reads any of it. An upload
    may be ``--max-upload-mb`` (and its multipart framing) and must declare its length (browsers do; 411
    otherwise); any other request (the page's JSON calls are a few kB) at most :data:`JSON_BYTES`, read here first
    when it comes chunked, since the page would turn an error while reading into a 400 of its own."""

    JSON_BYTES = 1 << 20

    def __init__(self, app, upload_bytes: int):
        self.app, self.upload_bytes = app, upload_bytes

    @classmethod
    def wrap(cls, max_upload_mb: int):
        from fastapi import FastAPI

        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(SafeFiles)
        app.add_middleware(cls, upload_bytes=max_upload_mb * 2**20 + (1 << 16))
        return app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/").endswith("/upload")
        limit = self.upload_bytes if upload else self.JSON_BYTES
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > limit:
                return await _refuse(send, 413, f"request body over {limit} bytes")
            return await self.app(scope, receive, send)
        if upload and scope["method"] != "GET":
            return await _refuse(send, 411, "an upload must declare its length")
        messages, size = [], 0
        while True:  # a chunked body of a JSON call: at most JSON_BYTES are held
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                return await _refuse(send, 413, f"request body over {limit} bytes")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class SafeFiles:
    """ASGI middleware: every response says ``nosniff``, and a file the page serves (Gradio's ``/file=`` routes) is
    shown inline only when it is a sound, a video or a raster picture; anything else (an uploaded ``.html`` or
    ``.svg``, the JSON) goes as a download, so no file can run script on the page's origin."""

    INLINE = (b"audio/", b"video/", b"image/png", b"image/jpeg", b"image/webp", b"image/gif")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_file = "/file=" in scope["path"]

        async def sending(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                headers.append((b"x-content-type-options", b"nosniff"))
                kind = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if is_file and not kind.startswith(self.INLINE):
                    drop = (b"content-type", b"content-disposition")
                    headers = [(k, v) for k, v in headers if k.lower() not in drop]
                    headers += [(b"content-type", b"application/octet-stream"), (b"content-disposition", b"attachment")]
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, sending)


async def _refuse(send, status: int, reason: str) -> None:
    body = f"{reason}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def page_limits(config: AppConfig) -> str:
    """What the page tells its users about what it accepts and keeps."""
    return (
        f"Files up to {config.max_upload_mb} MB ({ACCEPTED}); the first {config.max_seconds:g} s are captioned. "
        f"Uploads and results are deleted {config.keep_minutes:g} min after they arrive, or sooner when the "
        f"server's folder passes {config.max_scratch_mb} MB."
    )


class Janitor(threading.Thread):
    """Every ``period`` seconds, :func:`trim_folder` on the scratch folder (Gradio's ``delete_cache`` expires files by
    age only, and not the ones we write)."""

    def __init__(self, folder: Path, max_bytes: int, max_files: int, max_age_s: float, period: float = 10.0):
        super().__init__(daemon=True, name="dali-app-janitor")
        self.folder, self.max_bytes, self.max_files = folder, max_bytes, max_files
        self.max_age_s, self.period = max_age_s, period
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            spare = min(30.0, self.max_age_s / 2)
            trim_folder(self.folder, self.max_bytes, self.max_age_s, min_age_s=spare, max_files=self.max_files)

    def stop(self) -> None:
        self.stopped.set()


def trim_folder(
    folder: Path, max_bytes: int, max_age_s: float, min_age_s: float = 30.0, max_files: int = 10**6
) -> list[Path]:
    """Delete the files under ``folder`` older than ``max_age_s``, then the oldest ones until the rest fit in
    ``max_bytes`` and ``max_files`` (sparing those younger than ``min_age_s``: a request may still be reading them);
    empty folders go too. Returns the files deleted. A file that vanishes meanwhile, or cannot be deleted, is passed
    over."""
    now, files = time.time(), []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        except OSError:
            continue
    files.sort()
    total, count, deleted = sum(size for _, size, _ in files), len(files), []
    for mtime, size, path in files:
        age = now - mtime
        if age > max_age_s or ((total > max_bytes or count > max_files) and age >= min_age_s):
            try:
                path.unlink()
            except OSError:
                continue
            total, count = total - size, count - 1
            deleted.append(path)
    emptied = {path.parent for path in deleted}
    below = [p for p in folder.rglob("*") if len(p.relative_to(folder).parts) > 1]  # in uploads/ and outputs/
    for path in sorted(below, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink() and (path in emptied or now - path.stat().st_mtime >= min_age_s):
                path.rmdir()  # only an empty one goes (a file that just arrived in it keeps it)
        except OSError:
            continue
    return deleted


def serve_until_stopped(app, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until Ctrl-C or SIGTERM, then stop it; a stop that hangs on an open connection is
    given 10 s (the server's thread is a daemon: the process ends with this function's caller)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # ours below, in the main thread
    thread = threading.Thread(target=server.run, daemon=True, name="dali-app-server")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    thread.start()
    while not stop.wait(0.5):
        if not thread.is_alive():  # the port was taken, say: uvicorn logged why
            raise DaliError(f"--port {port}: the server on {host}:{port} stopped (see the log above)")
    log.info("stopping the web page")
    server.should_exit = True
    thread.join(timeout=10)
