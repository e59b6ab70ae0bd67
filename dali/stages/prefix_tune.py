"""Stage 1a: learn the prefix that makes the frozen LLaVA describe the sound of a scene from its frame.

Only the [L, hidden] prefix is trained, on (frame, audio caption) pairs; its block is [image tokens, prefix].
"""

from __future__ import annotations

import math

import torch

from dali import distributed
from dali.artifacts import PREFIX_FILE
from dali.captioning import DTYPES
from dali.command_configs import PrefixTuneConfig
from dali.data import ClipError, load_frame, read_prefix_pairs
from dali.files import atomic_write
from dali.flags import ConfigError, config_to_dict
from dali.logs import log
from dali.models.captioner import Captioner
from dali.models.prefix import Prefix, save_prefix
from dali.runs import Stage, stage_main
from dali.stage_table import PREFIX
from dali.stages.common import open_stage, print_config, start_stage
from dali.training import Training, cosine_schedule


@stage_main
def main(argv: list[str] | None = None) -> int:
    config, context = start_stage(PrefixTuneConfig, argv)
    stage = open_stage(config, context, PREFIX)
    out = stage.path
    captioner, image_tokens, captions = load_inputs(config, context, stage)
    prefix = Prefix(config.num_prefix_tokens, captioner.hidden_size, config.init_std).to(context.device)
    distributed.broadcast_parameters(prefix)
    result = train_prefix(config, context, stage, captioner, prefix, image_tokens, captions)
    if context.is_main:
        atomic_write(out / PREFIX_FILE, lambda tmp: save_prefix(prefix, tmp))
        stage.finish(result, outputs=[PREFIX_FILE])
        log.info("prefix written to %s", out / PREFIX_FILE)
    distributed.teardown()
    return 0


def load_inputs(config: PrefixTuneConfig, context, stage: Stage) -> tuple[Captioner, torch.Tensor, list[str]]:
    """The frozen captioner, the pairs' CLIP tokens (computed once: the tower is frozen) and their captions."""
    captioner = Captioner.from_pretrained(config.llava, dtype=DTYPES[config.dtype], device=context.device)
    if config.gradient_checkpointing:
        captioner.enable_gradient_checkpointing()
    pairs = read_prefix_pairs(config.pairs, config.data_root)
    try:
        images = [load_frame(clip) for clip in pairs]
    except ClipError as error:  # 16 hand-picked pairs: a broken one is a mistake to fix, not to skip
        raise ConfigError(f"--pairs: {error}") from None
    if context.is_main:  # inputs and models loaded: only now may an --overwrite replace the old run
        print_config("prefix_tune", config)
        stage.save_config(config_to_dict(config))
        stage.add_input("llava", config.llava)
        stage.add_setting("conv_mode", captioner.conv_mode)  # the prompt the prefix learns to complete
        stage.add_input("pairs", config.pairs)
    with torch.no_grad():
        image_tokens = torch.cat(
            [captioner.image_tokens(captioner.preprocess_images(images[i : i + 32])) for i in range(0, len(images), 32)]
        )
    return captioner, image_tokens, [clip.captions[0] for clip in pairs]


def train_prefix(config, context, stage: Stage, captioner, prefix: Prefix, image_tokens, captions) -> dict:
    """AdamW with a cosine schedule on the prefix alone; resumable; returns the run's final metrics."""
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(distributed.shard(captions, context)) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    trained = {"prefix": prefix, "optimizer": optimizer, "scheduler": scheduler}
    training = Training(stage, context, config, trained, total_steps)
    training.resume()
    params = list(prefix.parameters())
    for epoch, batches in training.epochs(range(len(captions)), steps_per_epoch, "prefix tuning"):
        for batch in batches:
            block = captioner.modality_block(image_tokens=image_tokens[batch], prefix=prefix())
            total, count = captioner.caption_loss(block, [captions[i] for i in batch], reduction="sum")
            loss = distributed.global_token_mean(total, count, context)
            stepped = training.optimise(loss, optimizer, params)
            scheduler.step()
            training.log(training.advance(stepped, epoch, scheduler.get_last_lr()[0]))
            training.checkpoint()
    return {"final_loss": training.last_loss, "steps": total_steps, "non_finite_steps": training.guard.count}
