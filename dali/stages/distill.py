"""Stage 2b: fine-tune a copy of LLaVA's projector on the pseudo-captions, from audio tokens only (no prefix).

Only that projector is trained and saved; the encoder and the LLM stay frozen.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from dali import distributed
from dali.artifacts import PROJECTOR_FILE, SKIPPED_FILE, load_align_stage, load_pseudo_captions
from dali.caption_quality import caption_flags
from dali.captioning import DTYPES
from dali.command_configs import DistillConfig
from dali.data import Clip, ClipDataset, collate
from dali.files import atomic_write
from dali.flags import ConfigError, config_to_dict
from dali.jsonl import atomic_write_jsonl
from dali.logs import log
from dali.models.captioner import Captioner
from dali.models.projector import save_projector
from dali.progress import progress
from dali.run import Run
from dali.runs import stage_main
from dali.stage_table import ALIGN, DISTILL, PSEUDO_LABEL
from dali.stages.common import open_stage, print_config, start_stage
from dali.training import Training, cosine_schedule


def held_out_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) positions: a seeded ``fraction`` of ``range(count)`` is held out, at least one clip."""
    if fraction <= 0:
        return list(range(count)), []
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    size = min(max(round(count * fraction), 1), count - 1)
    return sorted(order[size:]), sorted(order[:size])


class AudioTokens:
    """The clips' aligned audio tokens, batch by batch: from an in-memory cache, or encoded as they load."""

    def __init__(self, encoder, dataset: ClipDataset, config: DistillConfig, device: torch.device):
        self.encoder, self.dataset, self.config, self.device = encoder, dataset, config, device
        self.cache: dict[int, torch.Tensor] = {}
        self.bad: list[dict] = []
        if config.cache_audio_tokens:
            self._fill_cache()

    @torch.no_grad()
    def _fill_cache(self) -> None:
        dataset = self.dataset
        self.bad += dataset.preload_audio()
        for start in progress(range(0, len(dataset.clips), 64), desc="encoding audio", leave=False):
            indices = [i for i in range(start, min(start + 64, len(dataset.clips))) if dataset.usable(i)]
            if indices:
                features = torch.stack([dataset.feature_cache[i].float() for i in indices]).to(self.device)
                for i, tokens in zip(indices, self.encoder.project(features).cpu()):
                    self.cache[i] = tokens
        dataset.feature_cache = None  # the tokens replace the features

    def usable(self, index: int) -> bool:
        return not self.config.cache_audio_tokens or index in self.cache

    def batches(self, batches: list[list[int]]):
        """Yield (indices, audio tokens [B, N, D], bad clips) for each list of clip indices."""
        if self.config.cache_audio_tokens:
            for indices in batches:
                yield indices, torch.stack([self.cache[i] for i in indices]).to(self.device), []
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.config.num_workers, collate_fn=collate
        )
        for batch in loader:
            indices = batch["index"].tolist()
            with torch.no_grad():
                audio = self.encoder.project(batch["features"].to(self.device)) if indices else None
            yield indices, audio, [item.as_record() for item in batch["bad"]]


@torch.no_grad()
def held_out_loss(captioner, projector, tokens: AudioTokens, clips, indices, batch_size, context) -> float:
    """Token-mean caption loss of the distilled projector over the held-out clips of every rank."""
    mine = distributed.shard(indices, context)
    total = torch.zeros((), dtype=torch.float64, device=context.device)
    count = torch.zeros((), dtype=torch.float64, device=context.device)
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for chosen, audio, _ in tokens.batches(batches):
        if chosen:
            block = captioner.modality_block(audio_tokens=audio, audio_projector=projector)
            loss, tokens_counted = captioner.caption_loss(
                block, [clips[i].captions[0] for i in chosen], reduction="sum"
            )
            total, count = total + loss.double(), count + tokens_counted.double()
    return float(distributed.sum_across_ranks(total) / distributed.sum_across_ranks(count).clamp_min(1))


@dataclass
class Selection:
    """The best held-out loss so far, its step and projector weights, and evaluations since it improved."""

    loss: float = math.inf
    step: int = 0
    state: dict | None = None
    stale: int = 0

    def update(self, loss: float, step: int, projector) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if loss < self.loss:
            self.loss, self.step, self.stale = loss, step, 0
            self.state = {key: value.detach().clone().cpu() for key, value in projector.state_dict().items()}
            return True
        self.stale += 1
        return False


