"""The distilled projector of stage 2b (a trained copy of LLaVA's projector): save and load, ours or the original's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dali.models.checkpoints import CheckpointError, read_state_dict

# The original DALI's projector keys (its checkpoints) and ours (transformers' LlavaMultiModalProjector).
ORIGINAL_PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight",
    "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight",
    "model.mm_projector.2.bias": "linear_2.bias",
}


def save_projector(projector: nn.Module, path: str | Path, source: str = "") -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().float().cpu().contiguous() for key, value in projector.state_dict().items()}
    save_file(state, str(path), metadata={"dali.projector_of": json.dumps(source)})


def load_projector(path: str | Path, template: nn.Module) -> nn.Module:
    """Load a distilled projector into a copy of ``template`` (LLaVA's projector), strictly.

    Accepts our layout (``linear_1.*``, ``linear_2.*``) and the original's (``model.mm_projector.{0,2}.*``).
    """
    return projector_from_state(read_state_dict(path)[0], str(path), template)


def projector_from_state(state: dict[str, torch.Tensor], path: str, template: nn.Module) -> nn.Module:
    """:func:`load_projector` on tensors already read (``path`` names their file in messages)."""
    import copy

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
