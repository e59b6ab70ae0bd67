"""How many captions of each demo row loop, per seed (docs/results.md): test captions that `dali quality`'s rule
flags `repetition` (dali.caption_quality.caption_flags), and the pseudo-labelling teacher's flagged captions.

    make demo-seeds
    python scripts/loop_census.py --expe expe --run demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali.caption_quality import caption_flags  # noqa: E402
from dali.jsonl import read_jsonl  # noqa: E402

ROWS = {  # column -> the row's predictions, in the run's folder
    "OT-Att": "ot_att/infer_audio",
    "+ distillation": "ot_att/infer_audio_distilled",
    "audio + image": "ot_att/infer_audio_vis",
    "OT": "ot/infer_audio",
    "unaligned": "unaligned/infer_audio",
}
TEACHER = "ot_att/pseudo_label/pseudo_captions.jsonl"


def looping(path: Path) -> str:
    """'looping of all' for one predictions file, or '—' where the row was not run."""
    if not path.exists():
        return "—"
    captions = [record["caption"] for record in read_jsonl(path)]
    return f"{sum('repetition' in caption_flags(caption) for caption in captions)} of {len(captions)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expe", default="expe", help="the experiments folder")
    parser.add_argument("--run", default="demo", help="seed 0's run; seed k's is <run>_seed<k>")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    print("| seed | " + " | ".join(ROWS) + " | teacher's pseudo-captions |\n|" + "---|" * (len(ROWS) + 2))
    for seed in range(args.seeds):
        run = Path(args.expe) / (args.run + (f"_seed{seed}" if seed else ""))
        cells = [looping(run / folder / "predictions.jsonl") for folder in ROWS.values()] + [looping(run / TEACHER)]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
