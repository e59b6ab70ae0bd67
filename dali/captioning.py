"""One captioning path: LLaVA, the aligned encoder, the prefix and a distilled projector, loaded once, in one
dtype, and the modality block they make from audio features and frames. ``dali pseudo-label``, ``dali infer``
and ``dali caption`` all caption through it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dali.artifacts import load_align_stage, load_distill_stage, load_prefix_stage
from dali.constants import DTYPE_NAMES
from dali.models.captioner import Captioner

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class CaptioningModels:
    """The models behind one set of captions. Every part runs in the captioner's dtype (the original ran all of
    them in bf16): ``--dtype`` means the whole path."""

    def __init__(self, captioner: Captioner, encoder=None, prefix=None, projector: nn.Module | None = None):
        self.captioner, self.encoder, self.prefix, self.projector = captioner, encoder, prefix, projector

    @classmethod
    def load(
        cls,
        llava: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        conv_mode: str = "v1",
        align_dir: Path | None = None,
        prefix_dir: Path | None = None,
        distill_dir: Path | None = None,
        flags: tuple[str, str, str] = ("--align-dir", "--prefix-dir", "--distill-dir"),
        allow_modified: bool = False,
    ) -> "CaptioningModels":
        """LLaVA, plus whichever of the aligned encoder, the prefix and the distilled projector is given, each
        checked against its stage's manifest (``allow_modified``: a changed file only warns)."""
        captioner = Captioner.from_pretrained(llava, dtype=dtype, device=device, conv_mode=conv_mode)
        encoder = prefix = projector = None
        if align_dir is not None:
            encoder = load_align_stage(align_dir, captioner.vision_dim, flags[0], allow_modified).to(device, dtype)
        if prefix_dir is not None:
            prefix = load_prefix_stage(prefix_dir, captioner.hidden_size, flags[1], allow_modified).to(device, dtype)
        if distill_dir is not None:
            projector = load_distill_stage(distill_dir, captioner.projector, flags[2], allow_modified).to(device, dtype)
        return cls(captioner, encoder, prefix, projector)

    @property
    def device(self) -> torch.device:
        return self.captioner.device

    @torch.no_grad()
    def block(self, fbank: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The modality block [B, K, hidden]: [image tokens?, audio tokens?, prefix?].

        Args:
            fbank: [B, frames, mel] audio features (needs the encoder).
            pixels: [B, 3, S, S] preprocessed frames.
        """
        image = self.captioner.image_tokens(pixels) if pixels is not None else None
        audio = self.encoder.project(fbank.to(self.device)) if fbank is not None else None
        prefix = self.prefix() if self.prefix is not None else None
        return self.captioner.modality_block(
            image, audio, prefix=prefix, audio_projector=self.projector, image_projector=self.projector
        )
