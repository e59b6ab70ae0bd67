"""The learned prefix of stage 1a and the distilled projector of stage 2b: modules, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dali.models.cav_mae import CheckpointError, read_state_dict

PREFIX_KEY = "prefix"
# The original DALI's key for the prefix (stored on its audio tower) and its projector key layout.
ORIGINAL_PREFIX_KEY = "model.audio_tower.prefix"
ORIGINAL_PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight",
    "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight",
    "model.mm_projector.2.bias": "linear_2.bias",
}


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
    state, _ = read_state_dict(path)
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


def save_projector(projector: nn.Module, path: str | Path, source: str = "") -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().float().cpu().contiguous() for key, value in projector.state_dict().items()}
    save_file(state, str(path), metadata={"dali.projector_of": json.dumps(source)})


def load_projector(path: str | Path, template: nn.Module) -> nn.Module:
    """Load a distilled projector into a copy of ``template`` (LLaVA's projector), strictly.

    Accepts our layout (``linear_1.*``, ``linear_2.*``) and the original's (``model.mm_projector.{0,2}.*``).
    """
    import copy

    state, _ = read_state_dict(path)
    if any(key in state for key in ORIGINAL_PROJECTOR_KEYS):
        state = {ORIGINAL_PROJECTOR_KEYS[key]: value for key, value in state.items() if key in ORIGINAL_PROJECTOR_KEYS}
    projector = copy.deepcopy(template).float()
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"'{path}' is not a projector: missing keys {missing}, unexpected keys {unknown}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"'{path}': key '{key}' has shape {list(state[key].shape)}, expected {list(tensor.shape)}"
            )
    projector.load_state_dict({key: value.float() for key, value in state.items()})
    return projector.eval().requires_grad_(False)
