"""Stage 1b: align the audio encoder's token distribution with CLIP's patch tokens of the paired frame.

Trains the CAV-MAE audio branch + ``proj`` (and, for ``ot_att``, the attentive scorers) against the frozen
vision tower of the captioner, with MMD, exact/entropic OT, or OT with attentive token weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dali import distributed
from dali.artifacts import ENCODER_FILE, SKIPPED_FILE, TOKEN_WEIGHTS_FILE
from dali.captioning import DTYPES
from dali.command_configs import AlignConfig
from dali.data import Clip, ClipDataset, collate
from dali.files import atomic_write
from dali.flags import ConfigError, config_to_dict
from dali.jsonl import atomic_write_jsonl
from dali.logs import log
from dali.losses import AttentiveTokenWeights, mmd_loss, ot_loss
from dali.models.audio_encoders import new_encoder, pretrained_encoder, save_encoder
from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig, load_audio_encoder
from dali.models.vision_tower import VisionTower
from dali.progress import progress
from dali.runs import Stage, stage_main
from dali.shard_reading import read_clip_source
from dali.stage_table import ALIGN
from dali.stages.common import open_stage, print_config, start_stage
from dali.training import Training, epoch_share


def build_encoder(config: AlignConfig, vision_dim: int) -> nn.Module:
    """The encoder to align, in training mode (its blocks recomputed in backward with --gradient-checkpointing)."""
    encoder = _new_or_initial_encoder(config, vision_dim).train()
    if config.gradient_checkpointing:
        try:
            encoder.enable_gradient_checkpointing()
        except ValueError as error:
            raise ConfigError(f"--gradient-checkpointing: {error}") from None
    return encoder


def _new_or_initial_encoder(config: AlignConfig, vision_dim: int) -> nn.Module:
    """``--audio-encoder``'s family, from ``--init-encoder`` or new at the --encoder-* shape."""
    if config.audio_encoder != "cav-mae":
        if config.init_encoder:
            encoder = pretrained_encoder(
                config.audio_encoder, config.init_encoder, vision_dim, config.target_frames, config.audio_tokens
            )
        else:
            shape = (config.encoder_dim, config.encoder_depth, config.encoder_heads)
            encoder = new_encoder(config.audio_encoder, vision_dim, *shape, config.target_frames, config.audio_tokens)
        return encoder
    if config.init_encoder:
        encoder = load_audio_encoder(config.init_encoder, new_proj_dim=vision_dim)
        if encoder.output_dim != vision_dim:
            raise ConfigError(
                f"--init-encoder: its proj gives {encoder.output_dim}-d tokens, CLIP's are {vision_dim}-d"
            )
        if encoder.config.target_frames != config.target_frames:
            raise ConfigError(
                f"--target-frames {config.target_frames} differs from the checkpoint's {encoder.config.target_frames}"
            )
        return encoder
    shape = CAVMAEConfig(
        embed_dim=config.encoder_dim,
        depth_audio=config.encoder_depth,
        num_heads=config.encoder_heads,
        patch_time=config.encoder_patch_time,
        target_frames=config.target_frames,
        proj_dim=vision_dim,
    )
    return CAVMAEAudioEncoder(shape)


def alignment_loss(config: AlignConfig, audio: torch.Tensor, image: torch.Tensor, weights=None) -> torch.Tensor:
    """The configured criterion between [B, N, D] audio and [B, M, D] image tokens (uniform weights if None).

    Non-finite audio tokens (a diverged encoder) give a NaN loss, which the non-finite guard skips and counts.
    """
    if not torch.isfinite(audio.detach()).all():
        return audio.new_tensor(float("nan"))
    if config.method == "mmd":
        return mmd_loss(audio, image)
    kwargs = dict(
        solver=config.ot_solver, reg=config.sinkhorn_reg, max_iters=config.sinkhorn_iters, workers=config.emd_workers
    )
    if weights is None:
        return ot_loss(audio, image, **kwargs)
    return ot_loss(audio, image, weights.audio, weights.image, **kwargs)


