"""Pretrain the world's audio encoder as CAV-MAE was pretrained before DALI aligned it: self-supervised.

Two objectives, CAV-MAE's: masked reconstruction of the spectrogram (three patches in four hidden, the hidden ones
predicted by a small decoder from the visible ones) and audio-visual contrast (a clip's pooled audio tokens are
told apart from the other clips' by the pooled tokens of one of its own frames, seen by a small visual branch
trained beside the encoder). No caption and no label is read. The clips are the world's ``pretrain/`` split
(AudioSet's role), drawn from their own random stream: no test clip is among them and the world's other files are
unchanged. The encoder of the epoch with the lowest loss on a held-out tenth of these clips is kept, as a
:func:`dali.models.cav_mae.save_audio_encoder` file without ``proj`` (``dali align --init-encoder`` adds one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dali.audio import TARGET_FRAMES
from dali.data import clip_features, load_frame, read_cavmae_json
from dali.files import atomic_write, atomic_write_json
from dali.jsonl import atomic_write_jsonl
from dali.logs import log
from dali.models.cav_mae import Block, CAVMAEAudioEncoder, CAVMAEConfig, save_audio_encoder, sincos_pos_embed_2d
from dali.progress import progress
from dali.synthetic.world import (
    NUM_FRAMES,
    holds_trained,
    resume_trained,
    sample_scene,
    trained_checkpoint,
    trained_key,
    write_clip,
)
from dali.training import cosine_schedule, save_training
from dali.workers import worker_pool

FOLDER = "pretrain"  # the world's unlabeled clips, beside its other splits
ENCODER_FOLDER = "encoder_pretrained"
ENCODER_FILE = "audio_encoder.safetensors"
MARKER = "pretraining.json"
SEED_OFFSET = 104_729  # the clips' own random stream: the world's other files are never drawn differently


@dataclass(frozen=True)
class EncoderPretraining:
    """The clips, the models' shapes and the training. The encoder's shape is the alignment preset's
    (configs/synthetic/alignment.yaml): 128 wide, 2 + 1 blocks, 16 x 128 patches, 64 tokens."""

    # 1000 clips, 12 epochs: 95 s here. 2000 clips and 30 epochs gave a lower held-out alignment loss (2088 against
    # 2128) in 282 s; a contrast weight of 0.1 a higher one (2148) (docs/results.md).
    clips: int = 1000
    encoder_dim: int = 128
    encoder_depth: int = 2
    encoder_heads: int = 4
    patch_time: int = 128
    decoder_dim: int = 64
    time_bins: int = 16  # each 16 x 128 patch is reconstructed as 16 x 16 averages (patchify)
    vision_depth: int = 2
    vision_patch: int = 8
    mask_ratio: float = 0.75  # CAV-MAE's
    contrast_weight: float = 0.01  # CAV-MAE's lambda_c
    temperature: float = 0.05  # CAV-MAE's tau
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.05
    val_fraction: float = 0.1
    seed: int = 0

    def encoder_config(self) -> CAVMAEConfig:
        shape = dict(embed_dim=self.encoder_dim, depth_audio=self.encoder_depth, num_heads=self.encoder_heads)
        return CAVMAEConfig(**shape, patch_time=self.patch_time, target_frames=TARGET_FRAMES, proj_dim=None)


# -- the clips ------------------------------------------------------------------------------------------------
def generate_pretraining_clips(world: Path, training: EncoderPretraining) -> Path:
    """``world/pretrain/``: ``training.clips`` unlabeled clips (a wav and 10 frames each) and their CAV-MAE list,
    ``pretrain.json`` (idempotent: kept when its marker names the same clips). ``training.seed`` is the world's."""
    folder = Path(world) / FOLDER
    world_digest = json.loads((Path(world) / "world.json").read_text())["digest"]  # its seed and render version
    digest = hashlib.sha256(f"{world_digest}:{training.clips}:{SEED_OFFSET}".encode()).hexdigest()[:16]
    marker = folder / "split.json"
    if marker.exists() and json.loads(marker.read_text()).get("digest") == digest:
        return folder / "pretrain.json"
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    for frame in range(NUM_FRAMES):
        (folder / "frames" / f"frame_{frame}").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(training.seed + SEED_OFFSET)
    scenes = [sample_scene(rng, f"pre{i:05d}") for i in range(training.clips)]
    jobs = [(scene, str(folder)) for scene in scenes]
    with worker_pool(2, "spawn") as pool:  # not fork: the caller may hold torch threads or locks
        list(progress(pool.map(write_clip, jobs, chunksize=16), total=len(jobs), desc="pretrain clips"))
    rows = [{"video_id": s.id, "wav": f"audio/{s.id}.wav", "video_path": "frames", "labels": ""} for s in scenes]
    atomic_write_json(folder / "pretrain.json", {"data": rows})
    atomic_write_json(marker, {"digest": digest, "clips": training.clips})
    return folder / "pretrain.json"


