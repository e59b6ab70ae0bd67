"""Stage 2b: fine-tune a copy of LLaVA's projector on the pseudo-captions, from audio tokens only (no prefix).

Only that projector is trained and saved; the encoder and the LLM stay frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dali import distributed
from dali.artifacts import PROJECTOR_FILE, SKIPPED_FILE, load_align_stage, load_pseudo_captions
from dali.config import ConfigError, config_to_dict, field, parse_config
from dali.data import ON_ERROR_CHOICES, Clip, ClipDataset, collate
from dali.models.captioner import Captioner
from dali.models.prefix import save_projector
from dali.runs import Stage, atomic_write, atomic_write_jsonl
from dali.stages.common import (
    CHECKPOINT,
    DTYPES,
    NonFiniteGuard,
    cosine_schedule,
    epoch_order,
    load_checkpoint,
    log,
    print_config,
    progress,
    save_checkpoint,
    seed_everything,
    setup_logging,
    stage_dir,
    upstream_dir,
)


@dataclass
class DistillConfig:
    """Stage 2b (audio-visual distillation). Defaults are the paper's: 1 epoch, batch 40, lr 2e-4."""

    llava: str = field(help="LLaVA-1.5: hub id or local folder")
    run: str = field("default")
    expe_dir: str = field("expe")
    out: str | None = field(None, help="default <expe-dir>/<run>/distill")
    align_dir: str | None = field(None, help="stage 1b folder (default <expe-dir>/<run>/align)")
    pseudo_dir: str | None = field(None, help="stage 2a folder (default <expe-dir>/<run>/pseudo_label)")
    epochs: int = field(1)
    batch_size: int = field(40)
    lr: float = field(2e-4)
    weight_decay: float = field(0.0)
    warmup_ratio: float = field(0.03)
    max_grad_norm: float = field(1.0)
    cache_audio_tokens: bool = field(False, help="encode each clip once and keep its tokens in memory")
    num_workers: int = field(4)
    on_error: str = field("skip", choices=ON_ERROR_CHOICES)
    dtype: str = field("float32", choices=tuple(DTYPES))
    device: str = field("auto")
    seed: int = field(0)
    gradient_checkpointing: bool = field(
        False, help="recompute the frozen LLM's activations in backward (saves memory)"
    )
    checkpoint_every: int = field(200)
    max_non_finite_steps: int = field(10)
    overwrite: bool = field(False)
    resume: bool = field(False)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be >= 1")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(DistillConfig, argv)
    context = distributed.setup(config.device)
    seed_everything(config.seed)
    device = context.device
    out = stage_dir(config.expe_dir, config.run, "distill", config.out)
    align_dir = upstream_dir(config.align_dir, config.expe_dir, config.run, "align")
    pseudo_dir = upstream_dir(config.pseudo_dir, config.expe_dir, config.run, "pseudo_label")
    stage = Stage(out, "distill", overwrite=config.overwrite, resume=config.resume, main=context.is_main)
    distributed.barrier()

    captioner = Captioner.from_pretrained(config.llava, dtype=DTYPES[config.dtype], device=device)
    if config.gradient_checkpointing:
        captioner.enable_gradient_checkpointing()
    encoder = load_align_stage(align_dir, captioner.vision_dim).to(device)
    records = load_pseudo_captions(pseudo_dir)
    if not records:
        raise SystemExit(f"--pseudo-dir: '{pseudo_dir}' holds no pseudo-captions")
    if context.is_main:
        print_config("distill", config)
        stage.save_config(config_to_dict(config))
        stage.add_input("align_dir", align_dir)
        stage.add_input("pseudo_dir", pseudo_dir)
    clips = [Clip(id=record["id"], audio=Path(record["audio"]), captions=[record["caption"]]) for record in records]
    dataset = ClipDataset(
        clips, need_audio=True, need_image=False, target_frames=encoder.config.target_frames, on_error=config.on_error
    )
    bad: list[dict] = []
    token_cache: dict[int, torch.Tensor] = {}
    if config.cache_audio_tokens:
        bad += dataset.preload_audio()
        with torch.no_grad():
            for start in progress(range(0, len(clips), 64), desc="encoding audio", leave=False):
                indices = [i for i in range(start, min(start + 64, len(clips))) if dataset.usable(i)]
                if indices:
                    fbank = torch.stack([dataset.fbank_cache[i].float() for i in indices]).to(device)
                    for i, tokens in zip(indices, encoder.project(fbank).cpu()):
                        token_cache[i] = tokens
        dataset.fbank_cache = None  # the tokens replace the features
    usable = [i for i in range(len(clips)) if not token_cache or i in token_cache]

    projector = captioner.copy_projector().to(device)
    distributed.broadcast_parameters(projector)
    params = list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    my_count = len(distributed.shard(usable, context))
    steps_per_epoch = max(math.ceil(my_count / config.batch_size), 1)
    total_steps = steps_per_epoch * config.epochs
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    step = 0
    state = load_checkpoint(out / CHECKPOINT) if config.resume else None
    if state is not None:
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, bad = state["step"], state["bad"]
        log.info("resuming distillation at step %d of %d", step, total_steps)
    metrics = stage.metrics()
    metrics.rewind(lambda record: record.get("step", 0) <= step)
    guard = NonFiniteGuard(config.max_non_finite_steps, metrics)

    def checkpoint() -> None:
        if context.is_main:
            save_checkpoint(
                out / CHECKPOINT,
                {
                    "projector": projector.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "bad": bad,
                },
            )

    bar = progress(total=total_steps, initial=step, desc="distillation", disable=not context.is_main)
    last_loss = float("nan")
    while step < total_steps:
        epoch, batch_index = divmod(step, steps_per_epoch)
        order = distributed.shard([usable[i] for i in epoch_order(len(usable), config.seed, epoch)], context)
        remaining = order[batch_index * config.batch_size : steps_per_epoch * config.batch_size]
        batches = [remaining[i : i + config.batch_size] for i in range(0, len(remaining), config.batch_size)]
        if token_cache:
            loader = ({"index": torch.tensor(b), "bad": []} for b in batches)
        else:
            loader = iter(
                torch.utils.data.DataLoader(
                    dataset, batch_sampler=batches, num_workers=config.num_workers, collate_fn=collate
                )
            )
        for batch in loader:
            bad.extend(item.as_record() for item in batch["bad"])
            indices = batch["index"].tolist()
            if indices:
                with torch.no_grad():
                    if token_cache:
                        audio = torch.stack([token_cache[i] for i in indices]).to(device)
                    else:
                        audio = encoder.project(batch["fbank"].to(device))
                block = captioner.modality_block(audio_tokens=audio, audio_projector=projector)
                loss = distributed.global_token_mean(
                    *captioner.caption_loss(block, [clips[i].captions[0] for i in indices], reduction="sum"), context
                )
                optimizer.zero_grad(set_to_none=True)
                if guard.check(loss, step):
                    loss.backward()
                    distributed.average_gradients(params)
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    last_loss = distributed.mean_across_ranks(float(loss.detach()), device)
            scheduler.step()
            step += 1
            metrics.log(step=step, epoch=epoch + 1, loss=last_loss, lr=scheduler.get_last_lr()[0])
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
            if step % config.checkpoint_every == 0:
                checkpoint()
    bar.close()

    if context.is_main:
        atomic_write(out / PROJECTOR_FILE, lambda tmp: save_projector(projector, tmp, source=config.llava))
        atomic_write_jsonl(out / SKIPPED_FILE, bad)
        stage.finish(
            {
                "final_loss": last_loss,
                "steps": total_steps,
                "clips": len(usable),
                "skipped": len(bad),
                "non_finite_steps": guard.count,
                "llava": config.llava,
            },
            outputs=[PROJECTOR_FILE, SKIPPED_FILE],
        )
        (out / CHECKPOINT).unlink(missing_ok=True)
        log.info("distilled projector written to %s", out / PROJECTOR_FILE)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
