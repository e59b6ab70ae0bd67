"""What is wrong with a caption, and a report on a set of pseudo-captions, before a student learns them.

A caption is flagged for each of:

* ``empty``: nothing but spaces;
* ``one_word``: a single word;
* ``repetition``: a phrase said again: a word or phrase of up to 4 words repeated back to back ("and and", "a dog a
  dog"), or a phrase of 3 or more words said twice anywhere ("a dog barks and a dog barks");
* ``number``: a digit ("30 seconds", "2 dogs"): AudioSet clips carry times and counts in their names and metadata;
* ``label``: an AudioSet label id (``/m/09x0r``), or one of the clip's labels named as the ontology names it
  ("Speech", with ``label_names``): what pipelines that show the teacher the labels are known to leak.

The flags are pure functions; :class:`QualityReport` streams over the captions, keeping one count per distinct
caption, and writes quality.json and quality.md.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Mapping

FLAGS = ("empty", "one_word", "repetition", "number", "label")
_WORD = re.compile(r"[\w']+")
_LABEL_ID = re.compile(r"/[mgt]/[0-9a-z_]{2,}")
TOP = 10  # the most frequent captions listed in the report
EXAMPLES = 5  # flagged captions shown per flag


def caption_flags(caption: str, labels: Iterable[str] = ()) -> list[str]:
    """The flags (of :data:`FLAGS`, in that order) that ``caption`` raises; ``labels``: its clip's label names."""
    words = _WORD.findall(caption.lower())
    flags = []
    if not words:
        flags.append("empty")
    elif len(words) == 1:
        flags.append("one_word")
    if _repeats(words):
        flags.append("repetition")
    if any(character.isdigit() for character in _LABEL_ID.sub(" ", caption)):  # a label id's digits are its own
        flags.append("number")
    if _LABEL_ID.search(caption) or any(name and name in caption for name in labels):
        flags.append("label")
    return flags


def _repeats(words: list[str]) -> bool:
    for n in range(1, 5):  # a phrase of n words said twice back to back
        if any(words[i : i + n] == words[i + n : i + 2 * n] for i in range(len(words) - 2 * n + 1)):
            return True
    seen = set()
    for i in range(len(words) - 2):  # a phrase of 3 words said twice anywhere (any longer one contains one)
        phrase = tuple(words[i : i + 3])
        if phrase in seen:
            return True
        seen.add(phrase)
    return False


def record_labels(record: Mapping, label_names: Mapping[str, str]) -> list[str]:
    """The names of a pseudo-caption record's labels (its ``labels``: ids separated by commas, as AudioSet's
    lists write them), as ``label_names`` (id -> name) names them."""
    labels = record.get("labels")
    if not isinstance(labels, str) or not label_names:
        return []
    return [label_names[label] for label in labels.split(",") if label in label_names]


class QualityReport:
    """Counts over captions added one at a time: each flag (with a few examples), each distinct caption, each word."""

    def __init__(self):
        self.count = 0
        self.flag_counts = Counter()
        self.flagged_any = 0
        self.examples: dict[str, list[dict]] = {flag: [] for flag in FLAGS}
        self.captions = Counter()
        self.words = Counter()

    def add(self, clip_id: str, caption: str, labels: Iterable[str] = ()) -> list[str]:
        """Count one caption; returns its flags."""
        flags = caption_flags(caption, labels)
        self.count += 1
        self.captions[caption.strip()] += 1
        self.words.update(_WORD.findall(caption.lower()))
        self.flag_counts.update(flags)
        self.flagged_any += bool(flags)
        for flag in flags:
            if len(self.examples[flag]) < EXAMPLES:
                self.examples[flag].append({"id": clip_id, "caption": caption})
        return flags

    def flagged(self, records: Iterable[dict], label_names: Mapping[str, str]) -> Iterator[dict]:
        """``records`` (a captioning stage's, merged) counted as they pass, each caption given its ``flags``."""
        for record in records:
            if not record.get("skipped"):
                record["flags"] = self.add(record["id"], record["caption"], record_labels(record, label_names))
            yield record

    def write(self, folder: Path, captions_name: str) -> dict:
        """quality.json and quality.md in ``folder``; returns the summary."""
        from dali.artifacts import QUALITY_JSON, QUALITY_MD
        from dali.files import atomic_write_json, atomic_write_text

        summary = self.summary()
        atomic_write_json(folder / QUALITY_JSON, summary)
        atomic_write_text(folder / QUALITY_MD, quality_markdown(summary, str(folder / captions_name)))
        return summary

    def summary(self) -> dict:
        top = self.captions.most_common(TOP)
        share = (lambda n: round(n / self.count, 4)) if self.count else (lambda n: 0.0)
        return {
            "captions": self.count,
            "flagged": {flag: self.flag_counts[flag] for flag in FLAGS},
            "flagged_share": {flag: share(self.flag_counts[flag]) for flag in FLAGS},
            "flagged_any": self.flagged_any,
            "flagged_any_share": share(self.flagged_any),
            "distinct_captions": len(self.captions),
            "vocabulary": len(self.words),
            "most_frequent_share": share(top[0][1]) if top else 0.0,
            f"top{TOP}_share": share(sum(count for _, count in top)),
            "most_frequent": [{"caption": caption, "count": count, "share": share(count)} for caption, count in top],
            "examples": {flag: examples for flag, examples in self.examples.items() if examples},
        }


def quality_markdown(summary: dict, title: str) -> str:
    """The report as a page: the flags, the repetition of whole captions, the vocabulary, examples."""
    lines = [f"# Pseudo-caption quality: {title}", "", f"{summary['captions']} captions.", ""]
    lines += ["| flag | captions | share |", "|---|---|---|"]
    for flag in FLAGS:
        lines.append(f"| {flag} | {summary['flagged'][flag]} | {summary['flagged_share'][flag]:.1%} |")
    lines.append(f"| any | {summary['flagged_any']} | {summary['flagged_any_share']:.1%} |")
    lines += ["", f"Distinct captions: {summary['distinct_captions']}; vocabulary: {summary['vocabulary']} words; "
              f"the most frequent caption is {summary['most_frequent_share']:.1%} of all, the {TOP} most frequent "
              f"{summary[f'top{TOP}_share']:.1%}.", ""]  # fmt: skip
    lines += ["| most frequent | count | share |", "|---|---|---|"]
    lines += [f"| {_cell(row['caption'])} | {row['count']} | {row['share']:.1%} |" for row in summary["most_frequent"]]
    for flag, examples in summary["examples"].items():
        lines += ["", f"Flagged {flag}:", ""] + [f"- `{example['id']}`: {example['caption']!r}" for example in examples]
    return "\n".join(lines) + "\n"


def _cell(caption: str) -> str:
    """A caption as a table cell: a bar would end the cell."""
    return caption.replace("|", "\\|") if caption else "(empty)"
