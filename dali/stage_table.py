"""Every ``dali`` command, one row each: the method's stages in order (the one place that names a stage's command,
folder, module, config and outputs), then the tools and the built-in world's commands. The CLI's command list and
help, the run-folder code, the API, the page and the demo read it. It imports nothing: adding a stage is one row
here plus its module (and its config in ``dali.command_configs``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommandRow:
    command: str  # ``dali <command>``
    module: str  # its ``main``
    config: str  # its config class in ``dali.command_configs``
    help: str  # its line in ``dali --help``


@dataclass(frozen=True)
class StageRow(CommandRow):
    """A command that is a stage of the method: what its run folder holds, beside the command's own row."""

    name: str  # what its manifest and marker record
    folder: str  # its folder in a run: ``<expe-dir>/<run>/<folder>``
    outputs: tuple[str, ...]  # the trained or written files later stages load
    flag: str | None = None  # the config field by which a later stage names this folder (``--align-dir``)


STAGES = (
    StageRow(
        "prefix-tune", "dali.stages.prefix_tune", "PrefixTuneConfig",
        "1a: learn the prefix that makes LLaVA describe a frame's sounds",
        name="prefix_tune", folder="prefix", outputs=("prefix.safetensors",), flag="prefix_dir",
    ),
    StageRow(
        "align", "dali.stages.align", "AlignConfig",
        "1b: align an audio encoder's tokens with CLIP's (MMD, OT, OT-Att)",
        name="align", folder="align", outputs=("audio_encoder.safetensors",), flag="align_dir",
    ),
    StageRow(
        "pseudo-label", "dali.stages.pseudo_label", "PseudoLabelConfig",
        "2a: caption clips from image + audio tokens + prefix",
        name="pseudo_label", folder="pseudo_label", outputs=("pseudo_captions.jsonl", "quality.json", "quality.md"),
        flag="pseudo_dir",
    ),
    StageRow(
        "distill", "dali.stages.distill", "DistillConfig",
        "2b: train a projector copy on those captions, audio only",
        name="distill", folder="distill", outputs=("projector.safetensors",), flag="distill_dir",
    ),
    StageRow(
        "infer", "dali.stages.infer", "InferConfig",
        "caption a test list (audio, audio + image, image) and score it",
        name="infer", folder="infer", outputs=("predictions.jsonl",),
    ),
    StageRow(
        "reproduce", "dali.stages.reproduce", "ReproduceConfig",
        "the paper's evaluation of a finished run over seeds, and exactly which clips it scored",
        name="reproduce", folder="reproduce", outputs=("results.json", "results.md", "per_clip.jsonl"),
    ),
)  # fmt: skip
PREFIX, ALIGN, PSEUDO_LABEL, DISTILL, INFER, REPRODUCE = STAGES
TRAINED = (PREFIX, ALIGN, DISTILL)  # the stages whose files a finished run captions with


def infer_folder(modality: str, tag: str | None = None) -> str:
    """``dali infer``'s folder in a run: one per modality (and tag), beside the trained stages."""
    return f"{INFER.folder}_{modality}" + (f"_{tag}" if tag else "")


TOOLS = (
    CommandRow(
        "caption", "dali.tools.caption", "CaptionConfig", "caption any audio or video file with a finished run"
    ),
    CommandRow("app", "dali.tools.app", "AppConfig", "a web page to caption a clip (upload or record) with a run"),
    CommandRow("evaluate", "dali.tools.evaluate", "EvaluateConfig", "score a predictions file against a test list"),
    CommandRow(
        "prepare", "dali.tools.prepare", "PrepareConfig", "media files -> 16 kHz wavs, frames and a CAV-MAE list"
    ),
    CommandRow(
        "import-original", "dali.tools.import_original", "ImportOriginalConfig",
        "the released DALI weights -> a run folder",
    ),
    CommandRow(
        "export", "dali.tools.export", "ExportConfig", "a finished run -> a model folder to share and load by name"
    ),
    CommandRow(
        "quality", "dali.tools.quality", "QualityConfig",
        "check a run's pseudo-captions (loops, empty, numbers, labels) before distilling",
    ),
)  # fmt: skip
WORLD = (
    CommandRow(
        "world", "dali.synthetic.build", "WorldCommandConfig", "generate the world and train its tiny image captioner"
    ),
    CommandRow("demo", "dali.synthetic.demo", "DemoConfig", "the whole method on the world, and its results table"),
)
GROUPS = {"the method's stages, in order": STAGES, "tools": TOOLS, "the built-in synthetic world": WORLD}
COMMANDS = {row.command: row for rows in GROUPS.values() for row in rows}


def command_of(*, module: str | None = None, config: str | None = None) -> str | None:
    """The command whose module (or config class) this is; None for none."""
    found = [row.command for row in COMMANDS.values() if module in (None, row.module) and config in (None, row.config)]
    return found[0] if found else None
