"""The models behind DCASE's model-based metrics (FENSE and the fluency-error rate), read from a folder the user
names and never from the network. ``--metric-models DIR`` holds::

    DIR/paraphrase-TinyBERT-L6-v2/              sentence-BERT (sentence-transformers format): FENSE's similarity
    DIR/echecker_clotho_audiocaps_base.ckpt     the fluency-error detector's weights, as FENSE's authors release them
    DIR/bert-base-uncased/                      the detector's encoder (config, weights, tokenizer), the folder its
                                                checkpoint names (aac-metrics would fetch it from the Hub)
    DIR/clap_sim/                               a CLAP (``ClapModel`` with its processor's files): CLAP-sim

aac-metrics computes the metrics (its own formulas, DCASE's defaults); it is handed these models as objects, so it
opens no connection. The checkpoint is checked against the sha256 its publisher gives and read as weights only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from dali.errors import DaliError
from dali.files import file_sha256

FENSE_SBERT = "paraphrase-TinyBERT-L6-v2"
ECHECKER = "echecker_clotho_audiocaps_base"
ECHECKER_FILE = f"{ECHECKER}.ckpt"
ERROR_THRESHOLD = 0.9  # a caption is disfluent when the detector's "error" probability passes this (DCASE's)
FLUENCY_PENALTY = 0.9  # FENSE = SBERT-sim x (1 - penalty x disfluent) (DCASE's)


class MetricModelsError(DaliError, ValueError):
    """A metric model file is not the one its publisher released, or not a safe checkpoint."""


def published_checksums() -> dict[str, str]:
    """The sha256 each publisher gives: the detector's, as aac-metrics records it (a private table of its module:
    aac-metrics has no public one)."""
    import importlib

    fer = importlib.import_module("aac_metrics.functional.fer")  # the module (the package exports a function so named)
    return {ECHECKER_FILE: fer._PRETRAIN_ECHECKERS_DICT[ECHECKER][1]}


def needed_files() -> list[tuple[str, str, str | None]]:
    """(path under --metric-models, what it is, its published sha256 or None), for ``--list-metric-models``."""
    checksums = published_checksums()
    return [
        (f"{FENSE_SBERT}/", "FENSE's sentence-BERT (sentence-transformers format)", None),
        (ECHECKER_FILE, "FENSE's fluency-error detector (released by FENSE's authors)", checksums[ECHECKER_FILE]),
        ("bert-base-uncased/", "the detector's encoder: config, weights and tokenizer (transformers format)", None),
        (f"{CLAP}/", "CLAP-sim's ClapModel, feature extractor and tokenizer (transformers format)", None),
    ]


def unavailable_reason(folder: Path | None) -> str | None:
    """Why FENSE cannot be computed from ``folder`` (None: it can)."""
    if folder is None:
        return "no --metric-models folder (FENSE needs a sentence-BERT, the error detector and its encoder)"
    missing = [name for name in (FENSE_SBERT, ECHECKER_FILE) if not (Path(folder) / name).exists()]
    return f"--metric-models '{folder}' lacks {missing}" if missing else None


@dataclass
class FenseModels:
    sbert: Any  # sentence_transformers.SentenceTransformer
    echecker: Any  # aac_metrics' BERTFlatClassifier
    tokenizer: Any


def load_fense_models(folder: str | Path, checksums: Mapping[str, str] | None = None) -> FenseModels:
    """FENSE's models from ``folder``; the detector's checkpoint must have the published sha256 (``checksums``:
    another table, for tests) and hold only tensors, numbers and strings."""
    from aac_metrics.functional.fer import BERTFlatClassifier
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from dali.limits import MAX_ENCODER_PARAMETERS
    from dali.models.checkpoints import check_folder_fits

    folder = Path(folder)
    state = _checkpoint(folder / ECHECKER_FILE, published_checksums() if checksums is None else checksums)
    encoder = folder / Path(state["model_type"]).name  # a folder name only: the checkpoint names no path
    if not (encoder / "config.json").is_file():
        raise MetricModelsError(f"--metric-models: the error detector's encoder '{encoder}' is not a model folder")
    check_folder_fits(AutoModel, encoder, "the fluency-error detector's encoder", MAX_ENCODER_PARAMETERS)
    for transformer in _sbert_transformers(folder / FENSE_SBERT):
        check_folder_fits(AutoModel, transformer, "FENSE's sentence-BERT", MAX_ENCODER_PARAMETERS)
    echecker = BERTFlatClassifier(model_type=str(encoder), num_classes=int(state["num_classes"]))
    weights = dict(state["state_dict"])
    weights.pop("encoder.embeddings.position_ids", None)  # a buffer older transformers saved, as aac-metrics drops it
    echecker.load_state_dict(weights)
    sbert = SentenceTransformer(str(folder / FENSE_SBERT), device="cpu")
    return FenseModels(sbert, echecker.eval(), AutoTokenizer.from_pretrained(str(encoder)))


def _sbert_transformers(folder: Path) -> list[Path]:
    """The folders of a sentence-transformers model's transformer modules, as its ``modules.json`` lists them (each
    is checked before sentence-transformers builds it)."""
    import json

    listing = folder / "modules.json"
    try:
        if listing.stat().st_size > 1 << 20:  # a list of a few modules
            raise ValueError("over 1 MiB")
        modules = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MetricModelsError(f"--metric-models: '{listing}' is unreadable ({str(error)[:200]})") from None
    listed = isinstance(modules, list) and all(isinstance(m, dict) and isinstance(m.get("path"), str) for m in modules)
    if not listed:
        raise MetricModelsError(f"--metric-models: '{listing}' is not a sentence-transformers module list")
    found = [folder / m["path"] for m in modules if str(m.get("type", "")).endswith(".Transformer")]
    outside = [str(path) for path in found if not path.resolve().is_relative_to(folder.resolve())]
    if outside or not found:
        raise MetricModelsError(f"--metric-models: '{listing}' names no transformer inside its folder")
    return found


def load_or_reason(folder: str | Path | None) -> FenseModels | str:
    """FENSE's models from ``--metric-models`` when it holds them, else why not (its metrics are then listed as
    unavailable, as SPICE is without its jars)."""
    reason = unavailable_reason(Path(folder) if folder else None)
    return reason if reason else load_fense_models(folder)


def _checkpoint(path: Path, checksums: Mapping[str, str]) -> dict:
    import torch

    from dali.models.checkpoints import check_torch_archive

    expected = checksums.get(path.name)
    if expected and file_sha256(path) != expected:
        raise MetricModelsError(f"--metric-models: '{path}' is not the published file (its sha256 differs)")
    try:
        check_torch_archive(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError for a file it refuses
        raise MetricModelsError(
            f"--metric-models: '{path}' is not a weights-only checkpoint: {str(error).splitlines()[0][:200]}"
        ) from None
    if not (isinstance(state, dict) and {"model_type", "num_classes", "state_dict"} <= set(state)):
        raise MetricModelsError(f"--metric-models: '{path}' is not an error-detector checkpoint")
    return state


def fense_scores(
    models: FenseModels, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus FENSE, its fluency-error rate and its unpenalised similarity, and each clip's, by aac-metrics."""
    from aac_metrics.functional.fense import fense

    corpus, clips = fense(
        list(predictions), [list(group) for group in references], sbert_model=models.sbert,
        echecker=models.echecker, echecker_tokenizer=models.tokenizer, error_threshold=ERROR_THRESHOLD,
        penalty=FLUENCY_PENALTY, device="cpu",
    )  # fmt: skip
    names = {"fense": "fense", "fer": "fluency_error_rate", "sbert_sim": "fense_sbert_sim"}
    scores = {ours: float(corpus[theirs]) for theirs, ours in names.items()}
    per_clip = [{ours: float(clips[theirs][i]) for theirs, ours in names.items()} for i in range(len(predictions))]
    return scores, per_clip