class VisionTokenSource:
    """CLIP tokens of a batch: from the in-memory cache, or the frozen tower on the batch's pixels."""

    def __init__(
        self, tower: VisionTower, clips: list[Clip], config: AlignConfig, device: torch.device, bad: list[dict]
    ):
        self.tower, self.device = tower, device
        self.cache: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        if config.cache_vision_tokens:
            self._fill(clips, config, bad)

    def _fill(self, clips: list[Clip], config: AlignConfig, bad: list[dict]) -> None:
        dataset = ClipDataset(
            clips,
            need_audio=False,
            need_image=True,
            image_transform=self.tower.preprocess_images,
            frame_index=config.frame_index,
            on_error=config.on_error,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=64, num_workers=min(config.num_workers, 4), collate_fn=collate
        )
        self.cache = torch.zeros(len(clips), self.tower.num_tokens, self.tower.hidden_size, dtype=torch.float16)
        self.valid = torch.zeros(len(clips), dtype=torch.bool)
        for batch in progress(loader, desc="caching vision tokens", leave=False):
            bad.extend(item.as_record() for item in batch["bad"])
            if len(batch["index"]):
                self.cache[batch["index"]] = self.tower.image_tokens(batch["pixels"]).half().cpu()
                self.valid[batch["index"]] = True

    def usable(self, index: int) -> bool:
        return self.valid is None or bool(self.valid[index])

    def tokens(self, batch: dict) -> torch.Tensor:
        """The batch's cached tokens (gathered by the loader workers), or the tower on its pixels."""
        if "image_tokens" in batch:
            # float16 crosses to the device and is widened there: a CPU -> GPU copy that changes dtype
            # converts on the CPU, single-threaded under torchrun.
            return batch["image_tokens"].to(self.device, non_blocking=True).float()
        return self.tower.image_tokens(batch["pixels"]).float()


class OrderedSampler(torch.utils.data.Sampler):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def validation_loss(
    config: AlignConfig, encoder, vision: VisionTokenSource, loader, device, autocast
) -> tuple[float, int]:
    """Summed criterion with uniform weights over a validation loader, and the number of clips it covers."""
    encoder.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            if not len(batch["index"]):
                continue
            with autocast():
                audio = encoder.project(batch["features"].to(device)).float()
            image = vision.tokens(batch)
            loss = alignment_loss(config, audio, image)
            if math.isfinite(float(loss)):
                total += float(loss) * len(batch["index"])
                count += len(batch["index"])
    encoder.train()
    return total, count


@dataclass
class Alignment:
    """One alignment run: its settings, models, optimisers, data and position. The phases below update it."""

    config: AlignConfig
    context: distributed.Context
    out: Path
    tower: VisionTower
    encoder: nn.Module  # CAV-MAE's or another family's (models.audio_encoders)
    scorers: AttentiveTokenWeights | None
    bad: list[dict] = dc_field(default_factory=list)  # unusable clips, listed in skipped.jsonl
    epoch: int = 1
    step_in_epoch: int = 0
    best_val: float = math.inf

    @property
    def device(self) -> torch.device:
        return self.context.device


@stage_main
def main(argv: list[str] | None = None) -> int:
    config, context = start_stage(AlignConfig, argv)
    stage = open_stage(config, context, ALIGN)
    out = stage.path
    alignment = Alignment(config, context, out, *load_models(config, context.device))
    train_clips = read_clip_source(config.train_list, config.data_root, config.frame_index)  # a list, or shards
    val_clips = read_clip_source(config.val_list, config.data_root, config.frame_index) if config.val_list else []
    if context.is_main:  # inputs and models loaded: only now may an --overwrite replace the old run
        record_inputs(stage, config)
    distributed.broadcast_parameters(alignment.encoder, *([alignment.scorers] if alignment.scorers is not None else []))
    data = prepare_data(alignment, train_clips, distributed.shard(val_clips, context))  # each rank validates its share
    optimisers = build_optimisers(alignment)
    training = Training(stage, context, config, _trained(alignment, optimisers), config.epochs * data.steps_per_epoch)
    resume(alignment, training)
    loop = TrainingLoop(training, _autocast(config, alignment.device))
    # Batches have one shape (full batches only), so the compiled forward is built once; the weights stay
    # the encoder's own, so checkpoints and saved files do not change.
    loop.project = alignment.encoder.project
    if config.compile and alignment.device.type == "cuda":
        loop.project = torch.compile(alignment.encoder.project, dynamic=False)
    while alignment.epoch <= config.epochs:
        train_epoch(alignment, data, optimisers, loop)
        val_loss = validate(alignment, data, loop)
        if context.is_main and (val_loss is None or val_loss < alignment.best_val):  # keep the best epoch's encoder
            alignment.best_val = val_loss if val_loss is not None else alignment.best_val
            atomic_write(out / ENCODER_FILE, lambda tmp: save_encoder(alignment.encoder, tmp))
        optimisers.scheduler.step()
        alignment.epoch, alignment.step_in_epoch = alignment.epoch + 1, 0
        checkpoint(alignment, training, force=True)
        distributed.barrier()
    alignment.bad = distributed.gather_records(alignment.bad)  # every process's unusable clips, in skipped.jsonl
    if context.is_main:
        save_outputs(alignment, stage, training.guard.count)
    distributed.teardown()
    return 0


