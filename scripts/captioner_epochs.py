"""The held-out criterion that chose the synthetic captioner's epochs (docs/results.md): the image row of `make demo`
(the captioner with its stage-1a prefix, describing the sounds of a frame) scored on the world's 100 validation
scenes, never on the test clips, for captioners trained with each epoch count.

    python -m dali.cli world --out data/synthetic                  # the world (and its preset captioner)
    python scripts/captioner_epochs.py --world data/synthetic --seed 0 --epochs 10 7 6 --out /tmp/epochs

The kernels are pinned as `dali world` pins them, so its captioners are those `make demo` would train.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dali.cpu_kernels import pin_environment  # noqa: E402

pin_environment()  # before torch loads, as the `dali` entry does for world and demo

import numpy as np  # noqa: E402

from dali.cpu_kernels import pin_torch  # noqa: E402
from dali.runs import read_manifest  # noqa: E402
from dali.stages import infer, prefix_tune  # noqa: E402
from dali.synthetic.build import CAPTIONER_FOLDER  # noqa: E402
from dali.synthetic.captioner import MARKER, CaptionerTraining, train_captioner  # noqa: E402
from dali.synthetic.demo import preset  # noqa: E402
from dali.synthetic.world import Event, Scene, audio_caption, holds_trained, trained_key  # noqa: E402

REFERENCES = 5


def write_validation_list(world: Path, path: Path, seed: int) -> Path:
    """An AudioCaps-style CSV of the validation scenes' sound captions (5 distinct each), as test.csv is made."""
    rng = np.random.default_rng(seed)
    rows = []
    for saved in json.loads((world / "scenes.json").read_text())["val"]:
        layout = {int(source): tuple(place) for source, place in saved["layout"].items()}
        events = [Event(**event) for event in saved["events"]]
        scene = Scene(saved["id"], saved["place"], events, saved["silent"], layout, saved["seed"])
        captions = sorted({audio_caption(scene, rng) for _ in range(50)})[:REFERENCES]
        rows += [[scene.id, caption] for caption in captions]
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows([["youtube_id", "caption"], *rows])
    return path


def image_row(world: Path, captioner: Path, seed: int, validation: Path, out: Path) -> dict:
    """Prefix-tune the captioner on the 16 pairs, then caption the validation frames as the demo's image row."""
    common = ["--llava", str(captioner), "--seed", str(seed), "--overwrite"]
    pairs = ["--pairs", str(world / "prefix_pairs.json"), "--out", str(out / "prefix")]
    assert prefix_tune.main([*preset("prefix_tuning"), *common, *pairs]) == 0
    clips = ["--test-list", str(validation), "--audio-dir", str(world / "audio"), "--frames-dir", str(world / "frames")]
    flags = ["--modality", "image", "--prefix-dir", str(out / "prefix"), "--projector", "llava", "--use-prefix"]
    assert infer.main([*preset("inference"), *common, *clips, *flags, "--out", str(out / "infer_image")]) == 0
    return read_manifest(out / "infer_image")["metrics"]["scores"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (the captioner's and the stages')")
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pin_torch()
    args.out.mkdir(parents=True, exist_ok=True)
    validation = write_validation_list(args.world, args.out / "val.csv", args.seed)
    for epochs in args.epochs:
        folder = args.out / f"epochs_{epochs}"
        training = CaptionerTraining(epochs=epochs, seed=args.seed)
        captioner = args.world / CAPTIONER_FOLDER  # the world's own, when it was trained so
        if not holds_trained(captioner, MARKER, trained_key(args.world, training)):
            captioner = train_captioner(args.world, folder / "captioner", training)
        scores = image_row(args.world, captioner, args.seed, validation, folder)
        shown = {name: round(scores[name], 3) for name in ("bleu_4", "meteor", "cider_d", "sbert_sim")}
        print(json.dumps({"seed": args.seed, "epochs": epochs, **shown}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
