"""Kernel-level profile of our decoding engine at LLaVA-1.5-7B shapes (random weights): where the GPU time goes.

Runs one warm call of :class:`dali.models.decoding.StaticDecoder` on random prompt embeddings of DALI's shape
(26 shared positions + 539 per clip) under ``torch.profiler`` and prints the kernels grouped by kind (matmul,
attention, fused elementwise, copies), then the top kernels.

    python benchmarks/profile_decoding.py --batch 256 --new-tokens 20
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, llava_7b_config, random_llava, sync  # noqa: E402

from dali.models.decoding import StaticDecoder  # noqa: E402

KINDS = (  # first match wins (cuDNN's attention kernels also say "wgmma"; Inductor's fused ones say "copy")
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma")),
    ("fused (triton)", ("triton",)),
    ("copy/fill", ("copy", "fill", "memcpy", "memset")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--shared", type=int, default=26)
    parser.add_argument("--row", type=int, default=539)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    llava = random_llava(llava_7b_config())
    decoder = StaticDecoder(llava)
    shared = torch.randn(args.shared, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = torch.randn(args.batch, args.row, 4096, device="cuda", dtype=torch.bfloat16) * 0.02

    def call(profile: bool = False):
        return decoder.generate(shared, rows, args.new_tokens, 2, 3, min_new_tokens=args.new_tokens, profile=profile)

    for _ in range(2):  # compile, then one warm call
        call()
    call(profile=True)
    print({"device": device_name(), "batch": args.batch, **vars(decoder.timings)}, flush=True)
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        call()
        sync()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(event.name)] += event.device_time / 1e3  # ms
            by_name[event.name] += event.device_time / 1e3
    total = sum(by_kind.values())
    print(f"GPU kernel time {total:.1f} ms")
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:16s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
    for name, ms in sorted(by_name.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {ms:9.1f} ms  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
