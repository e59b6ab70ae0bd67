"""The alignment's schedule chosen by its held-out loss, never by a test row (docs/results.md).

For a world and its pretrained encoder (after `make demo`), OT-Att's alignment with the demo's preset and seed under
each schedule given (epochs, the epoch after which the learning rate first halves, and how often it halves after),
each into its own folder under --out; then one table: each schedule's lowest held-out (val.json) loss, the epoch
that reached it, and its wall time. With --run (the demo's run of that world, for its prefix), also the CIDEr-D of
OT-Att's audio row from each: what a schedule costs on the test clips, reported, never used to choose.

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
from dali.runs import read_manifest  # noqa: E402
from dali.stage_table import ALIGN, PREFIX  # noqa: E402
from dali.stages import align, infer  # noqa: E402
from dali.synthetic.build import build_encoder  # noqa: E402
from dali.synthetic.demo import Row, align_flags, infer_flags, run_stage  # noqa: E402

AUDIO = Row("ot_att", False, "audio")


def probe(world: Path, out: Path, schedule: str, seed: int, run: Path | None) -> dict:
    epochs, start, every = (int(part) for part in schedule.split(":"))
    common = ["--llava", str(world / "captioner_model"), "--seed", str(seed)]
    flags = align_flags(world, AUDIO, common, reduced=False, start=build_encoder(world, seed=seed))  # reused
    flags += ["--epochs", str(epochs), "--lr-decay-start", str(start), "--lr-decay-every", str(every)]
    started = time.monotonic()
    group = out / schedule.replace(":", "_")
    folder = run_stage(align, group / ALIGN.folder, flags)
    seconds = time.monotonic() - started
    losses = [(row["val_loss"], row["epoch"]) for row in read_jsonl(folder / "metrics.jsonl") if "val_loss" in row]
    best, epoch = min(losses)
    cider = None
    if run is not None:
        row = run_stage(infer, group / "infer_audio", infer_flags(world, group, AUDIO, common, run / PREFIX.folder))
        cider = read_manifest(row)["metrics"]["scores"]["cider_d"]
    return {"schedule": schedule, "best_val_loss": best, "epoch": epoch, "seconds": seconds, "cider_d": cider}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schedules", nargs="+", help="epochs:decay_start:decay_every")
    parser.add_argument("--world", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=Path, help="the demo's run of this world: also OT-Att's audio row")
    args = parser.parse_args(argv)
    pin_torch()
    rows = [probe(args.world, args.out, schedule, args.seed, args.run) for schedule in args.schedules]
    print("| schedule (epochs:decay start:every) | lowest held-out loss | at epoch | seconds | OT-Att CIDEr-D |")
    print("|---|---|---|---|---|")
    for row in rows:
        cider = "—" if row["cider_d"] is None else f"{row['cider_d']:.3f}"
        print(f"| {row['schedule']} | {row['best_val_loss']:.1f} | {row['epoch']} | {row['seconds']:.0f} | {cider} |")
    (args.out / "schedules.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
