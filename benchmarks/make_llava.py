"""Write a randomly initialised LLaVA-1.5-shaped model in Hugging Face format (for GPU runs without weights).

    python benchmarks/make_llava.py OUT --tokenizer-from data/synthetic/captioner_model --text-layers 8
Sizes default to CLIP ViT-L/14-336 + a 2048-wide, 8-layer Llama; the tokenizer is copied from a folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali.models.tiny_llava import TinyLlavaConfig, build_tiny_llava, save_tiny_llava  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tokenizer-from", required=True)
    parser.add_argument("--text-hidden", type=int, default=2048)
    parser.add_argument("--text-layers", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
    config = TinyLlavaConfig(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_heads=args.text_hidden // 128,
    )
    model = build_tiny_llava(tokenizer, config).to(torch.bfloat16)
    save_tiny_llava(model, tokenizer, args.out)
    print(f"random LLaVA ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
