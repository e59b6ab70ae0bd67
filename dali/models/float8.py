"""``--dtype float8``: LLaVA's language model with its linear layers in float8 (e4m3, dynamic per-row scales), for
captioning on GPUs with FP8 tensor cores (Ada, Hopper or newer). Ours, not the paper's (docs/deviations.md).

What stays in bfloat16, and why:
- the token embeddings and the norms: a lookup and elementwise work, no matrix product to speed up;
- the LM head: the logits choose each token, so its error would fall straight on the caption; it is one matrix
  (7B: 32,000 x 4,096) against the decoder's 224, and runs at the last position only in the prefill;
- the projector (LLaVA's or the distilled one), the prefix and the audio encoder: the parts the method trains,
  whose outputs are the modality block, and a fraction of a percent of a caption's compute;
- the vision tower (audio + image, pseudo-labelling): its tokens are the image half of the block.

torchao (the PyTorch-maintained quantization library) makes the layers: ``Float8DynamicActivationFloat8WeightConfig``
with ``PerRow`` granularity quantizes each weight row once and each activation row at every call, and its tensors
run through ``torch._scaled_mm`` under ``torch.compile`` and in captured CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from dali.errors import DaliError

FLOAT8 = "float8"
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer


class Float8Unavailable(DaliError, RuntimeError):
    """``--dtype float8`` cannot run here (no FP8 tensor cores, or no torchao)."""


def check_float8(device: torch.device) -> None:
    """Refuse float8 where it cannot run as float8: never a silent bfloat16."""
    if device.type != "cuda":
        raise Float8Unavailable(
            f"--dtype float8 runs on a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
            f"this run's device is {device.type}: use --dtype bfloat16 or float32 there"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise Float8Unavailable(
            f"--dtype float8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); {name} is "
            f"{capability[0]}.{capability[1]}: use --dtype bfloat16"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise Float8Unavailable(
            "--dtype float8 needs torchao (the fp8 extra): pip install torchao, the release built for your torch"
        ) from None


def float8_layers(language_model: nn.Module) -> list[str]:
    """The names of the language model's linear layers that float8 takes: the attention and MLP projections of
    its decoder layers (the LM head lives outside it, on the ``...ForConditionalGeneration``)."""
    return [name for name, module in language_model.named_modules() if isinstance(module, nn.Linear)]


def quantize_float8(language_model: nn.Module) -> int:
    """Make the LLM's linear layers float8 (e4m3 weights with a scale per output row, activations quantized per
    row at each call), in place; returns how many. The model must already be bfloat16 on its GPU."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = set(float8_layers(language_model))
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(language_model, config, filter_fn=lambda module, name: name in names)
    return len(names)
