"""Pseudo-captions checked before the student learns them: each flag on hand-made captions, the report,
`dali quality` on a finished folder, and `dali distill --filter`."""

from __future__ import annotations

import json

import pytest

from dali.caption_quality import QualityReport, caption_flags, quality_markdown, record_labels
from dali.jsonl import read_jsonl
from dali.runs import Stage, read_manifest


@pytest.mark.parametrize(
    "caption, flags",
    [
        ("a dog barks while a car passes by", []),
        ("a dog barks and and a car passes", ["repetition"]),  # a word said twice back to back
        ("a dog barks a dog barks", ["repetition"]),  # a phrase said twice back to back
        ("a car passes by and then a car passes by again", ["repetition"]),  # 3 words said twice anywhere
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("rain", ["one_word"]),
        ("rain.", ["one_word"]),
        ("rain rain", ["repetition"]),
        ("2 dogs bark at 30 seconds", ["number"]),
        ("music /m/04rlf plays", ["label"]),
        ("Speech and music", ["label"]),  # with the clip's label names below
        ("speech and music", []),  # names are matched as the ontology writes them
    ],
)
def test_each_flag_on_hand_made_captions(caption, flags):
    assert caption_flags(caption, labels=["Speech"]) == flags


def test_the_report_counts_flags_repeated_captions_and_words():
    report = QualityReport()
    captions = ["a dog barks"] * 6 + ["and and and", "", "rain", "a bell rings 3 times"]
    for number, caption in enumerate(captions):
        report.add(f"c{number}", caption)
    summary = report.summary()
    assert summary["captions"] == 10 and summary["flagged_any"] == 4 and summary["flagged_any_share"] == 0.4
    assert summary["flagged"] == {"empty": 1, "one_word": 1, "repetition": 1, "number": 1, "label": 0}
    assert summary["most_frequent"][0] == {"caption": "a dog barks", "count": 6, "share": 0.6}
    assert summary["distinct_captions"] == 5 and summary["vocabulary"] == len(
        {"a", "dog", "barks", "and", "rain", "bell", "rings", "3", "times"}
    )
    assert summary["examples"]["repetition"] == [{"id": "c6", "caption": "and and and"}]
    page = quality_markdown(summary, "hand-made")
    assert "| repetition | 1 | 10.0% |" in page and "| a dog barks | 6 | 60.0% |" in page and "(empty)" in page


def test_labels_come_from_the_record_and_the_names_given():
    names = {"/m/09x0r": "Speech", "/m/04rlf": "Music"}
    assert record_labels({"labels": "/m/09x0r,/m/04rlf"}, names) == ["Speech", "Music"]
    assert record_labels({"labels": "/m/09x0r"}, {}) == [] and record_labels({}, names) == []


def _finished_pseudo(folder, captions: list[str], audio) -> None:
    """A finished pseudo-label folder holding ``captions`` (each of the world's clips in turn)."""
    stage = Stage(folder, "pseudo_label")
    stage.save_config({})
    records = [{"id": f"clip{n}", "caption": c, "audio": str(audio[n % len(audio)])} for n, c in enumerate(captions)]
    (folder / "pseudo_captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stage.finish({}, outputs=["pseudo_captions.jsonl"])
    stage.close()


CAPTIONS = ["a dog barks", "a bird sings", "and and and and", "rain", "a bell rings 3 times", "", "water flows"] * 4


def test_dali_quality_prints_the_report_of_a_finished_folder(tmp_path, capsys):
    from dali.tools import quality

    _finished_pseudo(tmp_path / "run" / "pseudo_label", CAPTIONS, [tmp_path / "a.wav"])
    assert quality.main([str(tmp_path / "run"), "--json", str(tmp_path / "q.json")]) == 0  # a run holding one
    page = capsys.readouterr().out
    assert "| repetition | 4 | 14.3% |" in page and "| any | 16 | 57.1% |" in page
    assert json.loads((tmp_path / "q.json").read_text())["flagged"]["number"] == 4


def test_distill_filter_leaves_the_flagged_captions_out_and_says_why(synthetic, tmp_path):
    from helpers import tiny_encoder_flags

    from dali.stages import align, distill

    world, llava = synthetic
    aligned = tmp_path / "align"
    assert (
        align.main([*tiny_encoder_flags(world, llava), "--epochs", "0", "--num-workers", "0", "--out", str(aligned)])
        == 0
    )
    _finished_pseudo(tmp_path / "pseudo", CAPTIONS, sorted((world / "audio").glob("pseudo*.wav")))
    flags = ["--llava", str(llava), "--align-dir", str(aligned), "--pseudo-dir", str(tmp_path / "pseudo")]
    flags += ["--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--val-fraction", "0"]
    assert distill.main([*flags, "--filter", "--out", str(tmp_path / "filtered")]) == 0
    metrics = read_manifest(tmp_path / "filtered")["metrics"]
    assert metrics["filtered"] == {"captions": 16, "by_flag": {"repetition": 4, "one_word": 4, "number": 4, "empty": 4}}
    assert metrics["clips"] == 12
    assert distill.main([*flags, "--out", str(tmp_path / "all")]) == 0
    assert (
        read_manifest(tmp_path / "all")["metrics"]["clips"] == 28
        and "filtered" not in read_manifest(tmp_path / "all")["metrics"]
    )


def test_pseudo_labelling_writes_its_quality_report_and_each_captions_flags(synthetic, tmp_path):
    from helpers import prefix_flags, tiny_encoder_flags

    from dali.stages import align, prefix_tune, pseudo_label

    world, llava = synthetic
    assert (
        align.main(
            [*tiny_encoder_flags(world, llava), "--epochs", "0", "--num-workers", "0", "--out", str(tmp_path / "a")]
        )
        == 0
    )
    assert prefix_tune.main([*prefix_flags(world, llava, 1), "--out", str(tmp_path / "p")]) == 0
    names = tmp_path / "class_labels_indices.csv"
    names.write_text("index,mid,display_name\n0,/m/09x0r,Speech\n")
    flags = ["--llava", str(llava), "--clips", str(world / "pseudo.json"), "--align-dir", str(tmp_path / "a")]
    flags += ["--prefix-dir", str(tmp_path / "p"), "--num-workers", "0", "--max-new-tokens", "6", "--limit", "8"]
    assert pseudo_label.main([*flags, "--label-names", str(names), "--out", str(tmp_path / "out")]) == 0
    records = read_jsonl(tmp_path / "out" / "pseudo_captions.jsonl")
    assert all(record["flags"] == caption_flags(record["caption"]) for record in records)
    summary = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert summary["captions"] == 8 and (tmp_path / "out" / "quality.md").read_text().startswith("# Pseudo-caption")
    assert read_manifest(tmp_path / "out")["metrics"]["flagged"] == summary["flagged"]
    from dali.data import DataError

    with pytest.raises(DataError, match="missing.csv"):  # before any captioning
        pseudo_label.main([*flags, "--label-names", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "part-000.jsonl").exists()
