"""``dali app --run RUN``: a web page to caption a clip with a finished run (flags and promises:
``command_configs.AppConfig``). The page is Gradio's; the captioning behind it is :class:`ClipCaptioner`, the same
windows and captions as ``dali caption`` gives for the file."""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dali.audio_captioner import AudioCaptioner, find_run
from dali.command_configs import AppConfig
from dali.config import parse_config
from dali.errors import DaliError
from dali.models.decoding import DecodingOptions
from dali.runs import MANIFEST, read_manifest
from dali.stages.caption import caption_report
from dali.stages.common import log, setup_logging

MODALITIES = {"audio": "audio", "audio + image (videos)": "audio_vis"}
DECODINGS = ("greedy", "seeded sampling")
TABLE_HEADERS = ["start (s)", "end (s)", "caption"]


@dataclass
class PageResult:
    """What the page shows for one clip."""

    rows: list[list] = field(default_factory=list)
    message: str = ""
    spectrogram: object = None  # a PIL image
    frames: list = field(default_factory=list)  # (PIL image, "start - end s") per window
    json_path: str | None = None


class ClipCaptioner:
    """One loaded run, captioning one clip per request, with bad input turned into a message."""

    def __init__(self, captioner: AudioCaptioner, config: AppConfig, scratch: Path):
        self.captioner, self.config, self.scratch = captioner, config, scratch

    def __call__(self, path: str | None, modality: str, decoding: str, seed: int) -> PageResult:
        if not path:
            return PageResult(message="Upload an audio or video file, or record one, first.")
        try:
            return self._caption(Path(path), MODALITIES[modality], decoding, int(seed))
        except DaliError as error:  # named by the user's file name, not the server's copy of it
            return PageResult(
                message=f"**Could not caption {Path(path).name}:** {str(error).replace(path, Path(path).name)}"
            )
        finally:
            if Path(path).is_relative_to(self.scratch):
                Path(path).unlink(missing_ok=True)  # an upload is kept no longer than its captions take

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
        report = caption_report(captions, [], self.captioner, config.run, modality, options)
        json_path = Path(tempfile.mkdtemp(dir=self.scratch)) / f"{path.stem}.captions.json"
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


def run_identity(captioner: AudioCaptioner, folder: Path) -> str:
    """Markdown: the run folder, its LLaVA and each stage's key facts from its manifest."""
    lines = [
        f"**Run** `{folder}` · **LLaVA** `{captioner.models.captioner.source}` · "
        f"**prompt** {captioner.models.captioner.conv_mode} · **device** {captioner.models.captioner.device} · "
        f"**model loaded once**, requests queued",
        "",
        "| stage | finished | commit | key facts |",
        "|---|---|---|---|",
    ]
    for stage in ("prefix", "align", "distill"):
        if (folder / stage / MANIFEST).is_file():
            manifest = read_manifest(folder / stage)
            metrics = {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, (int, float, str))}
            facts = ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in list(metrics.items())[:6])
            commit = str(manifest.get("git_commit") or "")[:10]
            lines.append(f"| {stage} | {manifest.get('finished', '')} | {commit} | {facts} |")
    return "\n".join(lines)


def build_page(gr, service: ClipCaptioner, identity: str):
    """The Gradio page: inputs on the left, the captions, spectrogram, frames and JSON on the right."""
    formats = ["wav", "flac", "ogg", "mp3", "mp4", "mkv", "webm"]
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="DALI: audio captioning", analytics_enabled=False) as page:
        gr.Markdown("# DALI · audio captioning from an image captioner\nCaptions per 10.24 s window of your clip.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Audio or video file", file_types=[f".{ext}" for ext in formats], elem_id="upload"
                )
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
    # a private folder for uploads (Gradio keeps them in GRADIO_TEMP_DIR) and JSON files, removed at exit
    with tempfile.TemporaryDirectory(prefix="dali-app-", ignore_cleanup_errors=True) as folder:
        scratch = Path(folder)
        os.environ["GRADIO_TEMP_DIR"] = folder
        import gradio as gr  # after the environment above: analytics off, uploads in the scratch folder

        captioner = AudioCaptioner.from_run(
            config.run,
            llava=config.llava,
            dtype=config.dtype,
            device=config.device,
            expe_dir=config.expe_dir,
            allow_modified=config.allow_modified,
        )
        identity = run_identity(captioner, find_run(config.run, config.expe_dir))
        page, theme = build_page(gr, ClipCaptioner(captioner, config, scratch), identity)
        page.queue(default_concurrency_limit=1, max_size=32)
        log.info("serving %s on http://%s:%d", config.run, config.host, config.port)
        page.launch(
            server_name=config.host,
            server_port=config.port,
            share=False,
            max_file_size=f"{config.max_upload_mb}mb",
            theme=theme,
            ssr_mode=False,
            footer_links=[],
            allowed_paths=[str(scratch)],
            prevent_thread_lock=True,
        )
        serve_until_stopped(page)
    return 0


def serve_until_stopped(page) -> None:
    """Block until Ctrl-C or SIGTERM, then close the server; a close that hangs on an open connection is given
    10 s (its threads are daemons: the process ends with this function's caller)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("stopping the web page")
    closer = threading.Thread(target=page.close, daemon=True)
    closer.start()
    closer.join(timeout=10)


if __name__ == "__main__":
    from dali.cli import run

    raise SystemExit(run("app", main))