def load_models(config: AlignConfig, device: torch.device):
    """The frozen CLIP tower, the encoder to train and, for OT-Att, the token scorers (created in this order)."""
    tower = VisionTower.from_pretrained(config.llava, dtype=DTYPES[config.vision_dtype], device=device)
    encoder = build_encoder(config, tower.hidden_size).to(device)
    scorers = None
    if config.method == "ot_att":
        scorers = AttentiveTokenWeights(tower.hidden_size, config.scorer_heads, config.scorer_temperature).to(device)
    return tower, encoder, scorers


def record_inputs(stage: Stage, config: AlignConfig) -> None:
    print_config("align", config)
    stage.save_config(config_to_dict(config))
    stage.add_input("llava", config.llava)
    for name in ("train_list", "val_list", "init_encoder"):
        if getattr(config, name):
            stage.add_input(name, getattr(config, name))


@dataclass
class AlignmentData:
    train_set: ClipDataset
    usable: list[int]  # training clips with audio and a frame
    train_vision: VisionTokenSource
    val_clips: list[Clip]
    val_vision: VisionTokenSource | None
    steps_per_epoch: int


def clip_dataset(alignment: Alignment, clips: list[Clip], augment: bool, vision: VisionTokenSource) -> ClipDataset:
    config = alignment.config
    clip_set = ClipDataset(
        clips,
        need_audio=True,
        need_image=not config.cache_vision_tokens,
        image_transform=alignment.tower.preprocess_images,
        frame_index=config.frame_index,
        target_frames=config.target_frames,
        augment=augment,
        on_error=config.on_error,
        seed=config.seed,
        front_end=alignment.encoder.front_end,
    )
    clip_set.image_tokens = vision.cache  # None without --cache-vision-tokens: pixels go to the tower
    return clip_set


def prepare_data(alignment: Alignment, train_clips: list[Clip], val_clips: list[Clip]) -> AlignmentData:
    """CLIP tokens (cached) and audio features (preloaded) of the clips; unusable ones go to ``alignment.bad``."""
    config = alignment.config
    train_vision = VisionTokenSource(alignment.tower, train_clips, config, alignment.device, alignment.bad)
    val_vision = (
        VisionTokenSource(alignment.tower, val_clips, config, alignment.device, alignment.bad) if val_clips else None
    )
    train_set = clip_dataset(alignment, train_clips, config.noise, train_vision)
    if config.cache_audio_features:
        alignment.bad.extend(train_set.preload_audio())
    usable = [i for i in range(len(train_clips)) if train_vision.usable(i) and train_set.usable(i)]
    my_count = len(distributed.shard(usable, alignment.context))
    steps_per_epoch = my_count // config.batch_size if my_count >= config.batch_size else 1
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    return AlignmentData(train_set, usable, train_vision, val_clips, val_vision, steps_per_epoch)


@dataclass
class Optimisers:
    encoder: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scorers: torch.optim.Optimizer | None
    encoder_params: list[torch.nn.Parameter]


