"""Stages 1a and 2b at the paper's batch sizes with LLaVA-1.5-7B shapes (random weights): step time and peak
memory. 1a: [576 image tokens, 16-token prefix] + a caption, only the prefix trained, batch 16.
2b: [512 audio tokens] + a caption, only a projector copy trained, batch 40.

    python benchmarks/train_steps.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_tokenizer, device_name, llava_7b_config, random_llava, report, sync  # noqa: E402

from dali.models.captioner import Captioner  # noqa: E402
from dali.models.prefix import Prefix  # noqa: E402

CAPTION = "a man speaks while a dog barks in the distance and a car passes by"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    args = parser.parse_args()
    torch.manual_seed(0)
    llava = random_llava(llava_7b_config())
    captioner = Captioner(llava, benchmark_tokenizer(), image_processor=None)
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for stage, batch in (("1a_prefix", 16), ("2b_distill", 40)):
        for checkpointing in modes:
            if checkpointing:
                captioner.enable_gradient_checkpointing()
            else:
                llava.model.language_model.gradient_checkpointing_disable()
            prefix = Prefix(16, 4096).cuda()
            projector = captioner.copy_projector().cuda().to(torch.bfloat16)
            trained = list(prefix.parameters()) if stage == "1a_prefix" else list(projector.parameters())
            optimizer = torch.optim.AdamW(trained, lr=1e-4)
            pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
            audio = torch.randn(batch, 512, 1024, device="cuda", dtype=torch.bfloat16)

            def step() -> float:
                sync()
                start = time.perf_counter()
                if stage == "1a_prefix":
                    block = captioner.modality_block(
                        image_tokens=captioner.image_tokens(pixels), prefix=prefix().to(torch.bfloat16)
                    )
                else:
                    block = captioner.modality_block(audio_tokens=audio, audio_projector=projector)
                loss = captioner.caption_loss(block, [CAPTION] * batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sync()
                return time.perf_counter() - start

            torch.cuda.reset_peak_memory_stats()
            try:
                step()
                times = [step() for _ in range(args.steps)]
            except torch.OutOfMemoryError:
                rows.append(
                    {"stage": stage, "batch": batch, "gradient_checkpointing": checkpointing, "result": "out of memory"}
                )
                torch.cuda.empty_cache()
                continue
            median = sorted(times)[len(times) // 2]
            rows.append(
                {
                    "stage": stage,
                    "batch": batch,
                    "gradient_checkpointing": checkpointing,
                    "step_s": round(median, 3),
                    "samples_per_s": round(batch / median, 1),
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
                }
            )
            print(rows[-1], flush=True)

            torch.cuda.empty_cache()
    report("train_steps", {"rows": rows})
    print(f"device: {device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
