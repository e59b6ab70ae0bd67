"""Score predictions against a test list: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE/SPIDEr (when available),
SBERT-sim. Writes ``scores.json`` and ``scores.md`` next to the predictions (or in ``--out``)."""

from __future__ import annotations

from pathlib import Path

from dali.command_configs import EvaluateConfig
from dali.config import ConfigError, parse_config
from dali.data import read_caption_csv
from dali.evaluation import markdown_table, score_predictions
from dali.jsonl import read_jsonl
from dali.runs import MANIFEST
from dali.stages.common import setup_logging


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
