"""Reading weight files: safetensors or torch pickles (never executing code), and the error that names the file."""

from __future__ import annotations

from pathlib import Path

import torch

from dali.errors import DaliError


class CheckpointError(DaliError, ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names the file and the keys."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` file or a torch pickle (``.pth``/``.bin``/``.pt``).

    Pickles are read with ``weights_only=True``: no code from a checkpoint ever runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"checkpoint '{path}' is not a flat state dict of tensors")
    return state, {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file, from its header alone; ``{}`` for any other file, and for one
    that cannot be read (:func:`read_state_dict` then names what is wrong with it)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # a corrupt header: reported by read_state_dict, with the file's name
        return {}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {key[len(prefix) :] if key.startswith(prefix) else key: value for key, value in state.items()}


def strict_from_pretrained(model_class, source: str | Path, what: str, **kwargs):
    """``model_class.from_pretrained(source)`` that refuses a folder whose weights do not fit its config (a wrong or
    partial download), listing the missing, unexpected and mis-shaped keys: transformers would only warn, and train
    or caption from random weights."""
    model, info = model_class.from_pretrained(str(source), output_loading_info=True, **kwargs)
    problems = {kind: sorted(map(str, info.get(kind) or [])) for kind in ("missing_keys", "unexpected_keys")}
    problems["mis-shaped keys"] = sorted(map(str, info.get("mismatched_keys") or []))
    listed = "; ".join(
        f"{kind.replace('_', ' ')} {keys[:10]}{' ...' if len(keys) > 10 else ''}"
        for kind, keys in problems.items()
        if keys
    )
    if listed:
        raise CheckpointError(f"'{source}' does not hold the weights its config describes for {what}: {listed}")
    return model
