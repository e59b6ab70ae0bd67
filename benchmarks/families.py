"""Throughput of another audio encoder and another captioner at real sizes, random weights (docs/extending.md).

1. Alignment: one OT-Att step as ``dali align`` takes it on a GPU (bf16 autocast, entropic OT on the device,
   CLIP ViT-L/14-336 tokens cached, fused Adam) for CAV-MAE ViT-B (512 tokens) and AST-base (its 1212 overlapping
   patch tokens, or ``--audio-tokens`` pooled), and the clips/s one CPU core turns into each encoder's input (how
   many loader workers feed it).
2. Captioning: audio-only captions (512 CAV-MAE tokens, the 16-token prefix, ``--new-tokens`` greedy tokens, our
   engine) at LLaVA-1.5-7B and LLaVA-NeXT-7B shapes (Vicuna-7B and CLIP ViT-L/14-336 both; each with its prompt:
   the original's conversation, a chat template).

    python benchmarks/families.py --align-batch 64 --caption-batch 128

``--tiny`` runs both at toy sizes on any device (to try the benchmark itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_tokenizer, device_name, llava_7b_config, random_llava, report, sync  # noqa: E402

from dali.audio import audio_to_features  # noqa: E402
from dali.losses import AttentiveTokenWeights, ot_loss  # noqa: E402
from dali.models.audio_encoders import FAMILIES, TransformersAudioEncoder, hf_class  # noqa: E402
from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def encoders(tiny: bool, audio_tokens: int | None) -> dict:
    """CAV-MAE ViT-B + proj and AST-base + proj (both into CLIP ViT-L's 1024), or toy versions."""
    vision = 32 if tiny else 1024
    cav = CAVMAEConfig(embed_dim=32, depth_audio=1, num_heads=2, proj_dim=vision) if tiny else CAVMAEConfig()
    ast_shape = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    ast_config = hf_class(FAMILIES["ast"].config)(**(ast_shape if tiny else {}))  # ASTConfig(): AST-base
    ast = TransformersAudioEncoder(
        "ast", hf_class("ASTModel")(ast_config), hf_class("ASTFeatureExtractor")(), vision, 1024, audio_tokens
    )
    return {"cav-mae": CAVMAEAudioEncoder(cav), "ast": ast}


def front_end_rate(encoder, clips: int = 16) -> float:
    """Clips/s of one CPU core making the encoder's input from 10.24 s waves."""
    waves = [0.1 * torch.randn(163_840) for _ in range(clips)]
    make = encoder.front_end or audio_to_features
    start = time.perf_counter()
    for wave in waves:
        make(wave)
    return round(clips / (time.perf_counter() - start), 1)


def alignment_rate(encoder, batch: int, steps: int, vision: int, image_tokens: int, recompute: bool) -> dict:
    """Clips/s of OT-Att training steps (median step) and the peak memory (``recompute``: each block recomputed in
    backward, as ``dali align --gradient-checkpointing``)."""
    encoder = encoder.to(DEVICE).train()
    if recompute:
        encoder.enable_gradient_checkpointing()
    scorers = AttentiveTokenWeights(vision, 8).to(DEVICE)
    trained = [*encoder.parameters(), *scorers.parameters()]
    optimizer = torch.optim.Adam(trained, lr=1e-4, fused=DEVICE == "cuda")
    wave = 0.1 * torch.randn(163_840)
    features = (encoder.front_end or audio_to_features)(wave).to(DEVICE)
    features = features.unsqueeze(0).expand(batch, *features.shape).contiguous()
    image = torch.randn(batch, image_tokens, vision, device=DEVICE)
    project = torch.compile(encoder.project, dynamic=False) if DEVICE == "cuda" else encoder.project
    times = []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 1):  # the first compiles
        sync()
        start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            audio = project(features).float()
            weights = scorers(audio, image)
        loss = ot_loss(audio, image, weights.audio, weights.image, solver="sinkhorn", max_iters=100, tol=0)
        optimizer.zero_grad(set_to_none=True)
        (loss - 100 * weights.entropy.mean()).backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    median = statistics.median(times[1:])
    attention = getattr(getattr(encoder, "model", None), "config", None)
    attention = attention._attn_implementation if attention is not None else "sdpa"  # (CAV-MAE calls sdpa itself)
    return {
        "tokens": audio.shape[1], "batch": batch, "gradient_checkpointing": recompute, "attention": attention,
        "clips_per_s": round(batch / median, 1), "peak_memory_gib": peak,
    }  # fmt: skip


