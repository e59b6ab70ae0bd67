"""The method's stages, in order: one row each, the one place that names a stage's command, folder, module, config
and outputs. The CLI's command list, the run-folder code, the API, the page and the demo read it. It imports
nothing: adding a stage is one row here plus its module (and its config in ``dali.command_configs``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageRow:
    name: str  # what its manifest and marker record
    command: str  # ``dali <command>``
    folder: str  # its folder in a run: ``<expe-dir>/<run>/<folder>``
    module: str  # its ``main``
    config: str  # its config class in ``dali.command_configs``
    outputs: tuple[str, ...]  # the trained or written files later stages load
    help: str  # its line in ``dali --help``


STAGES = (
    StageRow(
        "prefix_tune", "prefix-tune", "prefix", "dali.stages.prefix_tune", "PrefixTuneConfig",
        ("prefix.safetensors",), "1a: learn the prefix that makes LLaVA describe a frame's sounds",
    ),
    StageRow(
        "align", "align", "align", "dali.stages.align", "AlignConfig",
        ("audio_encoder.safetensors",), "1b: align an audio encoder's tokens with CLIP's (MMD, OT, OT-Att)",
    ),
    StageRow(
        "pseudo_label", "pseudo-label", "pseudo_label", "dali.stages.pseudo_label", "PseudoLabelConfig",
        ("pseudo_captions.jsonl",), "2a: caption clips from image + audio tokens + prefix",
    ),
    StageRow(
        "distill", "distill", "distill", "dali.stages.distill", "DistillConfig",
        ("projector.safetensors",), "2b: train a projector copy on those captions, audio only",
    ),
    StageRow(
        "infer", "infer", "infer", "dali.stages.infer", "InferConfig",
        ("predictions.jsonl",), "caption a test list (audio, audio + image, image) and score it",
    ),
)  # fmt: skip
BY_NAME = {row.name: row for row in STAGES}
PREFIX, ALIGN, PSEUDO_LABEL, DISTILL, INFER = STAGES
TRAINED = (PREFIX, ALIGN, DISTILL)  # the stages whose files a finished run captions with


def infer_folder(modality: str, tag: str | None = None) -> str:
    """``dali infer``'s folder in a run: one per modality (and tag), beside the trained stages."""
    return f"{INFER.folder}_{modality}" + (f"_{tag}" if tag else "")
