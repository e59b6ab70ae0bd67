"""Captioning throughput at LLaVA-1.5-7B shapes (random weights): audio-only captions of 10 s clips.

Each clip: fbank on the GPU -> CAV-MAE ViT-B + proj -> 512 audio tokens -> LLaVA's projector -> the v1 prompt
with the 16-token prefix -> N new tokens (exactly N: min_new_tokens = max_new_tokens). Compares plain
transformers `generate` (dynamic cache) at batch 1 (what the original does) and at its best batch with our
path (static KV cache, decode step compiled with CUDA graphs by transformers), same GPU, same run, and
prints the roofline derived from FLOPs and bytes.

    python benchmarks/captioning.py --new-tokens 20 64 --batches 1 32 64 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_tokenizer, device_name, llava_7b_config, measured_ceilings, random_llava, report, sync  # noqa: E402

from dali.audio import kaldi_fbank, normalize_fbank, pad_or_crop  # noqa: E402
from dali.models.captioner import Captioner  # noqa: E402
from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig  # noqa: E402
from dali.models.prefix import Prefix  # noqa: E402


def roofline(config, batch: int, prompt: int, new: int, ceilings: dict) -> dict:
    """Lower bound in seconds per batch: prefill is compute-bound, each decode step reads weights + KV cache."""
    text = config.text_config
    layers, hidden, inter, vocab = text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size
    params = layers * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden  # attention, MLP, lm_head
    flops_prefill = batch * (2 * params * prompt + 4 * layers * hidden * prompt * prompt / 2)
    kv_bytes_per_token = layers * 2 * hidden * 2
    decode_bytes = sum(2 * params + batch * kv_bytes_per_token * (prompt + t) for t in range(new))
    decode_flops = sum(batch * (2 * params + 4 * layers * hidden * (prompt + t)) for t in range(new))
    peak, bandwidth = ceilings["bf16_tflops"] * 1e12, ceilings["copy_tb_s"] * 1e12
    prefill_s = flops_prefill / peak
    decode_s = max(decode_bytes / bandwidth, decode_flops / peak)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "clips_per_s": batch / (prefill_s + decode_s)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[20, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64, 128])
    parser.add_argument("--ours-batches", type=int, nargs="+", default=None, help="default: the plain best and 2x")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    ceilings = measured_ceilings()
    config = llava_7b_config(text_layers=args.text_layers)
    llava = random_llava(config)
    captioner = Captioner(llava, benchmark_tokenizer(), image_processor=None, source="random LLaVA-1.5-7B shapes")
    encoder = CAVMAEAudioEncoder(CAVMAEConfig()).to("cuda", torch.bfloat16).eval()
    prefix = Prefix(16, 4096).to("cuda", torch.bfloat16)
    waves = torch.randn(8, 160_000, device="cuda") * 0.1

    def blocks(batch: int) -> torch.Tensor:
        with torch.no_grad():
            fbank = normalize_fbank(pad_or_crop(kaldi_fbank(waves[torch.arange(batch) % 8])))  # on the GPU
            audio = encoder.project(fbank.to(torch.bfloat16))
            return captioner.modality_block(audio_tokens=audio, prefix=prefix())

    prompt_len = captioner.build_inputs(blocks(1))["inputs_embeds"].shape[1]

    def run(batch: int, new: int, static: bool) -> float:
        """Clips per second of the whole path (features, encoder, prefill, decode), best of the repeats."""
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=3)
        if static:
            kwargs["cache_implementation"] = "static"
        best = float("inf")
        clips = batch if batch > 1 else 8  # batch 1: several clips one after another
        for repeat in range(args.repeats + (1 if static else 0)):  # the first static run compiles
            sync()
            start = time.perf_counter()
            for _ in range(clips // batch):
                inputs = captioner.build_inputs(blocks(batch))
                with torch.no_grad():
                    llava.generate(**inputs, **kwargs)
            sync()
            elapsed = time.perf_counter() - start
            if not (static and repeat == 0):
                best = min(best, elapsed)
        return clips / best

    results = {"ceilings": ceilings, "prompt_tokens": prompt_len, "rows": []}
    for new in args.new_tokens:
        plain = {}
        for batch in args.batches:
            try:
                plain[batch] = run(batch, new, static=False)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            results["rows"].append(
                {"engine": "hf-generate", "new_tokens": new, "batch": batch, "clips_per_s": round(plain[batch], 2)}
            )
            print(results["rows"][-1], flush=True)
        best_batch = max(plain, key=plain.get)
        ours = {}
        for batch in args.ours_batches or sorted({best_batch, 2 * best_batch}):
            try:
                ours[batch] = run(batch, new, static=True)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            results["rows"].append(
                {
                    "engine": "dali-static-compiled",
                    "new_tokens": new,
                    "batch": batch,
                    "clips_per_s": round(ours[batch], 2),
                }
            )
            print(results["rows"][-1], flush=True)
        our_batch = max(ours, key=ours.get)
        bound = roofline(config, our_batch, prompt_len, new, ceilings)
        summary = {
            "new_tokens": new,
            "plain_batch1": round(plain[1], 2) if 1 in plain else None,
            "plain_best": round(plain[best_batch], 2),
            "plain_best_batch": best_batch,
            "ours_best": round(ours[our_batch], 2),
            "ours_batch": our_batch,
            "speedup_vs_plain_best": round(ours[our_batch] / plain[best_batch], 2),
            "roofline_clips_per_s": round(bound["clips_per_s"], 2),
            "fraction_of_roofline": round(ours[our_batch] / bound["clips_per_s"], 2),
            "roofline_prefill_s": round(bound["prefill_s"], 3),
            "roofline_decode_s": round(bound["decode_s"], 3),
        }
        summary["targets"] = {
            "speedup>=1.5": summary["speedup_vs_plain_best"] >= 1.5,
            "roofline>=0.8": summary["fraction_of_roofline"] >= 0.8,
        }
        results.setdefault("summary", []).append(summary)
        print(summary, flush=True)
    results["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    report("captioning", results)
    print(f"device: {device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
