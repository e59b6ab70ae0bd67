"""One captioning path: LLaVA, the aligned encoder, the prefix and a distilled projector, loaded once, in one
dtype, and the modality block they make from audio features and frames. ``dali pseudo-label``, ``dali infer``
and ``dali caption`` all caption through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dali import model_folder
from dali.artifacts import fitted_encoder, load_align_stage, load_distill_stage, load_prefix_stage
from dali.constants import DTYPE_NAMES
from dali.models.captioner import Captioner
from dali.models.float8 import FLOAT8, check_float8, quantize_float8
from dali.run import Run
from dali.runs import check_llava
from dali.stage_table import ALIGN, DISTILL, PREFIX, StageRow

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of every captioning part for a ``--dtype`` value; float8: bfloat16 around the LLM's float8 linear
    layers (:mod:`dali.models.float8`)."""
    return torch.bfloat16 if precision == FLOAT8 else DTYPES[precision]


def load_captioner(source: str, precision: str, device, conv_mode: str) -> Captioner:
    """LLaVA in the captioning precision: float8 is checked before anything loads, then made on the device."""
    device = torch.device(device)
    if precision == FLOAT8:
        check_float8(device)
    captioner = Captioner.from_pretrained(source, dtype=precision_dtype(precision), device=device, conv_mode=conv_mode)
    if precision == FLOAT8:
        quantize_float8(captioner.llava.model.language_model)
    return captioner


class CaptioningModels:
    """The models behind one set of captions. Every part runs in the captioner's dtype (the original ran all of
    them in bf16): ``--dtype`` means the whole path (float8: the LLM's linear layers in float8, the rest in bf16)."""

    def __init__(self, captioner: Captioner, encoder=None, prefix=None, projector: nn.Module | None = None):
        self.captioner, self.encoder, self.prefix, self.projector = captioner, encoder, prefix, projector

    @classmethod
    def load(
        cls,
        run: Run,
        uses: Sequence[StageRow] = (),
        *,
        llava: str | None = None,
        conv_mode: str | None = None,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        allow_modified: bool = False,
    ) -> "CaptioningModels":
        """The one loader of the stages that caption and of the API: LLaVA (``llava``, else the one the used stages
        recorded, checked against their record: :meth:`Run.llava`) with the prompt ``conv_mode`` (else the run's),
        in ``dtype`` (a ``--dtype`` value), and those of the aligned encoder, the prefix and the distilled projector
        that ``uses`` names, each checked against its stage's manifest (``allow_modified``: a changed file only
        warns)."""
        llava = run.llava(llava, uses, allow_modified)
        conv_mode = conv_mode or run.conv_mode(uses)
        captioner = load_captioner(llava, dtype, device, conv_mode)
        dtype = precision_dtype(dtype)
        loaders = {
            ALIGN: (load_align_stage, captioner.vision_dim),
            PREFIX: (load_prefix_stage, captioner.hidden_size),
            DISTILL: (load_distill_stage, captioner.projector),
        }
        parts = {
            row: load(run.stage(row), template, run.flag(row), allow_modified).to(device, dtype)
            for row, (load, template) in loaders.items()
            if row in uses
        }
        return cls(captioner, parts.get(ALIGN), parts.get(PREFIX), parts.get(DISTILL))

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        *,
        llava: str | None = None,
        conv_mode: str | None = None,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        allow_modified: bool = False,
    ) -> "CaptioningModels":
        """The models of an exported model folder (:mod:`dali.model_folder`): its LLaVA (``llava``, else the one it
        names, checked against the fingerprint it records when it is a local folder) and its trained parts, read
        from weights whose sha256 is the config's."""
        from dali.models.audio_encoders import encoder_from_state
        from dali.models.prefix import prefix_from_state
        from dali.models.projector import projector_from_state

        config = model_folder.read_config(folder)
        source = llava or config["llava"]
        check_llava(source, config.get("llava_fingerprint"), allow_modified, "this model was exported with")
        captioner = load_captioner(source, dtype, device, conv_mode or config["conv_mode"])
        dtype = precision_dtype(dtype)
        parts = model_folder.read_parts(folder, config)
        where = str(folder / model_folder.WEIGHTS_FILE)
        encoder = fitted_encoder(encoder_from_state(*parts["audio_encoder"], where), captioner.vision_dim, f"'{where}'")
        prefix = prefix_from_state(parts["prefix"][0], where, captioner.hidden_size) if "prefix" in parts else None
        projector = (
            projector_from_state(parts["projector"][0], where, captioner.projector) if "projector" in parts else None
        )
        moved = [part.to(device, dtype) if part is not None else None for part in (encoder, prefix, projector)]
        return cls(captioner, *moved)

    @property
    def device(self) -> torch.device:
        return self.captioner.device

    @torch.no_grad()
    def block(self, features: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The modality block [B, K, hidden]: [image tokens?, audio tokens?, prefix?].

        Args:
            features: [B, frames, bins] audio features (needs the encoder).
            pixels: [B, 3, S, S] preprocessed frames.
        """
        image = self.captioner.image_tokens(pixels) if pixels is not None else None
        audio = self.encoder.project(features.to(self.device)) if features is not None else None
        prefix = self.prefix() if self.prefix is not None else None
        return self.captioner.modality_block(
            image, audio, prefix=prefix, audio_projector=self.projector, image_projector=self.projector
        )
