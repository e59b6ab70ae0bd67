"""Score predictions against a test list: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE/SPIDEr (when available),
SBERT-sim. Writes ``scores.json`` and ``scores.md`` next to the predictions (or in ``--out``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dali.config import ConfigError, field, parse_config
from dali.data import read_caption_csv
from dali.evaluation import markdown_table, score_predictions
from dali.jsonl import read_jsonl
from dali.runs import MANIFEST
from dali.stages.common import setup_logging


@dataclass
class EvaluateConfig:
    """Score a predictions.jsonl against the references of a caption CSV."""

    predictions: str = field(help="predictions.jsonl written by `dali infer` (id, caption, ...)")
    test_list: str = field(help="AudioCaps- or Clotho-style CSV with the references")
    out: str | None = field(
        None,
        help="folder for scores.json / scores.md (default: the predictions' folder, or '<it>_rescored' beside it "
        "when it is a finished stage, whose manifest hashes its own scores)",
    )
    sbert: bool = field(True, help="compute SBERT-sim (all-MiniLM-L6-v2)")
    spice: bool = field(True, help="compute SPICE/SPIDEr when the CoreNLP jars are present")
    name: str = field("predictions", help="row name in the markdown table")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(EvaluateConfig, argv)
    predictions_path = Path(config.predictions)
    if not predictions_path.is_file():
        raise ConfigError(f"--predictions: '{predictions_path}' does not exist")
    references = {clip.id: clip.captions for clip in read_caption_csv(config.test_list)}
    folder = predictions_path.parent
    out = Path(config.out) if config.out else folder.with_name(folder.name + "_rescored")
    if not config.out and not (folder / MANIFEST).exists():
        out = folder
    if (out / MANIFEST).exists():
        raise ConfigError(f"--out: '{out}' is a finished stage folder; its scores belong to its manifest")
    out.mkdir(parents=True, exist_ok=True)
    result = score_predictions(read_jsonl(predictions_path), references, out, config.name, config.sbert, config.spice)
    print(markdown_table([(config.name, result["scores"])]))
    return 0


if __name__ == "__main__":
    from dali.cli import run

    raise SystemExit(run("evaluate", main))
