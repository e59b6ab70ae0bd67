"""Files made in the tests: media written with PyAV, checkpoints written in the original DALI key layouts; commands
run in a process of their own (and killed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def tiny_encoder_flags(world: Path, llava: Path) -> list[str]:
    """Stage-1b flags for a CPU-sized encoder on the reduced world: 32 wide, 1+1 blocks, 64 audio tokens."""
    return [
        "--llava",
        str(llava),
        "--train-list",
        str(world / "align.json"),
        "--encoder-dim",
        "32",
        "--encoder-depth",
        "1",
        "--encoder-heads",
        "2",
        "--encoder-patch-time",
        "128",
    ]


def original_layout(encoder, with_extras: bool) -> dict:
    """A state dict as the original code saves it: DataParallel 'module.' keys plus the branches it also kept."""
    state = {f"module.{key}": value.clone() for key, value in encoder.state_dict().items()}
    if with_extras:
        dim = encoder.config.embed_dim
        state["module.patch_embed_v.proj.weight"] = torch.randn(dim, 3, 16, 16)
        state["module.blocks_v.0.attn.qkv.weight"] = torch.randn(3 * dim, dim)
        state["module.decoder_blocks.0.norm1.weight"] = torch.randn(16)
        state["module.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.randn(4, 3, 14, 14)
        state["module.audio_scorer.in_proj_weight"] = torch.randn(12, 4)
        state["module.a_q.weight"] = torch.randn(4, 4)
    return state


def write_mp4(
    path: Path, seconds: float = 3.0, fps: int = 10, rate: int = 44_100, size=(96, 64), sound: bool = True
) -> Path:
    """A small mp4: a red square moving over black, and (``sound``) a 440 Hz tone in AAC stereo."""
    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        if sound:
            audio = container.add_stream("aac", rate=rate)
            audio.layout = "stereo"
        for index in range(int(seconds * fps)):
            image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            x = 20 + int(index / (seconds * fps) * (size[0] - 56))  # stays inside the centre crop
            image[20:36, x : x + 16] = (255, 0, 0)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound:
            _write_tone(container, audio, seconds, rate)
    return path


def _write_tone(container, audio, seconds: float, rate: int) -> None:
    import av

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    samples = np.stack([tone, tone * 0.5])  # planar stereo
    step = 1024
    for start in range(0, samples.shape[1], step):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples[:, start : start + step]), format="fltp", layout="stereo"
        )
        frame.sample_rate = rate
        for packet in audio.encode(frame):
            container.mux(packet)
    for packet in audio.encode():
        container.mux(packet)


def prefix_flags(world: Path, llava: Path, epochs: int) -> list[str]:
    """Stage 1a on the reduced world with a 4-token prefix (add --out)."""
    pairs = str(world / "prefix_pairs.json")
    return ["--llava", str(llava), "--pairs", pairs, "--epochs", str(epochs), "--num-prefix-tokens", "4"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def align_flags(world, llava, method="ot_att"):
    return [
        *tiny_encoder_flags(world, llava),
        "--val-list",
        str(world / "val.json"),
        "--method",
        method,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-steps-per-epoch",
        "2",
        "--num-workers",
        "0",
        "--cache-vision-tokens",
        "--scorer-heads",
        "2",
    ]


ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str], kill_when=None, timeout: float = 240) -> int | None:
    """Run a stage in a subprocess; with ``kill_when``, SIGKILL it once that predicate holds."""
    env = dict(os.environ, DALI_PROGRESS="0", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "dali.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if kill_when is not None and kill_when():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return None
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        raise TimeoutError(" ".join(argv))
    assert process.returncode == 0, process.stderr.read()[-3000:]
    return process.returncode


def cli_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0