SETTINGS = {"sbert": FENSE_SBERT, "error_detector": ECHECKER, "error_threshold": ERROR_THRESHOLD}
SETTINGS |= {"fluency_penalty": FLUENCY_PENALTY}  # what "fense" means in scores.json: DCASE's FENSE


CLAP = "clap_sim"  # DIR/clap_sim/: CLAP-sim's ClapModel with its feature extractor and tokenizer (transformers format)
CLAP_RATE = 48_000


@dataclass
class ClapModels:
    model: Any  # transformers.ClapModel
    extractor: Any  # its ClapFeatureExtractor
    tokenizer: Any


def load_clap(folder: str | Path | None) -> ClapModels | str:
    """CLAP from ``--metric-models``'s ``clap_sim/`` folder (bounded and loaded strictly, as every model here), else why
    not (CLAP-sim is then listed as unavailable)."""
    clap = Path(folder) / CLAP if folder else None
    if clap is None or not (clap / "config.json").is_file():
        return f"no CLAP model: --metric-models {'DIR' if folder is None else repr(str(folder))} lacks {CLAP}/"
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    from dali.limits import MAX_ENCODER_PARAMETERS
    from dali.models.checkpoints import check_folder_fits, strict_from_pretrained

    check_folder_fits(ClapModel, clap, "the CLAP model of CLAP-sim", MAX_ENCODER_PARAMETERS)
    model = strict_from_pretrained(ClapModel, clap, "the CLAP model of CLAP-sim").eval()
    extractor = ClapFeatureExtractor.from_pretrained(str(clap))
    if not model.config.audio_config.enable_fusion:  # the fused front end needs a model built for it
        extractor.truncation = "rand_trunc"  # (never a random crop here: waves are cut to the window first)
    return ClapModels(model, extractor, AutoTokenizer.from_pretrained(str(clap)))


def clap_similarity(clap: ClapModels, waves: Sequence[Any], captions: Sequence[str]) -> list[float]:
    """Each clip's cosine similarity of CLAP's audio embedding (its 16 kHz wave, at 48 kHz, cut to the model's
    window so no random crop is taken) and its caption's text embedding."""
    import torch

    from dali.audio import resample
    from dali.constants import SAMPLE_RATE

    window = clap.extractor.nb_max_samples
    audio = [resample(wave, SAMPLE_RATE, CLAP_RATE)[:window] for wave in waves]
    with torch.no_grad():
        features = clap.extractor(audio, sampling_rate=CLAP_RATE, return_tensors="pt")
        audio_embedding = _embedding(clap.model.get_audio_features(**features))
        text = clap.tokenizer(list(captions), padding=True, return_tensors="pt")
        text_embedding = _embedding(clap.model.get_text_features(**text))
    return torch.nn.functional.cosine_similarity(audio_embedding, text_embedding).tolist()


def _embedding(output: Any):
    return output.pooler_output if hasattr(output, "pooler_output") else output
