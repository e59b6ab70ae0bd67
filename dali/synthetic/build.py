"""``dali world``: generate the synthetic world and train (or reuse) its image captioner.

After it, the stage scripts run on the world with the ``configs/synthetic`` presets, e.g.
``./prefix_tuning.sh --config configs/synthetic/prefix_tuning.yaml --run mine``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dali.stages.common import log, setup_logging
from dali.synthetic.captioner import CaptionerTraining, train_captioner
from dali.synthetic.world import REDUCED, WorldConfig, generate_world

CAPTIONER_FOLDER = "captioner_model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic", help="output folder of the world")
    parser.add_argument("--reduced", action="store_true", help="a small world and a briefly trained captioner")
    parser.add_argument("--captioner-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    world = generate_world(Path(args.data), REDUCED if args.reduced else WorldConfig())
    training = CaptionerTraining(epochs=1) if args.reduced else CaptionerTraining()
    if args.captioner_epochs is not None:
        training = CaptionerTraining(epochs=args.captioner_epochs)
    folder = train_captioner(world, world / CAPTIONER_FOLDER, training)
    log.info("synthetic world in %s, its image captioner in %s", world, folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
