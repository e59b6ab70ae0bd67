"""The learned prefix of stage 1a: the module, save and load (ours or the original's key)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dali.models.checkpoints import CheckpointError, read_state_dict

PREFIX_KEY = "prefix"
# The original DALI's key for the prefix (stored on its audio tower).
ORIGINAL_PREFIX_KEY = "model.audio_tower.prefix"


class Prefix(nn.Module):
    """``num_tokens`` trainable embeddings [L, hidden], initialised from N(0, init_std^2) as the original."""

    def __init__(self, num_tokens: int = 16, hidden_size: int = 4096, init_std: float = 1e-4):
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_tokens, hidden_size) * init_std)

    def forward(self) -> torch.Tensor:
        return self.embeddings


def save_prefix(prefix: Prefix, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({PREFIX_KEY: prefix.embeddings.detach().float().cpu().contiguous()}, str(path))


def load_prefix(path: str | Path, hidden_size: int | None = None) -> Prefix:
    """Read a prefix written by stage 1a or an original ``prefix.bin``/``prefixMLP.bin``; checks the width."""
    return prefix_from_state(read_state_dict(path)[0], str(path), hidden_size)


def prefix_from_state(state: dict[str, torch.Tensor], path: str, hidden_size: int | None = None) -> Prefix:
    """:func:`load_prefix` on tensors already read (``path`` names their file in messages)."""
    tensor = state.get(PREFIX_KEY, state.get(ORIGINAL_PREFIX_KEY))
    if tensor is None:
        raise CheckpointError(f"'{path}' holds no prefix (expected key '{PREFIX_KEY}' or '{ORIGINAL_PREFIX_KEY}')")
    if tensor.dim() != 2:
        raise CheckpointError(f"'{path}': the prefix must be [tokens, hidden], got {list(tensor.shape)}")
    if hidden_size is not None and tensor.shape[1] != hidden_size:
        raise CheckpointError(
            f"'{path}': prefix width {tensor.shape[1]} does not match the captioner's hidden size {hidden_size}"
        )
    prefix = Prefix(tensor.shape[0], tensor.shape[1])
    prefix.embeddings.data.copy_(tensor.float())
    return prefix.eval()