def caption_rate(family: str, batch: int, new_tokens: int, tiny: bool, folder: Path) -> float:
    """Clips/s of audio-only captions through ``Captioner`` loaded from a folder of the family (random weights)."""
    from dali.models.captioner import Captioner
    from dali.models.decoding import DecodingOptions
    from dali.models.tiny_llava import TinyLlavaConfig, build_tiny_llava, save_tiny_llava

    tokenizer = benchmark_tokenizer()
    torch.manual_seed(0)
    if tiny:
        model = build_tiny_llava(tokenizer, TinyLlavaConfig(vocab_size=len(tokenizer)), family=family)
    else:
        config = llava_7b_config(len(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
        model = random_llava(family_config(config, family), device=DEVICE)
    save_tiny_llava(model, tokenizer, folder / family)
    del model
    dtype = torch.float32 if tiny else torch.bfloat16
    captioner = Captioner.from_pretrained(folder / family, dtype=dtype, device=DEVICE)
    audio = torch.randn(batch, 512, captioner.vision_dim, device=DEVICE, dtype=dtype)
    block = captioner.modality_block(audio_tokens=audio, prefix=torch.randn(16, captioner.hidden_size))
    options = DecodingOptions(strategy="greedy", max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    times = []
    for _ in range(3):  # the first compiles
        sync()
        start = time.perf_counter()
        captioner.generate(block, options)
        sync()
        times.append(time.perf_counter() - start)
    captioner.release_decoder()
    return round(batch / min(times[1:]), 2)


def family_config(config, family: str):
    """LLaVA-1.5-7B's config, or the same towers in the family's config (LLaVA-NeXT: its tile grid)."""
    from dali.models.tiny_llava import family_classes

    if family == "llava":
        return config
    tiles = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return family_classes(family)[0](
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=config.image_token_id,
        image_grid_pinpoints=tiles,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--align-batch", type=int, default=64)
    parser.add_argument("--align-steps", type=int, default=3)
    parser.add_argument("--audio-tokens", type=int, help="pool AST's tokens to this many (default: all)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the encoder's blocks in backward"
    )
    parser.add_argument("--no-captioning", action="store_true", help="the alignment rows only")
    parser.add_argument("--caption-batch", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to try the benchmark on any machine")
    args = parser.parse_args()
    vision, image_tokens = (32, 16) if args.tiny else (1024, 576)
    result: dict = {"alignment": {}, "front_end_clips_per_s_one_core": {}, "captioning_clips_per_s": {}}
    for name, encoder in encoders(args.tiny, args.audio_tokens).items():
        result["front_end_clips_per_s_one_core"][name] = front_end_rate(encoder)
        rate = alignment_rate(
            encoder, args.align_batch, args.align_steps, vision, image_tokens, args.gradient_checkpointing
        )
        result["alignment"][name] = rate
        print(name, result["alignment"][name], flush=True)
        del encoder
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as folder:
        for family in () if args.no_captioning else ("llava", "llava_next"):
            rate = caption_rate(family, args.caption_batch, args.new_tokens, args.tiny, Path(folder))
            result["captioning_clips_per_s"][family] = rate
            print(family, rate, flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    result |= {"align_batch": args.align_batch, "caption_batch": args.caption_batch, "new_tokens": args.new_tokens}
    report("families", result)
    print(f"device: {device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
