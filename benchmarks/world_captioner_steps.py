"""The synthetic world's captioner: the time of its training steps, under the demo's pinned kernels.

An image step as trained (16 images, each with its visual caption and its sounds: one pass of CLIP and of the LM
over each image block), beside the steps it replaced (32 images with one answer each: CLIP and the block run once
per answer), and a text step (32 sentences). Median of --steps steps each, after one warm-up; a random captioner
of the preset's shape (the time does not depend on the weights). Needs the world (`make demo` or `dali world`).

    python benchmarks/world_captioner_steps.py --world data/synthetic
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dali.cpu_kernels import pin_environment  # noqa: E402

pin_environment()  # the demo's kernels, before torch loads (as the `dali` entry does)

import torch  # noqa: E402
from common import device_name  # noqa: E402
from PIL import Image  # noqa: E402

from dali.cpu_kernels import pin_torch  # noqa: E402
from dali.synthetic import captioner as world_captioner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    pin_torch()
    records = json.loads((args.world / "captioner" / "captions.json").read_text())[:64]
    text = (args.world / "captioner" / "text.txt").read_text().splitlines()
    training = world_captioner.CaptionerTraining()
    captioner, _ = world_captioner._untrained_captioner(records, text, training, Path(tempfile.mkdtemp()))
    images = [Image.open(args.world / "captioner" / record["image"]).convert("RGB") for record in records]
    words = world_captioner._caption_words(records)
    data = (records, text, captioner.preprocess_images(images), words)
    head = torch.nn.Linear(captioner.vision_dim, words.shape[1])
    optimizer = torch.optim.AdamW(list(captioner.llava.parameters()) + list(head.parameters()), lr=1e-3)
    rng = random.Random(0)

    def step(loss_of) -> float:
        started = time.perf_counter()
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    def one_answer(field: str, question: str):
        def loss():
            tokens = world_captioner._tokens_with_grad(captioner, data[2][:32])
            block = captioner.modality_block(image_tokens=tokens)
            answers = [record[field] for record in records[:32]]
            words_loss = torch.nn.functional.binary_cross_entropy_with_logits(head(tokens.mean(1)), words[:32])
            return captioner.caption_loss(block, answers, question=question) + words_loss

        return loss

    def as_trained(kind: str, size: int):
        return lambda: world_captioner._task_loss(captioner, head, data, kind, list(range(size)), training, rng)

    kinds = {
        "image, 16 images x 2 answers (as trained)": as_trained("image", 16),
        "caption, 32 images x 1 answer (before)": one_answer("caption", world_captioner.IMAGE_QUESTIONS[0]),
        "sounds, 32 images x 1 answer (before)": one_answer("sounds", world_captioner.SOUND_QUESTION),
        "text, 32 sentences": as_trained("text", 32),
    }
    print(f"device: {device_name()}, {torch.get_num_threads()} threads")
    for name, loss_of in kinds.items():
        times = [step(loss_of) for _ in range(args.steps + 1)][1:]
        print(f"{name}: {statistics.median(times):.4f} s a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