def build_optimisers(alignment: Alignment) -> Optimisers:
    """Adam with step decay for the encoder; the scorers have their own Adam and no decay, as in the original."""
    config = alignment.config
    params = [p for p in alignment.encoder.parameters() if p.requires_grad]
    betas = (config.beta1, config.beta2)
    fused = alignment.device.type == "cuda"  # one kernel for all parameters instead of several per tensor
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, betas=betas, fused=fused)
    milestones = list(range(config.lr_decay_start, 10_000, config.lr_decay_every))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.lr_decay)
    scorer_optimizer = None
    if alignment.scorers is not None:
        scorer_optimizer = torch.optim.Adam(
            alignment.scorers.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=betas, fused=fused
        )
    return Optimisers(optimizer, scheduler, scorer_optimizer, params)


POSITION = ("epoch", "step_in_epoch", "best_val", "bad")  # and the step (of all epochs): Training.step


def _trained(alignment: Alignment, optimisers: Optimisers) -> dict:
    return {
        "encoder": alignment.encoder,
        "optimizer": optimisers.encoder,
        "scheduler": optimisers.scheduler,
        "scorers": alignment.scorers,
        "scorer_optimizer": optimisers.scorers,
    }


def checkpoint(alignment: Alignment, training: Training, force: bool = False) -> None:
    training.checkpoint(force, **{name: getattr(alignment, name) for name in POSITION})


def _step_of(position: dict) -> int:
    return position.get("step", position.get("global_step", 0))  # global_step: checkpoints before 2026-12


def resume(alignment: Alignment, training: Training) -> None:
    """The checkpoint's states and position (with --resume); the metrics keep the records before it."""
    position = training.resume(
        lambda r, position: r["step"] <= _step_of(position) if "step" in r else r["epoch"] < position.get("epoch", 1)
    )
    training.step = _step_of(position)
    for name in POSITION:
        setattr(alignment, name, position.get(name, getattr(alignment, name)))
    if position:
        log.info("resuming alignment at epoch %d step %d", alignment.epoch, alignment.step_in_epoch)


@dataclass
class TrainingLoop:
    training: Training
    autocast: Callable
    project: Callable | None = None  # the encoder's forward, compiled on a GPU


def train_epoch(alignment: Alignment, data: AlignmentData, optimisers: Optimisers, loop: TrainingLoop) -> None:
    config = alignment.config
    data.train_set.epoch = alignment.epoch
    mine = epoch_share(data.usable, config.seed, alignment.epoch, alignment.context)[
        : data.steps_per_epoch * config.batch_size
    ]
    loader = torch.utils.data.DataLoader(
        data.train_set,
        batch_size=config.batch_size,
        sampler=OrderedSampler(mine[alignment.step_in_epoch * config.batch_size :]),
        num_workers=config.num_workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=alignment.device.type == "cuda",
    )
    bar = progress(
        total=data.steps_per_epoch,
        initial=alignment.step_in_epoch,
        desc=f"align epoch {alignment.epoch}/{config.epochs}",
        disable=not alignment.context.is_main,
    )
    for batch in loader:
        alignment.bad.extend(item.as_record() for item in batch["bad"])
        if len(batch["index"]) == 0:
            continue
        record = train_step(alignment, data, optimisers, loop, batch)
        loop.training.metrics.log(**record)
        alignment.step_in_epoch += 1
        loop.training.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if loop.training.step % config.checkpoint_every == 0:
            checkpoint(alignment, loop.training, force=True)
    bar.close()


