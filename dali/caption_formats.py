"""Captions of one file in the formats captioning tools write (Whisper's set): plain text, JSON, SubRip, WebVTT and
tab-separated values, each caption with its window's start and end and the modality it was captioned from.

A record is ``{"start": s, "end": s, "caption": text, "modality": "audio" | "audio_vis"}``; :func:`render` gives a
file's text in one format. Written by hand: the formats are a few lines each, and the packages that write them
(srt, webvtt-py) would be two more pins for that.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from dali.constants import CAPTION_FORMATS

FORMATS = CAPTION_FORMATS
ALL = "all"


def clock(seconds: float, decimal: str) -> str:
    """``HH:MM:SS<decimal>mmm`` (SubRip's decimal is a comma, WebVTT's a dot)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _one_line(text: str) -> str:
    """A caption on one line (a blank line ends a cue in SubRip and WebVTT; a tab or newline breaks a TSV row)."""
    return " ".join(text.split())


def render(records: Sequence[dict], fmt: str, source: dict[str, Any] | None = None) -> str:
    """One file's captions as ``fmt``; ``source`` (json only) says what made them."""
    if fmt == "txt":
        return "".join(f"{_one_line(r['caption'])}\n" for r in records)
    if fmt == "json":
        body = {"captions": [dict(r, caption=_one_line(r["caption"])) for r in records]} | (source or {})
        return json.dumps(body, indent=2) + "\n"
    if fmt == "srt":
        cues = (
            f"{i}\n{clock(r['start'], ',')} --> {clock(r['end'], ',')}\n{_one_line(r['caption'])}\n"
            for i, r in enumerate(records, 1)
        )
        return "\n".join(cues)
    if fmt == "vtt":
        cues = (f"{clock(r['start'], '.')} --> {clock(r['end'], '.')}\n{_one_line(r['caption'])}\n" for r in records)
        return "WEBVTT\n\n" + "\n".join(cues)
    if fmt == "tsv":
        rows = (f"{round(r['start'] * 1000)}\t{round(r['end'] * 1000)}\t{r['modality']}\t{_one_line(r['caption'])}\n"
                for r in records)  # fmt: skip
        return "start\tend\tmodality\tcaption\n" + "".join(rows)
    raise ValueError(f"unknown caption format '{fmt}'; choose from {', '.join(FORMATS)}")


def chosen(fmt: str) -> tuple[str, ...]:
    """The formats ``--output-format`` names (``all``: every one)."""
    return FORMATS if fmt == ALL else (fmt,)
