import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dali.evaluation import evaluate_captions, markdown_table, spice_unavailable_reason

CANDIDATES = {
    "a": "a dog barks twice",
    "b": "a bell rings",
    "c": "water flows quietly then a bird sings",
    "d": "a car",
    "e": "",
}
REFERENCES = {
    "a": ["a dog barks", "dog barking loudly", "a dog is barking"],
    "b": ["a bell rings once", "bells ring"],
    "c": ["a stream trickles, then a bird chirps", "water flows and a bird sings"],
    "d": ["a car passes by", "a car engine hums"],
    "e": ["wind blows"],
}
METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")


@pytest.fixture(scope="module")
def ours():
    return evaluate_captions(CANDIDATES, REFERENCES)


def test_scores_equal_aac_metrics_on_the_same_inputs(ours, tmp_path):
    aac_metrics = pytest.importorskip("aac_metrics")
    import aac_metrics.utils.checks as checks
    import pycocoevalcap

    # aac-metrics refuses Java > 13 and would download its jars: point it at the ones pycocoevalcap ships
    checks.MAX_JAVA_MAJOR_VERSION = 99
    shipped = Path(list(pycocoevalcap.__path__)[0])  # a namespace package: no __file__
    layout = {
        "stanford_nlp/stanford-corenlp-3.4.1.jar": "tokenizer/stanford-corenlp-3.4.1.jar",
        "meteor/meteor-1.5.jar": "meteor/meteor-1.5.jar",
        "meteor/data/paraphrase-en.gz": "meteor/data/paraphrase-en.gz",
    }
    for target, source in layout.items():
        (tmp_path / "aac-metrics" / target).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "aac-metrics" / target).symlink_to(shipped / source)
    ids = list(REFERENCES)
    theirs, _ = aac_metrics.evaluate(
        [CANDIDATES[i] for i in ids if CANDIDATES[i]],
        [REFERENCES[i] for i in ids if CANDIDATES[i]],
        metrics=[*METRICS, "vocab"],
        cache_path=str(tmp_path),
    )
    subset = evaluate_captions(
        {i: CANDIDATES[i] for i in ids if CANDIDATES[i]},
        {i: REFERENCES[i] for i in ids if CANDIDATES[i]},
        use_sbert=False,
    )
    for metric in METRICS:
        assert subset["scores"][metric] == pytest.approx(float(theirs[metric]), abs=1e-9), metric
    # DCASE's vocabulary sizes: of the predictions, of every reference, and their ratio
    for ours_name, their_name in (
        ("vocab", "cands"),
        ("vocab_references", "mrefs_full"),
        ("vocab_ratio", "ratio_full"),
    ):
        assert subset["scores"][ours_name] == pytest.approx(float(theirs[f"vocab.{their_name}"]), abs=1e-9)
    assert ours["num_clips"] == 5  # an empty prediction is scored, not dropped
    assert ours["scores"]["vocab"] == subset["scores"]["vocab"]  # an empty prediction adds no word


def test_sbert_and_unavailable_metrics(ours):
    assert 0 < ours["scores"]["sbert_sim"] < 1
    # SPICE and SPIDEr are scored where SPICE can run (java and its jars), else listed with the reason: never both
    reason = spice_unavailable_reason()
    for metric in ("spice", "spider"):
        assert (metric in ours["scores"]) == (reason is None) and ours["unavailable"].get(metric) == reason
    table = markdown_table([("run", ours["scores"])])
    assert "SBERT-sim (all-MiniLM-L6-v2)" in table and "| run |" in table


def test_missing_predictions_and_empty_references_are_errors():
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_captions({"a": "x"}, {"a": ["y"], "b": ["z"]}, use_sbert=False)
    with pytest.raises(ValueError, match="empty reference"):
        evaluate_captions({"a": "x"}, {"a": [" "]}, use_sbert=False)


