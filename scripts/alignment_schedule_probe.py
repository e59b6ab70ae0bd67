"""The alignment's schedule chosen by its held-out loss, never by a test row (docs/results.md).

For a world and its pretrained encoder (after `make demo`), OT-Att's alignment with the demo's preset and seed under
each schedule given (epochs, the epoch after which the learning rate first halves, and how often it halves after),
each into its own folder under --out; then one table: each schedule's lowest held-out (val.json) loss, the epoch
that reached it, and its wall time.

    make demo
    python scripts/alignment_schedule_probe.py --world data/synthetic --out /tmp/schedules 20:15:2 10:6:1 10:5:2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali.cpu_kernels import pin_environment  # noqa: E402

pin_environment()  # the demo's kernels, before torch loads (as the `dali` entry does)

from dali.cpu_kernels import pin_torch  # noqa: E402
from dali.jsonl import read_jsonl  # noqa: E402
from dali.stages import align  # noqa: E402
from dali.synthetic.demo import preset, run_stage  # noqa: E402


def probe(world: Path, out: Path, schedule: str, seed: int) -> dict:
    epochs, start, every = (int(part) for part in schedule.split(":"))
    flags = [*preset("alignment"), "--llava", str(world / "captioner_model"), "--seed", str(seed)]
    flags += ["--train-list", str(world / "align.json"), "--val-list", str(world / "val.json")]
    flags += ["--init-encoder", str(world / "encoder_pretrained" / "audio_encoder.safetensors")]
    flags += ["--epochs", str(epochs), "--lr-decay-start", str(start), "--lr-decay-every", str(every)]
    started = time.monotonic()
    folder = run_stage(align, out / schedule.replace(":", "_"), flags)
    losses = [(row["val_loss"], row["epoch"]) for row in read_jsonl(folder / "metrics.jsonl") if "val_loss" in row]
    best, epoch = min(losses)
    return {"schedule": schedule, "best_val_loss": best, "epoch": epoch, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schedules", nargs="+", help="epochs:decay_start:decay_every")
    parser.add_argument("--world", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pin_torch()
    rows = [probe(args.world, args.out, schedule, args.seed) for schedule in args.schedules]
    print("| schedule (epochs:decay start:every) | lowest held-out loss | at epoch | seconds |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['schedule']} | {row['best_val_loss']:.1f} | {row['epoch']} | {row['seconds']:.0f} |")
    (args.out / "schedules.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
