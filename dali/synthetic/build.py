"""``dali world``: generate the synthetic world, train (or reuse) its image captioner and pretrain (or reuse) its
audio encoder (flags: ``command_configs.WorldCommandConfig``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dali.command_configs import WorldCommandConfig
from dali.cpu_kernels import pin_torch
from dali.flags import parse_config
from dali.logs import log, setup_logging
from dali.synthetic.captioner import CaptionerTraining, train_captioner
from dali.synthetic.encoder_pretraining import ENCODER_FOLDER, EncoderPretraining, pretrain_encoder
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


REDUCED_PRETRAINING = EncoderPretraining(clips=48, epochs=2, batch_size=16)


def build_encoder(data: Path, reduced: bool = False, seed: int = 0) -> Path:
    """Pretrain (or reuse) the world's audio encoder, self-supervised on its unlabeled clips (after
    :func:`build_world`); returns its file, what ``dali align --init-encoder`` takes."""
    training = dataclasses.replace(REDUCED_PRETRAINING if reduced else EncoderPretraining(), seed=seed)
    return pretrain_encoder(data, data / ENCODER_FOLDER, training)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(WorldCommandConfig, argv)
    setup_logging()
    pin_torch()  # the demo's kernels: the same world and models as `make demo` makes
    folder = build_world(Path(args.out), args.reduced, args.captioner_epochs, args.seed, args.captioner_lr)
    encoder = build_encoder(Path(args.out), args.reduced, args.seed)
    log.info("synthetic world in %s, its image captioner in %s, its pretrained encoder %s", args.out, folder, encoder)
    return 0
