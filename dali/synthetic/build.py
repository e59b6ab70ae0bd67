"""``dali world``: generate the synthetic world and train (or reuse) its image captioner.

After it, the stage scripts run on the world with the ``configs/synthetic`` presets, e.g.
``./prefix_tuning.sh --config configs/synthetic/prefix_tuning.yaml --run mine``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dali.config import command_parser
from dali.stages.common import log, setup_logging
from dali.synthetic.captioner import CaptionerTraining, train_captioner
from dali.synthetic.world import REDUCED, WorldConfig, generate_world

CAPTIONER_FOLDER = "captioner_model"


def build_world(data: Path, reduced: bool = False, captioner_epochs: int | None = None, seed: int = 0) -> Path:
    """Generate (or reuse) the world under ``data`` and train (or reuse) its image captioner; returns the latter."""
    world = generate_world(data, dataclasses.replace(REDUCED if reduced else WorldConfig(), seed=seed))
    epochs = captioner_epochs if captioner_epochs is not None else 1 if reduced else CaptionerTraining.epochs
    return train_captioner(world, world / CAPTIONER_FOLDER, CaptionerTraining(epochs=epochs, seed=seed))


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(__doc__, raw=True)
    parser.add_argument("--out", default="data/synthetic", help="the world's folder")
    parser.add_argument("--reduced", action="store_true", help="a small world and a briefly trained captioner")
    parser.add_argument("--captioner-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of its captioner's training")
    args = parser.parse_args(argv)
    setup_logging()
    folder = build_world(Path(args.out), args.reduced, args.captioner_epochs, args.seed)
    log.info("synthetic world in %s, its image captioner in %s", args.out, folder)
    return 0


if __name__ == "__main__":
    from dali.cli import run

    raise SystemExit(run("world", main))