def train_step(alignment: Alignment, data: AlignmentData, optimisers: Optimisers, loop: TrainingLoop, batch) -> dict:
    """One guarded step of the encoder (and of the scorers after their frozen epochs); returns its record."""
    config, scorers = alignment.config, alignment.scorers
    entropy_weight = config.entropy_weight(alignment.epoch)
    scorers_train = scorers is not None and alignment.epoch > config.scorer_freeze_epochs
    image = data.train_vision.tokens(batch)  # [B, M, D]
    with loop.autocast():
        audio = loop.project(batch["features"].to(alignment.device, non_blocking=True)).float()  # [B, N, D]
        weights = scorers(audio, image) if scorers is not None else None
    loss = alignment_loss(config, audio, image, weights)
    optimisers.encoder.zero_grad(set_to_none=True)
    if optimisers.scorers is not None:
        optimisers.scorers.zero_grad(set_to_none=True)
    if loop.training.guard.check(loss, loop.training.step):
        # The encoder follows the criterion alone; the scorers follow criterion - lambda * entropy.
        # (The original let both backward passes add up in the encoder's gradients.)
        # Both backward passes run before any weight changes. The scorers' pass goes first and
        # keeps the graph: it never reaches the encoder, whose compiled backward may run only once
        # (without retain_graph).
        if scorers_train:
            scorer_objective = loss - entropy_weight * weights.entropy.mean()
            scorer_objective.backward(inputs=list(scorers.parameters()), retain_graph=True)
        loss.backward(inputs=optimisers.encoder_params)
        distributed.average_gradients(optimisers.encoder_params)
        optimisers.encoder.step()
        if scorers_train:
            distributed.average_gradients(scorers.parameters())
            optimisers.scorers.step()
    record = {
        "step": loop.training.step + 1,
        "epoch": alignment.epoch,
        "loss": distributed.mean_across_ranks(float(loss.detach()), alignment.device),
        "lr": optimisers.encoder.param_groups[0]["lr"],
    }
    if weights is not None:
        record["entropy"] = float(weights.entropy.mean().detach())
        record["entropy_weight"] = entropy_weight
    return record


def validate(alignment: Alignment, data: AlignmentData, loop: TrainingLoop) -> float | None:
    """The epoch's validation loss over every rank's share (None without a validation list or a scored clip)."""
    if data.val_vision is None:
        return None
    config = alignment.config
    val_loader = torch.utils.data.DataLoader(
        clip_dataset(alignment, data.val_clips, augment=False, vision=data.val_vision),
        # a clip whose frame could not be cached has no tokens to compare with: it is listed, not scored
        sampler=OrderedSampler([i for i in range(len(data.val_clips)) if data.val_vision.usable(i)]),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        collate_fn=collate,
    )
    total, count = validation_loss(
        config, alignment.encoder, data.val_vision, val_loader, alignment.device, loop.autocast
    )
    total, count = distributed.sum_across_ranks(
        torch.tensor([total, count], dtype=torch.float64, device=alignment.device)
    )
    if count == 0:  # no score to pick an epoch by: keep the latest encoder, as without --val-list
        log.warning("epoch %d: no validation clip could be scored (listed in %s)", alignment.epoch, SKIPPED_FILE)
        return None
    val_loss = float(total / count)
    loop.training.metrics.log(epoch=alignment.epoch, val_loss=val_loss)
    log.info("epoch %d: validation %s %.4f", alignment.epoch, config.method, val_loss)
    return val_loss


def save_outputs(alignment: Alignment, stage: Stage, non_finite_steps: int) -> None:
    """The encoder (the initial one with --epochs 0), the scorers, the skipped list, then the manifest."""
    config, out = alignment.config, alignment.out
    if not (out / ENCODER_FILE).exists():  # --epochs 0: the initial (unaligned) encoder
        atomic_write(out / ENCODER_FILE, lambda tmp: save_encoder(alignment.encoder, tmp))
    outputs = [ENCODER_FILE, SKIPPED_FILE]
    skipped = _unique(alignment.bad)
    atomic_write_jsonl(out / SKIPPED_FILE, skipped)
    if alignment.scorers is not None:
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in alignment.scorers.state_dict().items()}
        atomic_write(out / TOKEN_WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
        outputs.append(TOKEN_WEIGHTS_FILE)
    metrics = {
        "best_val_loss": None if math.isinf(alignment.best_val) else alignment.best_val,
        "epochs": config.epochs,
        "method": config.method,
        "ot_solver": config.ot_solver,
        "skipped_clips": len(skipped),
        "non_finite_steps": non_finite_steps,
        "audio_encoder": alignment.encoder.describe(),  # its family and config: what the later stages rebuild
    }
    stage.finish(metrics, outputs=outputs)
    log.info("aligned encoder written to %s", out / ENCODER_FILE)


def _unique(records: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for record in records:
        if record["id"] not in seen:
            seen.add(record["id"])
            unique.append(record)
    return unique


def _autocast(config: AlignConfig, device: torch.device):
    import contextlib

    if device.type != "cuda" or config.autocast == "none":
        return contextlib.nullcontext
    dtype = DTYPES[config.autocast]
    return lambda: torch.autocast("cuda", dtype=dtype)
