"""The web page's latency: from upload to table for a 10 s clip, once the model is loaded.

    python benchmarks/app.py --run expe/demo/ot_att          # CPU, the demo's model, through the real server
    python benchmarks/app.py --llava-7b                       # GPU, random weights at LLaVA-1.5-7B shapes

With ``--run`` a ``dali app`` server is started on a free port and each request goes through Gradio's HTTP API
(upload, queue, captioning, answer), as the page sends it. With ``--llava-7b`` the page's captioner runs
in-process on random 7B-shaped models (no run folder of 14 GB to write); the HTTP part is the CPU figure's.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402


def ten_second_clip(folder: Path) -> Path:
    """10 s of a tone with bursts: any audio does for latency."""
    t = np.arange(160_000) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 2 * t) > 0)
    soundfile.write(folder / "clip10.wav", wave.astype(np.float32), 16_000)
    return folder / "clip10.wav"


def through_the_server(run: str, clip: Path, repeats: int) -> list[float]:
    from gradio_client import Client, handle_file

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dali.cli", "app", "--run", run, "--port", str(port)])
    try:
        for _ in range(600):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not up yet
                time.sleep(0.5)
        times = []
        for _ in range(repeats + 1):  # the first request warms up
            started = time.perf_counter()
            rows = client.predict(handle_file(str(clip)), None, "audio", "greedy", 0, api_name="/caption")[0]
            times.append(time.perf_counter() - started)
        assert rows["data"], rows
        return times[1:]
    finally:
        server.terminate()
        server.wait()


def in_process_7b(clip: Path, repeats: int) -> list[float]:
    import torch
    from common import benchmark_tokenizer, llava_7b_config, random_llava

    from dali.audio_captioner import AudioCaptioner
    from dali.captioning import CaptioningModels
    from dali.command_configs import AppConfig
    from dali.models.captioner import Captioner
    from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig
    from dali.models.prefix import Prefix
    from dali.tools.app import ClipCaptioner

    captioner = Captioner(random_llava(llava_7b_config()), benchmark_tokenizer(), image_processor=None, source="7B")
    encoder = CAVMAEAudioEncoder(CAVMAEConfig()).to("cuda", torch.bfloat16).eval()
    models = CaptioningModels(captioner, encoder, Prefix(16, 4096).to("cuda", torch.bfloat16))
    uploads = Path(tempfile.mkdtemp())  # the page removes what it captions from its uploads folder: not the clip
    page = ClipCaptioner(AudioCaptioner(models), AppConfig(run="random 7B"), uploads)
    times = []
    for _ in range(repeats + 2):  # two warm-ups: compilation and CUDA graphs
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = page(str(clip), "audio", "greedy", 0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        assert result.rows, result.message
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run served by dali app (CPU figure)")
    parser.add_argument("--llava-7b", action="store_true", help="random LLaVA-1.5-7B shapes, in-process (GPU figure)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        clip = ten_second_clip(Path(folder))
        times = in_process_7b(clip, args.repeats) if args.llava_7b else through_the_server(args.run, clip, args.repeats)
    what = "in-process page captioner, random 7B" if args.llava_7b else f"dali app HTTP API, run {args.run}"
    report(
        "app latency, 10 s clip, upload to table",
        {"path": what, "median_s": statistics.median(times), "times_s": [round(t, 3) for t in times]},
    )


if __name__ == "__main__":
    main()