def _load_clip(clip) -> tuple[torch.Tensor, np.ndarray]:
    """One clip's fbank (float16) and its 10 frames as uint8 [10, H, W, 3]."""
    frames = np.stack([np.asarray(load_frame(clip, index)) for index in range(NUM_FRAMES)])
    return clip_features(clip, TARGET_FRAMES).half(), frames


def load_clips(listing: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of the list in memory: fbanks [N, frames, 128] float16 and frames [N, 10, H, W, 3] uint8.

    In this process: two spawned workers took 19 s for the preset's 1000 clips (starting them, and 380 KB of each
    clip pickled back through a pipe), this loop 6 s, with the same bytes."""
    loaded = [_load_clip(clip) for clip in progress(list(read_cavmae_json(listing)), desc="pretrain features")]
    return torch.stack([f for f, _ in loaded]), torch.from_numpy(np.stack([frames for _, frames in loaded]))


# -- the models -----------------------------------------------------------------------------------------------
class VisualBranch(nn.Module):
    """A small ViT on a frame: [B, 3, H, W] (0-255) -> pooled [B, D]. Only the contrast trains it."""

    def __init__(self, training: EncoderPretraining, image_size: int):
        super().__init__()
        dim, grid = training.encoder_dim, image_size // training.vision_patch
        self.patch = nn.Conv2d(3, dim, training.vision_patch, training.vision_patch)
        self.register_buffer("pos", sincos_pos_embed_2d(dim, grid, grid))
        self.blocks = nn.ModuleList(Block(dim, training.encoder_heads, 4.0) for _ in range(training.vision_depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch((pixels.float() - 127.5) / 64.0).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)


class MaskedDecoder(nn.Module):
    """MAE's light decoder: visible tokens + mask tokens at the hidden places -> the hidden patches."""

    def __init__(self, config: CAVMAEConfig, dim: int, heads: int, time_bins: int):
        super().__init__()
        rows, cols = config.grid
        self.embed = nn.Linear(config.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_pos_embed_2d(dim, rows, cols))
        self.block = Block(dim, heads, 4.0)
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, config.patch_shape[0] * time_bins)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[B, n, D] visible tokens at ``keep`` [B, n] -> the patches at ``hidden`` [B, N - n]: [B, N - n, P]."""
        batch, count = visible.shape[0], keep.shape[1] + hidden.shape[1]
        x = self.mask_token.expand(batch, count, -1).clone()
        x.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), self.embed(visible))
        x = self.norm(self.block(x + self.pos))
        return self.predict(x.gather(1, hidden[..., None].expand(-1, -1, x.shape[-1])))


def patchify(fbank: torch.Tensor, config: CAVMAEConfig, time_bins: int | None = None) -> torch.Tensor:
    """[B, frames, mel] -> [B, N, mel_patch * time_bins], in the encoder's token order (freq_row * cols + col).

    ``time_bins`` (a divisor of the patch's frames) averages each patch's frames into that many bins: the world's
    patches are 16 x 128, eight times CAV-MAE's 16 x 16 values, and a decoder that predicts 16 x 16 per patch costs
    an eighth of one that predicts every frame. None keeps every frame."""
    (pm, pt), (rows, cols) = config.patch_shape, config.grid
    bins = time_bins or pt
    x = fbank.transpose(1, 2).reshape(fbank.shape[0], rows, pm, cols, bins, pt // bins).mean(dim=-1)
    return x.permute(0, 1, 3, 2, 4).reshape(fbank.shape[0], rows * cols, pm * bins)


def pretraining_loss(
    encoder: CAVMAEAudioEncoder,
    decoder: MaskedDecoder,
    visual: VisualBranch,
    fbank: torch.Tensor,
    pixels: torch.Tensor,
    training: EncoderPretraining,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float, float]:
    """Reconstruction + contrast_weight x contrast on a batch of fbanks [B, frames, mel] and frames [B, 3, H, W].

    The hidden patches (a random ``mask_ratio`` of each clip's, drawn from ``generator``) are predicted from the
    visible ones (mean squared error); the contrast is the symmetric InfoNCE between the visible tokens' mean and
    the frame's pooled tokens, L2-normalised, at ``temperature``. Returns (loss, reconstruction, contrast).
    """
    tokens = encoder.embed(fbank)  # [B, N, D]
    batch, count, _ = tokens.shape
    kept = max(1, round(count * (1 - training.mask_ratio)))
    order = torch.rand(batch, count, generator=generator).argsort(dim=1)
    keep, hidden = order[:, :kept], order[:, kept:]
    visible = encoder.encode(tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1])))
    target = patchify(fbank, encoder.config, training.time_bins)
    hidden_target = target.gather(1, hidden[..., None].expand(-1, -1, target.shape[-1]))
    reconstruction = F.mse_loss(decoder(visible, keep, hidden), hidden_target)
    audio = F.normalize(visible.mean(dim=1), dim=-1)
    image = F.normalize(visual(pixels), dim=-1)
    logits = audio @ image.T / training.temperature
    labels = torch.arange(batch)
    contrast = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return reconstruction + training.contrast_weight * contrast, reconstruction.item(), contrast.item()


# -- the training ---------------------------------------------------------------------------------------------
def pretrain_encoder(world: Path, out: Path, training: EncoderPretraining) -> Path:
    """Pretrain (or reuse, when ``out`` holds one made from the same world with the same settings) the encoder;
    returns its file."""
    world, out = Path(world), Path(out)
    key = trained_key(world, training)
    if holds_trained(out, MARKER, key):
        log.info("reusing the pretrained audio encoder in %s", out)
        return out / ENCODER_FILE
    started = time.time()
    fbanks, frames = load_clips(generate_pretraining_clips(world, training))
    torch.manual_seed(training.seed)
    encoder = CAVMAEAudioEncoder(training.encoder_config()).train()
    decoder = MaskedDecoder(encoder.config, training.decoder_dim, training.encoder_heads, training.time_bins)
    visual = VisualBranch(training, frames.shape[2])
    modules = nn.ModuleList([encoder, decoder, visual])
    order = torch.randperm(len(fbanks), generator=torch.Generator().manual_seed(training.seed)).tolist()
    held = max(1, int(len(order) * training.val_fraction))
    val, train = order[:held], order[held:]
    steps_per_epoch = math.ceil(len(train) / training.batch_size)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    scheduler = cosine_schedule(optimizer, training.epochs * steps_per_epoch, training.warmup_ratio)
    out.mkdir(parents=True, exist_ok=True)
    trained = {"modules": modules, "optimizer": optimizer, "scheduler": scheduler}
    checkpoint = trained_checkpoint(out, key)
    rng, metrics, best, done = random.Random(training.seed), [], math.inf, 0
    position = resume_trained(checkpoint, trained)
    if position is not None:
        metrics, best, train, done = position["metrics"], position["best"], position["train"], position["epoch"]
        rng.setstate(position["order"])
    bar = progress(
        total=training.epochs * steps_per_epoch, initial=done * steps_per_epoch, desc="pretraining the audio encoder"
    )
    for epoch in range(done + 1, training.epochs + 1):
        rng.shuffle(train)
        generator = torch.Generator().manual_seed(training.seed * 1000 + epoch)
        for start in range(0, len(train), training.batch_size):
            batch = train[start : start + training.batch_size]
            loss, _, _ = pretraining_loss(
                encoder, decoder, visual, *_batch(fbanks, frames, batch, rng), training, generator
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.update(1)
        record = {"epoch": epoch, "train_loss": loss.item(), **held_out_loss(modules, fbanks, frames, val, training)}
        metrics.append(record)
        bar.set_postfix(val=f"{record['val_loss']:.4f}")
        if record["val_loss"] < best:  # keep the encoder of the epoch with the lowest held-out loss
            best = record["val_loss"]
            atomic_write(out / ENCODER_FILE, lambda tmp: save_audio_encoder(encoder, tmp))
        position = {"epoch": epoch, "metrics": metrics, "best": best, "train": train, "order": rng.getstate()}
        save_training(checkpoint, trained, **position)  # a killed run resumes after this epoch
    bar.close()
    atomic_write_jsonl(out / "metrics.jsonl", metrics)
    best_epoch = min(metrics, key=lambda r: r["val_loss"])["epoch"]
    wall = round(time.time() - started, 1)
    summary = {"key": key, "best_epoch": best_epoch, "best_val_loss": best, "wall_time_s": wall}
    atomic_write_json(out / MARKER, summary | {"training": dataclasses.asdict(training)})  # written last
    checkpoint.unlink()
    log.info("pretrained audio encoder in %s (epoch %d of %d kept)", out, best_epoch, training.epochs)
    return out / ENCODER_FILE


def _batch(fbanks: torch.Tensor, frames: torch.Tensor, indices: list[int], rng: random.Random | None):
    """The batch's fbanks (float32) and one frame per clip ([B, 3, H, W]): a random one in training, the middle one
    (frame 5) when ``rng`` is None."""
    picks = [rng.randrange(NUM_FRAMES) if rng else NUM_FRAMES // 2 for _ in indices]
    pixels = frames[indices, picks].permute(0, 3, 1, 2)
    return fbanks[indices].float(), pixels


def held_out_loss(modules: nn.ModuleList, fbanks, frames, indices: list[int], training) -> dict[str, float]:
    """The losses on the held-out clips, with the same masks every epoch (a fixed generator)."""
    encoder, decoder, visual = modules
    modules.eval()
    generator = torch.Generator().manual_seed(training.seed + 1)
    totals = np.zeros(3)
    with torch.no_grad():
        for start in range(0, len(indices), training.batch_size):
            batch = indices[start : start + training.batch_size]
            loss, reconstruction, contrast = pretraining_loss(
                encoder, decoder, visual, *_batch(fbanks, frames, batch, None), training, generator
            )
            totals += np.array([float(loss), reconstruction, contrast]) * len(batch)
    modules.train()
    loss, reconstruction, contrast = (float(total) for total in totals / len(indices))
    return {"val_loss": loss, "val_reconstruction": reconstruction, "val_contrast": contrast}
