"""Distillation with the teacher's flagged pseudo-captions left out, beside the demo's, per seed (docs/results.md).

For each seed's run of `make demo-seeds`: `dali distill --filter` with the demo's preset, seed and pseudo-captions
(into ot_att/distill_filtered), the distilled audio row from it (ot_att/infer_audio_distilled_filtered), then one
table: CIDEr-D of OT-Att, of its student and of the filtered student, the pseudo-captions left out and the filtered
student's looping captions, and the margin of each student over OT-Att across seeds.

    make demo-seeds
    python scripts/filter_probe.py --expe expe --run demo --world data/synthetic
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali.cpu_kernels import pin_environment  # noqa: E402

pin_environment()  # the demo's kernels, before torch loads (as the `dali` entry does)

from loop_census import looping  # noqa: E402

from dali.cpu_kernels import pin_torch  # noqa: E402
from dali.runs import read_manifest  # noqa: E402
from dali.stage_table import ALIGN, DISTILL, PREFIX, PSEUDO_LABEL  # noqa: E402
from dali.stages import distill, infer  # noqa: E402
from dali.synthetic.demo import Row, infer_flags, preset, run_stage  # noqa: E402

FILTERED = "distill_filtered"
STUDENT = Row("ot_att", True, "audio")


def cider(folder: Path) -> float:
    return read_manifest(folder)["metrics"]["scores"]["cider_d"]


def probe(run: Path, world: Path, seed: int) -> dict:
    """The filtered student of one seed's run, and the CIDEr-D of the three rows."""
    llava = world / "captioner_model"
    common = ["--llava", str(llava), "--seed", str(seed)]
    group = run / "ot_att"
    upstream = ["--align-dir", str(group / ALIGN.folder), "--pseudo-dir", str(group / PSEUDO_LABEL.folder)]
    filtered = run_stage(distill, group / FILTERED, [*preset("distillation"), *common, *upstream, "--filter"])
    flags = infer_flags(world, group, STUDENT, common, run / PREFIX.folder)
    flags[flags.index(str(group / DISTILL.folder))] = str(filtered)
    row = run_stage(infer, group / "infer_audio_distilled_filtered", flags)
    left_out = read_manifest(filtered)["metrics"]["filtered"]["captions"]
    return {
        "OT-Att": cider(group / "infer_audio"),
        "+ distillation": cider(group / "infer_audio_distilled"),
        "+ distillation --filter": cider(row),
        "left out": left_out,
        "looping": looping(row / "predictions.jsonl"),
    }


def margin(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f} (mean ± std over seeds)" if len(values) > 1 else " (one seed)"
    return f"{statistics.mean(values):+.3f}{spread}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expe", default="expe", help="the experiments folder")
    parser.add_argument("--run", default="demo", help="seed 0's run; seed k's is <run>_seed<k>")
    parser.add_argument("--world", default="data/synthetic", help="seed 0's world; seed k's is <world>_seed<k>")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    pin_torch()
    suffix = [f"_seed{seed}" if seed else "" for seed in range(args.seeds)]
    rows = [probe(Path(args.expe) / (args.run + s), Path(args.world + s), seed) for seed, s in enumerate(suffix)]
    columns = ["OT-Att", "+ distillation", "+ distillation --filter", "left out", "looping"]
    print("| seed | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for seed, row in enumerate(rows):
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    for student in ("+ distillation", "+ distillation --filter"):
        print(f"{student} - OT-Att: {margin([row[student] - row['OT-Att'] for row in rows])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