@stage_main
def main(argv: list[str] | None = None) -> int:
    config, context = start_stage(DistillConfig, argv)
    device = context.device
    run = Run.of(config)
    align_dir, pseudo_dir = run.stage(ALIGN), run.stage(PSEUDO_LABEL)
    stage = open_stage(config, context, DISTILL)
    out = stage.path
    config = dataclasses.replace(config, llava=run.llava(config.llava, (ALIGN, PSEUDO_LABEL), config.allow_modified))

    captioner = Captioner.from_pretrained(config.llava, dtype=DTYPES[config.dtype], device=device)
    if config.gradient_checkpointing:
        captioner.enable_gradient_checkpointing()
    encoder = load_align_stage(align_dir, captioner.vision_dim, allow_modified=config.allow_modified).to(device)
    records = load_pseudo_captions(pseudo_dir, allow_modified=config.allow_modified)
    records, dropped = filtered(records) if config.filter else (records, None)
    if not records:
        raise ConfigError(f"--pseudo-dir: '{pseudo_dir}' holds no pseudo-captions" + (" unflagged" if dropped else ""))
    if context.is_main:
        print_config("distill", config)
        stage.save_config(config_to_dict(config))
        stage.add_input("llava", config.llava)
        stage.add_setting("conv_mode", captioner.conv_mode)  # the prompt the projector learns to caption under
        stage.add_input("align_dir", align_dir)
        stage.add_input("pseudo_dir", pseudo_dir)
    clips = [clip_of(record) for record in records]
    dataset = ClipDataset(
        clips,
        need_audio=True,
        need_image=False,
        target_frames=encoder.target_frames,
        on_error=config.on_error,
        front_end=encoder.front_end,
    )
    tokens = AudioTokens(encoder, dataset, config, device)
    train, held_out = held_out_split(len(clips), config.val_fraction, config.seed)
    train = [i for i in train if tokens.usable(i)]
    held_out = [i for i in held_out if tokens.usable(i)]
    projector = captioner.copy_projector().to(device)
    distributed.broadcast_parameters(projector)
    result = train_projector(config, captioner, projector, tokens, clips, train, held_out, stage, context)

    if context.is_main:
        atomic_write(out / PROJECTOR_FILE, lambda tmp: save_projector(projector, tmp, source=config.llava))
        atomic_write_jsonl(out / SKIPPED_FILE, result.pop("bad"))
        result |= {"clips": len(train), "held_out": len(held_out)} | ({"filtered": dropped} if config.filter else {})
        stage.finish(result, outputs=[PROJECTOR_FILE, SKIPPED_FILE])
        log.info("distilled projector written to %s", out / PROJECTOR_FILE)
    distributed.teardown()
    return 0


def filtered(records: list[dict]) -> tuple[list[dict], dict]:
    """(the records no quality flag was raised on, what was left out: how many, and how many per flag). The flags are
    those pseudo-labelling recorded; a folder from before it did has them computed here (without label names)."""
    kept, dropped = [], Counter()
    for record in records:
        flags = record["flags"] if isinstance(record.get("flags"), list) else caption_flags(record["caption"])
        if flags:
            dropped.update(flags)
        else:
            kept.append(record)
    left_out = {"captions": len(records) - len(kept), "by_flag": dict(dropped)}
    log.info("--filter: %d of %d pseudo-captions left out %s", left_out["captions"], len(records), dict(dropped))
    return kept, left_out


def clip_of(record: dict) -> Clip:
    """A pseudo-caption's clip: its audio file, or its shard and key (a set in shards)."""
    if "shard" in record:
        return Clip(id=record["id"], shard=record["shard"], key=record["key"], captions=[record["caption"]])
    return Clip(id=record["id"], audio=Path(record["audio"]), captions=[record["caption"]])


def train_projector(config, captioner, projector, tokens, clips, train, held_out, stage, context) -> dict:
    """Fine-tune ``projector`` on the train clips' pseudo-captions; with held-out clips, keep the best step.

    Returns the run's final metrics, and ``bad``: the clips that could not be read (each listed once).
    """
    params = list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(math.ceil(len(distributed.shard(train, context)) / config.batch_size), 1)
    total_steps = steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    scheduler = cosine_schedule(optimizer, total_steps, config.warmup_ratio)
    training = Training(
        stage, context, config, {"projector": projector, "optimizer": optimizer, "scheduler": scheduler}, total_steps
    )
    position = training.resume()
    bad = position.get("bad", {record["id"]: record for record in tokens.bad})
    selection = Selection(**position.get("selection", {}))
    for epoch, batches in training.epochs(train, steps_per_epoch, "distillation"):
        for indices, audio, new_bad in tokens.batches(batches):
            bad.update((record["id"], record) for record in new_bad)
            stepped = None
            if indices:
                block = captioner.modality_block(audio_tokens=audio, audio_projector=projector)
                loss = distributed.global_token_mean(
                    *captioner.caption_loss(block, [clips[i].captions[0] for i in indices], reduction="sum"), context
                )
                stepped = training.optimise(loss, optimizer, params)
            scheduler.step()
            record = training.advance(stepped, epoch, scheduler.get_last_lr()[0])
            if held_out and (training.step % eval_every == 0 or training.step == total_steps):
                record["val_loss"] = held_out_loss(
                    captioner, projector, tokens, clips, held_out, config.batch_size, context
                )
                record["best"] = selection.update(record["val_loss"], training.step, projector)
                training.stopped = bool(config.patience) and selection.stale >= config.patience
            training.log(record)
            training.checkpoint(bad=bad, selection=vars(selection))
            if training.stopped:
                log.info(
                    "held-out loss has not improved for %d evaluations: stopping at step %d",
                    selection.stale,
                    training.step,
                )
                break
    result = {
        "final_loss": training.last_loss,
        "steps": training.step,
        "planned_steps": total_steps,
        "non_finite_steps": training.guard.count,
    }
    if held_out:
        projector.load_state_dict(selection.state)
        result |= {"best_step": selection.step, "best_val_loss": selection.loss, "stopped_early": training.stopped}
        log.info("kept the projector of step %d (held-out loss %.4f)", selection.step, selection.loss)
    gathered = {record["id"]: record for record in distributed.gather_records(list(bad.values()))}
    return result | {"bad": list(gathered.values())}
