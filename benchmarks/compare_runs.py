"""Compare a 1-process and an N-process run of the same stage: loss curves and throughput.

    python benchmarks/compare_runs.py RUN_1GPU RUN_NGPU --global-batch 16
Prints the largest loss difference per step and the speed-up of the median step time (same global batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali.jsonl import read_jsonl


def step_times(records: list[dict]) -> list[float]:
    """Seconds between consecutive steps, within epochs where epochs have several steps (epoch ends hold
    checkpoints and loader restarts); the first gap, with warm-up and compilation, is dropped."""
    steps = [r for r in records if "loss" in r and "step" in r]
    pairs = list(zip(steps, steps[1:]))
    within = [(a, b) for a, b in pairs if a.get("epoch") == b.get("epoch")]
    return [b["time"] - a["time"] for a, b in (within if len(within) > 2 else pairs)][1:]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("single")
    parser.add_argument("multi")
    parser.add_argument("--name", default="stage")
    args = parser.parse_args()
    single = [r for r in read_jsonl(Path(args.single) / "metrics.jsonl") if "loss" in r]
    multi = [r for r in read_jsonl(Path(args.multi) / "metrics.jsonl") if "loss" in r]
    pairs = list(zip(single, multi))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in pairs]
    t1, tn = statistics.median(step_times(single)), statistics.median(step_times(multi))
    result = {
        "stage": args.name,
        "steps": len(pairs),
        "max_abs_loss_diff": max(diffs),
        "max_rel_loss_diff": max(d / max(abs(a["loss"]), 1e-9) for d, (a, _) in zip(diffs, pairs)),
        "first_loss": [single[0]["loss"], multi[0]["loss"]],
        "last_loss": [single[-1]["loss"], multi[-1]["loss"]],
        "median_step_s_1gpu": round(t1, 4),
        "median_step_s_ngpu": round(tn, 4),
        "throughput_speedup": round(t1 / tn, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
