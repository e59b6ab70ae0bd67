"""``dali quality PSEUDO``: what is wrong with a finished pseudo-label folder's captions (:mod:`dali.caption_quality`;
flags: ``command_configs.QualityConfig``), printed as the quality.md that ``dali pseudo-label`` writes."""

from __future__ import annotations

import json
from pathlib import Path

from dali.artifacts import PSEUDO_CAPTIONS_FILE, load_pseudo_captions
from dali.caption_quality import QualityReport, quality_markdown, record_labels
from dali.command_configs import QualityConfig
from dali.data import read_label_names
from dali.files import atomic_write_text
from dali.flags import parse_config
from dali.logs import setup_logging
from dali.stage_table import PSEUDO_LABEL


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(QualityConfig, argv)
    folder = pseudo_folder(config.pseudo, config.expe_dir)
    label_names = read_label_names(config.label_names) if config.label_names else {}
    report = QualityReport()
    for record in load_pseudo_captions(folder, "PSEUDO"):
        report.add(record["id"], record["caption"], record_labels(record, label_names))
    summary = report.summary()
    print(quality_markdown(summary, str(folder / PSEUDO_CAPTIONS_FILE)), end="")
    if config.json:
        atomic_write_text(config.json, json.dumps(summary, indent=2) + "\n")
    return 0


def pseudo_folder(given: str, expe_dir: str) -> Path:
    """A pseudo-label folder as given, or a run's (its folder, or its name under ``expe_dir``)."""
    for folder in (Path(given), Path(given) / PSEUDO_LABEL.folder, Path(expe_dir) / given / PSEUDO_LABEL.folder):
        if (folder / PSEUDO_CAPTIONS_FILE).is_file():
            return folder
    return Path(given)  # load_pseudo_captions says what it lacks
