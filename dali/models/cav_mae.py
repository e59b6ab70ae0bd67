"""CAV-MAE's audio branch in plain torch, with parameter names that load the original checkpoints.

Only the path DALI uses is built: patch embedding, the 11 audio-specific blocks, the first shared block
run with the audio norms, and ``norm_a``; plus DALI's ``proj`` into the image-token space. The visual
branch and the MAE decoder are never built (the original built and discarded them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dali.audio import NUM_MEL_BINS
from dali.constants import TARGET_FRAMES
from dali.models.checkpoints import CheckpointError, read_state_dict, strip_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CAVMAEConfig:
    """Shape of the audio encoder; the defaults are CAV-MAE-Scale++ (ViT-B) as DALI uses it."""

    embed_dim: int = 768
    depth_audio: int = 11  # modality-specific blocks (blocks_a)
    depth_shared: int = 1  # shared blocks (blocks_u); DALI runs only the first, with the audio norms
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    patch_time: int | None = None  # time extent of a patch when not square (None = patch_size, as CAV-MAE)
    num_mel_bins: int = NUM_MEL_BINS
    target_frames: int = TARGET_FRAMES
    proj_dim: int | None = 1024  # DALI's Linear(768 -> CLIP hidden size); None for a bare CAV-MAE

    @property
    def patch_shape(self) -> tuple[int, int]:
        """(mel bins, frames) covered by one patch."""
        return self.patch_size, self.patch_time or self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the patch grid."""
        return self.num_mel_bins // self.patch_shape[0], self.target_frames // self.patch_shape[1]

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols


def sincos_pos_embed_2d(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding for a (rows=freq, cols=time) grid, token order row*cols + col.

    The first half of the channels encodes the time index, the second half the frequency index; each half
    is [sin(pos * w_d), cos(pos * w_d)] with w_d = 10000^(-d / (embed_dim / 4)).

    Returns:
        Tensor [1, rows * cols, embed_dim] float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos positions, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = np.outer(positions, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    freq_index, time_index = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    table = np.concatenate([encode(time_index.reshape(-1)), encode(freq_index.reshape(-1))], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    def __init__(self, patch_shape: tuple[int, int], embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_shape, stride=patch_shape)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        # [B, 1, mel, time] -> [B, D, rows, cols] -> [B, rows * cols, D]
        return self.proj(spectrogram).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention (timm 0.4.5 layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with CAV-MAE's three norm pairs (shared, audio, visual).

    The visual norms are never used on the audio path; they exist so checkpoints load key for key.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        for suffix in ("", "_a", "_v"):
            setattr(self, f"norm1{suffix}", nn.LayerNorm(dim))
            setattr(self, f"norm2{suffix}", nn.LayerNorm(dim))
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        suffix = "" if modality is None else f"_{modality}"
        x = x + self.attn(getattr(self, f"norm1{suffix}")(x))
        return x + self.mlp(getattr(self, f"norm2{suffix}")(x))


class CAVMAEAudioEncoder(nn.Module):
    """CAV-MAE audio branch + DALI's ``proj``.

    ``forward(fbank [B, frames, mel]) -> [B, N, embed_dim]`` (N = 512 for the default config);
    ``project(fbank) -> [B, N, proj_dim]`` gives the tokens that stand in for CLIP patch tokens.
    """

    front_end = None  # the fbank of dali.audio (computed by the loader, or on the GPU from its waves)
    gradient_checkpointing = False

    def __init__(self, config: CAVMAEConfig = CAVMAEConfig()):
        super().__init__()
        self.config = config
        rows, cols = config.grid
        self.patch_embed_a = PatchEmbed(config.patch_shape, config.embed_dim)
        # A buffer-like parameter: fixed sin-cos at init, but DALI trains it, so checkpoints carry it.
        self.pos_embed_a = nn.Parameter(sincos_pos_embed_2d(config.embed_dim, rows, cols))
        self.modality_a = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        nn.init.normal_(self.modality_a, std=0.02)
        self.blocks_a = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth_audio)
        )
        self.blocks_u = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth_shared)
        )
        self.norm_a = nn.LayerNorm(config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.proj_dim) if config.proj_dim else None

    @property
    def output_dim(self) -> int:
        return self.config.proj_dim or self.config.embed_dim

    @property
    def target_frames(self) -> int:
        return self.config.target_frames

    def describe(self) -> dict:
        return {"family": "cav-mae", "config": dataclasses.asdict(self.config)}

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        expected = (self.config.target_frames, self.config.num_mel_bins)
        if fbank.dim() != 3 or tuple(fbank.shape[1:]) != expected:
            raise ValueError(f"expected fbank [B, {expected[0]}, {expected[1]}], got {list(fbank.shape)}")
        return self.encode(self.embed(fbank))

    def embed(self, fbank: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their positions, before any block: [B, frames, mel] -> [B, N, D]."""
        x = fbank.to(self.patch_embed_a.proj.weight.dtype).unsqueeze(1).transpose(2, 3)  # [B, 1, mel, time]
        x = self.patch_embed_a(x)  # [B, N, D], token index = freq_row * cols + time_col
        return x + self.pos_embed_a + self.modality_a

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks on any subset of :meth:`embed`'s tokens (a masked pretraining passes the visible ones):
        [B, n, D] -> [B, n, D]."""
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in [*self.blocks_a, functools.partial(self.blocks_u[0], modality="a")]:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.norm_a(x)

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each block's input in training and recompute the block in backward (memory for compute)."""
        self.gradient_checkpointing = True

    def project(self, fbank: torch.Tensor) -> torch.Tensor:
        """Audio tokens in the image-token space: [B, frames, mel] -> [B, N, proj_dim]."""
        if self.proj is None:
            raise RuntimeError("this encoder has no proj layer (a bare CAV-MAE checkpoint); build it with proj_dim")
        return self.proj(self(fbank))


# Keys of an original CAV-MAE / DALI checkpoint that the audio path does not use.
_SKIPPED_PREFIXES = (
    "patch_embed_v.",
    "pos_embed_v",
    "modality_v",
    "blocks_v.",
    "norm_v.",
    "norm.",
    "decoder_",
    "mask_token",
    "vision_tower.",
    "audio_scorer.",
    "image_scorer.",
    "a_q.",
    "a_k.",
    "a_v.",
    "i_q.",
    "i_k.",
    "i_v.",
    "mmd.",
    "cls_token",
)
CONFIG_METADATA_KEY = "dali.cav_mae_config"


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> CAVMAEConfig:
    """Encoder shape read off an original checkpoint's tensors (heads: head size 64, as ViT-B)."""
    try:
        patch = state["patch_embed_a.proj.weight"]  # [D, 1, p, p]
        num_tokens = state["pos_embed_a"].shape[1]
    except KeyError as error:
        raise CheckpointError(f"not a CAV-MAE audio checkpoint: key {error} is missing") from None
    embed_dim, patch_size, patch_time = patch.shape[0], patch.shape[-2], patch.shape[-1]
    rows = NUM_MEL_BINS // patch_size
    depth_audio = len({key.split(".")[1] for key in state if key.startswith("blocks_a.")})
    depth_shared = len({key.split(".")[1] for key in state if key.startswith("blocks_u.")})
    hidden = state["blocks_a.0.mlp.fc1.weight"].shape[0] if depth_audio else int(embed_dim * 4)
    proj = state.get("proj.weight")
    return CAVMAEConfig(
        embed_dim=embed_dim,
        depth_audio=depth_audio,
        depth_shared=max(depth_shared, 1),
        num_heads=num_heads or max(embed_dim // 64, 1),
        mlp_ratio=hidden / embed_dim,
        patch_size=patch_size,
        patch_time=None if patch_time == patch_size else patch_time,
        target_frames=num_tokens // rows * patch_time,
        proj_dim=None if proj is None else proj.shape[0],
    )


def _metadata_config(path: str | Path, text: str, from_tensors: CAVMAEConfig) -> CAVMAEConfig:
    """The config saved with the weights; it must describe the tensors beside it (a forged one could ask for a
    model of any size before a single shape is checked)."""
    try:
        config = CAVMAEConfig(**json.loads(text))
    except (TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"'{path}': its encoder config metadata is not valid: {error}") from None

    def shape(c: CAVMAEConfig) -> tuple:
        return c.embed_dim, c.depth_audio, c.depth_shared, c.mlp_ratio, c.patch_shape, c.grid, c.proj_dim

    if shape(config) != shape(from_tensors) or config.embed_dim % max(config.num_heads, 1):
        raise CheckpointError(f"'{path}': its config metadata {config} does not match its tensors {from_tensors}")
    return config


def save_audio_encoder(encoder: CAVMAEAudioEncoder, path: str | Path) -> None:
    """Write the encoder as safetensors with its config in the metadata (what our stages save)."""
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous().cpu() for key, value in encoder.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(encoder.config))}
    save_file(state, str(path), metadata=metadata)


