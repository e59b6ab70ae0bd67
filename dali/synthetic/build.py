"""``dali world``: generate the synthetic world and train (or reuse) its image captioner (flags:
``command_configs.WorldCommandConfig``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dali.command_configs import WorldCommandConfig
from dali.flags import parse_config
from dali.logs import log, setup_logging
from dali.synthetic.captioner import CaptionerTraining, train_captioner
from dali.synthetic.world import REDUCED, WorldConfig, generate_far_test_set, generate_world

CAPTIONER_FOLDER = "captioner_model"


def build_world(
    data: Path,
    reduced: bool = False,
    captioner_epochs: int | None = None,
    seed: int = 0,
    captioner_lr: float | None = None,
) -> Path:
    """Generate (or reuse) the world under ``data`` and train (or reuse) its image captioner; returns the latter."""
    config = dataclasses.replace(REDUCED if reduced else WorldConfig(), seed=seed)
    world = generate_world(data, config)
    generate_far_test_set(world, config)  # the test set that plays Clotho for `dali reproduce`
    epochs = captioner_epochs if captioner_epochs is not None else 1 if reduced else CaptionerTraining.epochs
    lr = captioner_lr if captioner_lr is not None else CaptionerTraining.lr
    return train_captioner(world, world / CAPTIONER_FOLDER, CaptionerTraining(epochs=epochs, seed=seed, lr=lr))


def main(argv: list[str] | None = None) -> int:
    args = parse_config(WorldCommandConfig, argv)
    setup_logging()
    folder = build_world(Path(args.out), args.reduced, args.captioner_epochs, args.seed, args.captioner_lr)
    log.info("synthetic world in %s, its image captioner in %s", args.out, folder)
    return 0
