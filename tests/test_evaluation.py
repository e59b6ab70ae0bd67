from pathlib import Path

import pytest

from dali.evaluation import evaluate_captions, markdown_table

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
        metrics=list(METRICS),
        cache_path=str(tmp_path),
    )
    subset = evaluate_captions(
        {i: CANDIDATES[i] for i in ids if CANDIDATES[i]},
        {i: REFERENCES[i] for i in ids if CANDIDATES[i]},
        use_sbert=False,
    )
    for metric in METRICS:
        assert subset["scores"][metric] == pytest.approx(float(theirs[metric]), abs=1e-9), metric
    assert ours["num_clips"] == 5  # an empty prediction is scored, not dropped


def test_sbert_and_unavailable_metrics(ours):
    assert 0 < ours["scores"]["sbert_sim"] < 1
    assert "spice" in ours["unavailable"] and "spider" in ours["unavailable"]
    table = markdown_table([("run", ours["scores"])])
    assert "SBERT-sim (all-MiniLM-L6-v2)" in table and "| run |" in table


def test_missing_predictions_and_empty_references_are_errors():
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_captions({"a": "x"}, {"a": ["y"], "b": ["z"]}, use_sbert=False)
    with pytest.raises(ValueError, match="empty reference"):
        evaluate_captions({"a": "x"}, {"a": [" "]}, use_sbert=False)
