"""Score predictions against a test list: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE/SPIDEr (when available),
SBERT-sim. Writes ``scores.json`` and ``scores.md`` next to the predictions (or in ``--out``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from dali.command_configs import EvaluateConfig
from dali.data import read_caption_csv
from dali.evaluation import read_predictions, score_predictions, scores_markdown
from dali.flags import ConfigError, parse_config
from dali.logs import setup_logging
from dali.metric_models import needed_files
from dali.runs import MANIFEST


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(EvaluateConfig, argv)
    if config.list_metric_models:
        print(metric_models_listing(config.metric_models))
        return 0
    predictions_path = Path(config.predictions)
    if not predictions_path.is_file():
        raise ConfigError(f"--predictions: '{predictions_path}' does not exist")
    clips = read_caption_csv(config.test_list, config.audio_dir)
    references = {clip.id: clip.captions for clip in clips}
    folder = predictions_path.absolute().parent  # a bare file name's parent is '.', which has no name
    out = Path(config.out) if config.out else folder.with_name(folder.name + "_rescored")
    if not config.out and not (folder / MANIFEST).exists():
        out = folder
    if (out / MANIFEST).exists():
        raise ConfigError(f"--out: '{out}' is a finished stage folder; its scores belong to its manifest")
    source = f"--predictions '{predictions_path}'"
    predictions = read_predictions(predictions_path, references.keys(), source)
    writable_folder(out)
    result = score_predictions(
        predictions,
        references,
        out,
        config.name,
        config.sbert,
        config.spice,
        allow_missing=config.allow_missing,
        source=source,
        metric_models=config.metric_models,
        audio={clip.id: clip.audio for clip in clips} if config.audio_dir else None,
    )
    print(scores_markdown(config.name, result))
    return 0


def metric_models_listing(folder: str | None) -> str:
    """Each file --metric-models must hold: what it is, its published sha256 where there is one, and, with a
    folder, whether it is there (and its size)."""
    lines = ["--metric-models DIR holds (docs/evaluation.md says where each comes from):"]
    for name, what, sha256 in needed_files():
        lines.append(f"  {name:<40} {what}" + (f"\n  {'':<40} sha256 {sha256}" if sha256 else ""))
        if folder:
            path = Path(folder) / name
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None
            size = path.stat().st_size if path.is_file() else size
            lines.append(f"  {'':<40} " + (f"present, {size:,} bytes" if path.exists() else "MISSING"))
    return "\n".join(lines)


def writable_folder(out: Path) -> None:
    """Check, before minutes of scoring, that a file can be written in ``out`` (made, then removed again if it
    did not exist); one line naming it and --out if not."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ConfigError(
            f"--out: cannot write scores into '{out}' ({error.strerror or error}); "
            "pass --out with a folder you can write to"
        ) from None
    finally:
        for folder in made:
            if folder.is_dir():
                folder.rmdir()