def load_audio_encoder(
    path: str | Path, num_heads: int | None = None, new_proj_dim: int | None = None
) -> CAVMAEAudioEncoder:
    """Load an audio encoder from any of the three layouts, strictly, in eval mode.

    (a) an original CAV-MAE checkpoint (``module.``-prefixed DataParallel state dict, no ``proj``);
    (b) an ``audio_backbone.pth`` of the original DALI (adds ``proj``, the attentive scorers and a CLIP copy);
    (c) a ``.safetensors`` file written by :func:`save_audio_encoder`.
    Every key of the audio path must be present with the right shape; visual-branch, decoder, CLIP and
    scorer keys are skipped (listed at debug level); any other key is an error. ``new_proj_dim`` gives a
    file without ``proj`` (layout a) a freshly initialised one, as stage 1b starts from CAV-MAE.
    """
    state, metadata = read_state_dict(path)
    return audio_encoder_from_state(state, metadata, str(path), num_heads, new_proj_dim)


def audio_encoder_from_state(
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    path: str,
    num_heads: int | None = None,
    new_proj_dim: int | None = None,
) -> CAVMAEAudioEncoder:
    """:func:`load_audio_encoder` on tensors already read (``path`` names their file in messages)."""
    state = strip_prefix(state)
    config = infer_config(state, num_heads)
    if CONFIG_METADATA_KEY in metadata:
        config = _metadata_config(path, metadata[CONFIG_METADATA_KEY], config)
    fresh_proj = config.proj_dim is None and new_proj_dim is not None
    if fresh_proj:
        config = dataclasses.replace(config, proj_dim=new_proj_dim)
    encoder = CAVMAEAudioEncoder(config)
    expected = encoder.state_dict()
    skipped = sorted(key for key in state if key not in expected and key.startswith(_SKIPPED_PREFIXES))
    unknown = sorted(key for key in state if key not in expected and not key.startswith(_SKIPPED_PREFIXES))
    missing = sorted(key for key in expected if key not in state and not (fresh_proj and key.startswith("proj.")))
    if missing or unknown:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the CAV-MAE audio encoder: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    loadable = {key: tensor for key, tensor in expected.items() if key in state}
    for key, tensor in loadable.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint '{path}': key '{key}' has shape {list(state[key].shape)}, expected {list(tensor.shape)}"
            )
    if skipped:
        log.debug("skipped %d keys outside the audio path of '%s': %s", len(skipped), path, skipped)
    encoder.load_state_dict({key: state[key].float() for key in loadable}, strict=not fresh_proj)
    return encoder.eval()