# -- predictions cannot make the scores lie (issue 37) ------------------------------------------------------------
NASTY = list("\r\n\t\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\u200b\u00a0\ufeff") + [" ", "dog", "barks", "é"]
ODD_TEXT = st.one_of(
    st.lists(st.one_of(st.sampled_from(NASTY), st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp", "Ll")))).map(
        "".join
    ),
    st.lists(st.sampled_from(NASTY), min_size=500, max_size=3000).map("".join),  # very long captions
)


@pytest.fixture(scope="module")
def alone():
    from dali.evaluation import per_clip_scores

    return per_clip_scores(CANDIDATES, REFERENCES)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(clip=st.sampled_from(sorted(REFERENCES)), text=ODD_TEXT)
def test_odd_text_in_one_prediction_moves_no_other_clips_score(alone, clip, text):
    """Control characters, Unicode separators, empty and very long text in one prediction: every other clip's
    BLEU-4, ROUGE-L and CIDEr-D are unchanged and the corpus scores are finite."""
    import math

    from dali.evaluation import per_clip_scores

    scored = per_clip_scores(dict(CANDIDATES, **{clip: text}), REFERENCES)
    for other in set(REFERENCES) - {clip}:
        assert scored["per_clip"][other] == pytest.approx(alone["per_clip"][other]), other
    assert all(math.isfinite(value) for value in scored["scores"].values())


def test_a_carriage_return_in_one_prediction_changes_no_score(ours):
    """It shifted every later clip onto another's text: CIDEr-D 3.6 -> 0.0."""
    broken = dict(CANDIDATES, a="a dog\rbarks\u2028twice", e="\r\x85\u2029")
    scores = evaluate_captions(broken, REFERENCES, use_sbert=False)["scores"]
    assert {m: scores[m] for m in METRICS} == pytest.approx({m: ours["scores"][m] for m in METRICS})


def test_per_clip_scores_are_reported_with_the_corpus_scores(ours):
    assert set(ours["per_clip"]) == set(REFERENCES)
    assert ours["per_clip"]["a"]["cider_d"] > ours["per_clip"]["e"]["cider_d"] == 0


def lines(*records):
    return list(enumerate(records, start=1))


@pytest.mark.parametrize(
    "records,message",
    [
        (
            lines({"id": "a", "caption": "x"}, {"id": "a", "caption": "y"}),
            "line 2: clip 'a' was already predicted on line 1",
        ),
        (lines({"id": "b", "caption": "x"}, {"id": "q", "caption": "y"}), "line 2: clip 'q' is not in the test list"),
        (lines({"id": "a"}), "line 1: clip 'a' needs a string 'caption', got no 'caption'"),
        (lines({"id": "a", "caption": None}), "line 1: clip 'a' needs a string 'caption', got null"),
        (lines({"id": "a", "caption": 3}), "line 1: clip 'a' needs a string 'caption', got 3"),
        (lines({"id": "a", "caption": ["x"]}), 'got ["x"]'),
        (lines({"id": 1.5, "caption": "x"}), "line 1: 'id' must be a string or an integer, got 1.5"),
        (lines({"caption": "x"}), "'id' must be a string or an integer, got null"),
        (lines(["a", "x"]), "line 1: a prediction is a JSON object, got list"),
    ],
)
def test_records_off_the_schema_are_errors_naming_the_file_and_line(records, message):
    from dali.evaluation import PredictionsError, prediction_map

    prefix = "preds.jsonl " if message.startswith("line") else ""
    with pytest.raises(PredictionsError, match=re.escape(prefix + message)) as caught:
        prediction_map(records, REFERENCES.keys(), "preds.jsonl")
    assert "preds.jsonl" in str(caught.value)


def test_integer_ids_are_compared_as_text():
    from dali.evaluation import prediction_map

    assert prediction_map(lines({"id": 7, "caption": "x"}), {"7"}, "p") == {"7": "x"}


@pytest.mark.parametrize("kept,message", [("a", "4 of the 5 clips of the test list have no prediction")])
def test_missing_clips_are_an_error_unless_allowed(kept, message, tmp_path):
    from dali.evaluation import PredictionsError, score_predictions

    with pytest.raises(PredictionsError, match=re.escape(message)):
        score_predictions({kept: "x"}, REFERENCES, tmp_path / "out", "run", sbert=False, spice=False, source="p")
    assert not (tmp_path / "out").exists()


def test_missing_clips_are_scored_only_when_allowed_and_the_table_says_so(tmp_path):
    from dali.evaluation import score_predictions

    predictions = {"a": "a dog barks", "b": "a bell"}
    result = score_predictions(predictions, REFERENCES, tmp_path, "run", sbert=False, spice=False, allow_missing=True)
    assert result["coverage"] == {"scored": 2, "of": 5, "missing": ["c", "d", "e"]}
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["coverage"]["missing"] == ["c", "d", "e"]
    assert "run (2 of 5 clips)" in (tmp_path / "scores.md").read_text()


def dali_evaluate(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dali.cli", "evaluate", *flags, "--no-sbert", "--no-spice"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_dali_evaluate_gives_one_line_for_each_bad_predictions_file(tmp_path):
    (tmp_path / "test.csv").write_text("file_name,caption_1\n1,a dog barks\nb,a bell rings\n")
    cases = {
        "dup.jsonl": ('{"id": "1", "caption": "x"}\n{"id": 1, "caption": "y"}\n', "line 2: clip '1' was already"),
        "unknown.jsonl": ('{"id": 1, "caption": "x"}\n{"id": "c", "caption": "y"}\n', "line 2: clip 'c' is not in"),
        "short.jsonl": ('{"id": 1, "caption": "x"}\n', "1 of the 2 clips of the test list have no prediction"),
        "null.jsonl": ('\n{"id": 1, "caption": null}\n', "line 2: clip '1' needs a string 'caption', got null"),
        "torn.jsonl": ('{"id": 1, "caption": "x"}\n{"id": \n{"id": "b", "caption": "z"}\n', "line 2 is not valid"),
        "latin1.jsonl": ('{"id": 1, "caption": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        done = dali_evaluate(tmp_path, "--predictions", name, "--test-list", "test.csv")
        assert done.returncode == 2 and "Traceback" not in done.stderr, (name, done.stderr)
        assert name in done.stderr and message in done.stderr, (name, done.stderr)
        assert sorted(path.name for path in tmp_path.iterdir() if path.suffix not in (".jsonl", ".csv")) == []


def test_dali_evaluate_scores_integer_ids_and_reports_missing_clips_when_allowed(tmp_path):
    (tmp_path / "test.csv").write_text("file_name,caption_1\n1,a dog barks\nb,a bell rings\n")
    (tmp_path / "p.jsonl").write_text('{"id": 1, "caption": "a dog\\r barks"}\n')
    done = dali_evaluate(tmp_path, "--predictions", "p.jsonl", "--test-list", "test.csv", "--allow-missing")
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["coverage"] == {"scored": 1, "of": 2, "missing": ["b"]} and scores["scores"][
        "bleu_1"
    ] == pytest.approx(1)
    assert "(1 of 2 clips)" in done.stdout
    # without --metric-models, the legacy set is printed and DCASE's model-based metrics are named as unavailable
    assert "| bleu_4 |" in done.stdout and "| spider_fl | fense |" in done.stdout
    assert "- fense: unavailable (no --metric-models folder" in done.stdout and "- clap_sim: unavailable" in done.stdout


def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from dali.cli import run
    from dali.tools import evaluate

    (tmp_path / "test.csv").write_text("file_name,caption_1\na,a dog barks\n")
    (tmp_path / "p.jsonl").write_text('{"id": "a", "caption": "a dog"}\n')
    (tmp_path / "file").write_text("")
    base = ["--predictions", str(tmp_path / "p.jsonl"), "--test-list", str(tmp_path / "test.csv"), "--no-sbert"]
    assert run("evaluate", evaluate.main, base + ["--out", str(tmp_path / "file" / "scores")]) == 2
    assert f"--out: cannot write scores into '{tmp_path / 'file' / 'scores'}'" in capsys.readouterr().err

    def read_only(*args, **kwargs):  # what a folder without write permission gives (root ignores chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(evaluate.tempfile, "TemporaryFile", read_only)
    assert run("evaluate", evaluate.main, base) == 2  # the default: beside the predictions
    assert f"--out: cannot write scores into '{tmp_path}' (Permission denied)" in capsys.readouterr().err
    assert not (tmp_path / "scores.json").exists()


def test_meteor_runs_in_one_java_process_that_a_failed_table_replaces(ours):
    from dali import evaluation

    first = evaluation._meteor()
    again = evaluate_captions(CANDIDATES, REFERENCES)
    assert evaluation._meteor() is first and first.meteor_p.poll() is None  # the same java process, still running
    assert again["scores"]["meteor"] == ours["scores"]["meteor"]

    def broken(hypothesis, references):  # the exchange stops half way, with METEOR's lock taken
        raise OSError("broken pipe")

    first._stat = broken
    with pytest.raises(OSError, match="broken pipe"):
        evaluate_captions(CANDIDATES, REFERENCES)
    assert first.meteor_p.wait(timeout=30) is not None and not first.lock.locked()
    after = evaluate_captions(CANDIDATES, REFERENCES)
    assert evaluation._meteor() is not first
    assert after["scores"]["meteor"] == ours["scores"]["meteor"]
