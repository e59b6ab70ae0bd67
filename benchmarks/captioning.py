"""Captioning throughput at LLaVA-1.5-7B shapes (random weights): audio-only captions of 10 s clips.

Each clip: fbank on the GPU -> CAV-MAE ViT-B + proj -> 512 audio tokens -> LLaVA's projector -> the v1 prompt
with the 16-token prefix -> N new tokens (exactly N: EOS is forbidden before N, in both engines). Compares
plain transformers `generate` (dynamic cache) at batch 1 (what the original does) and at its best batch with
our engine (`dali.models.decoding`: shared prompt head prefilled once, compiled prefill, static KV cache,
decode step in a CUDA graph), same GPU, same run; prints the roofline derived from FLOPs and bytes and where
our time goes.

    python benchmarks/captioning.py --new-tokens 20 64 --batches 1 64 128 --ours-batches 128

``--float8`` then runs our engine again with the LLM's linear layers in float8 (``--dtype float8``'s path): its
rows, its speed-up over our bf16 and where its time goes (not yet run on a GPU).
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
from dali.models.captioner import Captioner
from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig  # noqa: E402
from dali.models.decoding import DecodingOptions
from dali.models.prefix import Prefix  # noqa: E402


def roofline(config, batch: int, shared: int, row: int, new: int, ceilings: dict) -> dict:
    """Lower bound in seconds per batch for the least work the task needs.

    Prefill is compute-bound: the shared head (``shared`` positions) once, then ``row`` positions per clip;
    each decode step must read the weights and the whole KV cache. The bound counts the shared head once,
    as our engine does, so it is stricter than a per-clip prompt.
    """
    text = config.text_config
    layers, hidden, inter, vocab = text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size
    body = layers * (4 * hidden * hidden + 3 * hidden * inter)  # attention and MLP weights
    prompt = shared + row

    def attention_flops(queries: int, keys_before: int) -> float:  # causal: query i sees keys_before + i + 1
        return 4 * layers * hidden * (queries * keys_before + queries * (queries + 1) / 2)

    flops_prefill = 2 * body * shared + attention_flops(shared, 0)
    flops_prefill += batch * (2 * body * row + attention_flops(row, shared) + 2 * vocab * hidden)
    kv_bytes_per_token = layers * 2 * hidden * 2  # keys and values, bf16
    weights = body + vocab * hidden
    steps = range(new - 1)  # the first new token comes from the prefill
    decode_bytes = sum(2 * weights + batch * kv_bytes_per_token * (prompt + t) for t in steps)
    decode_flops = sum(batch * (2 * weights + 4 * layers * hidden * (prompt + t)) for t in steps)
    peak, bandwidth = ceilings["bf16_tflops"] * 1e12, ceilings["copy_tb_s"] * 1e12
    prefill_s = flops_prefill / peak
    decode_s = max(decode_bytes / bandwidth, decode_flops / peak)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "clips_per_s": batch / (prefill_s + decode_s)}


def sustained_gemm_tflops(config, tokens: int, rounds: int = 2) -> float:
    """bf16 TFLOP/s of the LLM's own matmuls at the prefill's shape, sustained over a whole prefill's worth.

    A short square matmul burst runs at boost clocks; a 1.5 s prefill of [tokens, 4096] x [4096, 11008]-shaped
    products does not. This is the attainable compute ceiling of the prefill on this card.
    """
    text = config.text_config
    hidden, inter = text.hidden_size, text.intermediate_size
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    square = torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16)

    def layers() -> None:
        for _ in range(text.num_hidden_layers):
            for _ in range(4):  # q, k, v, o
                x @ square
            for _ in range(2):  # gate, up
                h = x @ up
            h @ down

    layers()
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        layers()
    sync()
    flops = rounds * text.num_hidden_layers * 2 * tokens * (4 * hidden * hidden + 3 * hidden * inter)
    return flops / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[20, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 128, 256])
    parser.add_argument("--ours-batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=32)
    parser.add_argument(
        "--float8", action="store_true", help="then our engine again with the LLM's linear layers in float8"
    )
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

    shared_len, row_len = (part.shape[-2] for part in captioner.prompt_parts(blocks(1)))
    prompt_len = shared_len + row_len

    def run(batch: int, new: int, engine: str) -> float:
        """Clips per second of the whole path (features, encoder, prefill, decode), best of the repeats."""
        options = DecodingOptions(strategy="greedy", max_new_tokens=new, min_new_tokens=new, engine=engine)
        best = float("inf")
        clips = batch if batch > 1 else 8  # batch 1: several clips one after another
        warm_up = 1  # ours compiles on its first call; generate's first call at a shape pays for kernel setup
        for repeat in range(args.repeats + warm_up):
            sync()
            start = time.perf_counter()
            for _ in range(clips // batch):
                captioner.generate(blocks(batch), options)
            sync()
            if repeat >= warm_up:
                best = min(best, time.perf_counter() - start)
        return clips / best

    def where_time_goes(batch: int, new: int) -> dict:
        """One call of our engine timed part by part (synchronising between parts)."""
        sync()
        start = time.perf_counter()
        block = blocks(batch)
        sync()
        features = time.perf_counter() - start
        shared, rows = captioner.prompt_parts(block)
        tokenizer = captioner.tokenizer
        captioner.decoder.generate(
            shared, rows, new, tokenizer.eos_token_id, tokenizer.pad_token_id, min_new_tokens=new, profile=True
        )
        timings = captioner.decoder.timings
        parts = {"features_and_encoder": features, "shared_head": timings.shared, "prefill": timings.prefill}
        parts["decode"] = timings.decode
        parts["decode_per_step_ms"] = 1000 * timings.decode / max(timings.steps - 1, 1)
        return {key: round(value, 4) for key, value in parts.items()}

    results = {"ceilings": ceilings, "prompt_tokens": prompt_len, "shared_head_tokens": shared_len, "rows": []}

    def sweep(engine: str, batches: list[int], new: int, precision: str = "bfloat16") -> dict[int, float]:
        """Clips/s per batch size (ascending); a batch that runs out of memory is recorded and ends the sweep."""
        speeds = {}
        for batch in batches:
            try:
                speeds[batch] = run(batch, new, engine)
                row = {"clips_per_s": round(speeds[batch], 2)}
            except torch.OutOfMemoryError:
                captioner.release_decoder()  # drop a KV cache that did not fit
                torch.cuda.empty_cache()
                row = {"result": "out of memory"}
            results["rows"].append({"engine": engine, "precision": precision, "new_tokens": new, "batch": batch, **row})
            print(results["rows"][-1], flush=True)
            if "result" in row:
                break
        return speeds

    for new in args.new_tokens:
        # our engine's KV cache and CUDA graphs from the previous setting must not squeeze the baseline
        captioner.release_decoder()
        torch.compiler.reset()
        torch.cuda.empty_cache()
        plain = sweep("generate", args.batches, new)
        best_batch = max(plain, key=plain.get)
        ours = sweep("dali", args.ours_batches, new)
        our_batch = max(ours, key=ours.get)
        bound = roofline(config, our_batch, shared_len, row_len, new, ceilings)
        if "sustained_tflops" not in ceilings:
            ceilings["sustained_tflops"] = round(sustained_gemm_tflops(config, our_batch * row_len), 1)
        sustained = roofline(
            config, our_batch, shared_len, row_len, new, ceilings | {"bf16_tflops": ceilings["sustained_tflops"]}
        )
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
            "roofline_at_sustained_gemm_clips_per_s": round(sustained["clips_per_s"], 2),
            "fraction_of_roofline_at_sustained_gemm": round(ours[our_batch] / sustained["clips_per_s"], 2),
            "ours_seconds_per_batch": where_time_goes(our_batch, new),
        }
        for name, target, value in (
            ("speedup_vs_plain_best", 1.5, summary["speedup_vs_plain_best"]),
            ("fraction_of_roofline", 0.8, summary["fraction_of_roofline"]),
            ("fraction_of_roofline_at_sustained_gemm", 0.8, summary["fraction_of_roofline_at_sustained_gemm"]),
        ):
            verdict = "met" if value >= target else f"MISSED by {target / value:.2f}x"
            summary.setdefault("targets", {})[f"{name}>={target}"] = verdict
        results.setdefault("summary", []).append(summary)
        print(summary, flush=True)
    if args.float8:  # last: the layers are made float8 in place (`--dtype float8`'s path, dali.models.float8)
        from dali.models.float8 import check_float8, quantize_float8

        check_float8(torch.device("cuda"))
        captioner.release_decoder()
        torch.compiler.reset()
        quantize_float8(captioner.llava.model.language_model)
        for new in args.new_tokens:
            fp8 = sweep("dali", args.ours_batches, new, "float8")
            summary = next(item for item in results["summary"] if item["new_tokens"] == new)
            batch = max(fp8, key=fp8.get)
            summary |= {"float8_best": round(fp8[batch], 2), "float8_batch": batch}
            summary["float8_speedup_vs_ours_bf16"] = round(fp8[batch] / summary["ours_best"], 2)
            summary["float8_seconds_per_batch"] = where_time_goes(batch, new)
            print(summary, flush=True)
    results["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    report("captioning", results)
    print(f"device: {device_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
