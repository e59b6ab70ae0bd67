"""One captioning path: LLaVA, the aligned encoder, the prefix and a distilled projector, loaded once, in one
dtype, and the modality block they make from audio features and frames. ``dali pseudo-label``, ``dali infer``
and ``dali caption`` all caption through it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dali.artifacts import load_align_stage, load_distill_stage, load_prefix_stage
from dali.constants import DTYPE_NAMES
from dali.errors import ModelLoadError
from dali.models.captioner import Captioner
from dali.runs import MANIFEST, IntegrityError, identity_change, model_fingerprint, read_manifest

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
log = logging.getLogger("dali")


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


def _manifests(folders) -> list[dict]:
    return [read_manifest(folder) for folder in folders if folder is not None and (Path(folder) / MANIFEST).is_file()]


def recorded_llava(*folders) -> tuple[str, dict] | None:
    """(where the LLaVA is now, its recorded fingerprint) that the first of these finished stage folders names: the
    path recorded inside its run when there is one (a run copied elsewhere), else the resolved path recorded (an
    input; a metric in older runs, as typed)."""
    for folder in folders:
        if folder is None or not (Path(folder) / MANIFEST).is_file():
            continue
        manifest = read_manifest(folder)
        recorded = manifest.get("inputs", {}).get("llava") or {}
        inside = recorded.get("in_run") and Path(folder).parent / recorded["in_run"]
        llava = str(inside) if inside and inside.exists() else recorded.get("path")
        llava = llava or manifest.get("metrics", {}).get("llava")
        if llava:
            return llava, recorded
    return None


def resolve_llava(given: str | None, *folders, allow_modified: bool = False) -> str:
    """``given``, else the LLaVA the folders' manifests record; either is checked against the fingerprint the run
    recorded (its config and weight files' headers: :func:`dali.runs.model_fingerprint`), so a run loaded from
    anywhere uses the LLaVA it was made with or says why not (``allow_modified``: a difference only warns)."""
    found = recorded_llava(*folders)
    if not (given or found):
        raise ModelLoadError("--llava is needed: no finished upstream stage of this run names the LLaVA it used")
    llava = given or found[0]
    recorded = found[1] if found else {}
    if not given and recorded.get("config_sha256") and not Path(llava).is_dir():
        raise ModelLoadError(
            f"the LLaVA this run was made with, '{llava}', is not there (from '{Path.cwd()}'); pass --llava"
        )
    if recorded.get("config_sha256") and Path(llava).is_dir():
        change = identity_change(recorded, model_fingerprint(Path(llava)))
        if change:
            message = f"--llava '{llava}' is not the LLaVA this run was made with ({change})"
            if not allow_modified:
                raise IntegrityError(message + "; pass --allow-modified to use it anyway")
            log.warning("%s; used anyway (--allow-modified)", message)
    return llava


def recorded_conv_mode(*folders) -> str:
    """The conversation mode a run's captions use by default: the one its first finished folder records;
    ``llava_v1`` (the original's inference prompt) for imported weights, ``v1`` (the training prompt) otherwise."""
    for manifest in _manifests(folders):
        mode = manifest.get("metrics", {}).get("conv_mode")
        if mode:
            return mode
        return "llava_v1" if manifest.get("stage", "").startswith("import_original") else "v1"
    return "v1"
