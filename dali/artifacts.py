"""One loader per producing stage. Each checks the upstream manifest and compatibility with the captioner."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dali.jsonl import read_jsonl
from dali.models.audio_encoders import AudioEncoder, load_encoder
from dali.models.checkpoints import CheckpointError
from dali.models.prefix import Prefix, load_prefix
from dali.models.projector import load_projector
from dali.runs import require_finished

PREFIX_FILE = "prefix.safetensors"
ENCODER_FILE = "audio_encoder.safetensors"
TOKEN_WEIGHTS_FILE = "token_weights.safetensors"
PSEUDO_CAPTIONS_FILE = "pseudo_captions.jsonl"
QUALITY_JSON, QUALITY_MD = "quality.json", "quality.md"  # the pseudo-captions' quality report (dali.caption_quality)
SKIPPED_FILE = "skipped.jsonl"
PROJECTOR_FILE = "projector.safetensors"
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_JSON = "scores.json"
SCORES_MD = "scores.md"


def load_prefix_stage(
    folder: str | Path, hidden_size: int, flag_name: str = "--prefix-dir", allow_modified: bool = False
) -> Prefix:
    folder = require_finished(folder, "prefix-tuning (1a)", flag_name, (PREFIX_FILE,), allow_modified)
    return load_prefix(folder / PREFIX_FILE, hidden_size=hidden_size)


def load_align_stage(
    folder: str | Path, vision_dim: int, flag_name: str = "--align-dir", allow_modified: bool = False
) -> AudioEncoder:
    """The aligned encoder of stage 1b (or an imported one), of whichever family it was made with; its tokens must
    have the vision tower's width."""
    folder = require_finished(folder, "alignment (1b)", flag_name, (ENCODER_FILE,), allow_modified)
    return fitted_encoder(load_encoder(folder / ENCODER_FILE), vision_dim, f"{flag_name}: the encoder in '{folder}'")


def fitted_encoder(encoder: AudioEncoder, vision_dim: int, what: str) -> AudioEncoder:
    """An aligned encoder for captioning, frozen: its tokens must have the vision tower's width (``what`` names it
    in the error)."""
    if encoder.output_dim != vision_dim:
        raise CheckpointError(
            f"{what} makes {encoder.output_dim}-d tokens but the captioner's vision tower is {vision_dim}-d"
        )
    return encoder.requires_grad_(False)


def load_pseudo_captions(
    folder: str | Path, flag_name: str = "--pseudo-dir", allow_modified: bool = False
) -> list[dict]:
    folder = require_finished(folder, "pseudo-captioning (2a)", flag_name, (PSEUDO_CAPTIONS_FILE,), allow_modified)
    return read_jsonl(folder / PSEUDO_CAPTIONS_FILE)


def load_distill_stage(
    folder: str | Path, template: nn.Module, flag_name: str = "--distill-dir", allow_modified: bool = False
) -> nn.Module:
    folder = require_finished(folder, "distillation (2b)", flag_name, (PROJECTOR_FILE,), allow_modified)
    return load_projector(folder / PROJECTOR_FILE, template)
