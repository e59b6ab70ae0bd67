"""DCASE's model-based metrics (#44): FENSE and the fluency-error rate from a folder of models the user names, on tiny
models of the real classes saved in the real formats; nothing from the network."""

import pickle
import socket
import zipfile

import pytest
import torch

from dali.evaluation import _normalised, _tokenized, evaluate_captions
from dali.files import file_sha256
from dali.metric_models import ECHECKER_FILE, FENSE_SBERT, MetricModelsError, load_fense_models, load_or_reason

CANDIDATES = {"a": "a dog barks twice", "b": "a bell rings", "c": "water flows then a bird sings", "d": ""}
REFERENCES = {
    "a": ["a dog barks", "dog barking loudly"],
    "b": ["a bell rings once", "bells ring"],
    "c": ["a stream trickles then a bird chirps", "water flows and a bird sings"],
    "d": ["wind blows"],
}


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """A --metric-models folder of tiny models: a BERT (the detector's encoder, with its tokenizer), the detector's
    checkpoint as FENSE's authors save it, and a sentence-BERT in sentence-transformers' format."""
    from aac_metrics.functional.fer import BERTFlatClassifier
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("metric_models")
    encoder = folder / "bert-base-uncased"
    words = sorted({w for text in [*CANDIDATES.values(), *sum(REFERENCES.values(), [])] for w in text.split()})
    encoder.mkdir()
    (encoder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(encoder / "vocab.txt")).save_pretrained(encoder)
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    BertModel(BertConfig(vocab_size=5 + len(words), **shape)).save_pretrained(encoder)
    checker = BERTFlatClassifier(model_type=str(encoder), num_classes=6).eval()
    with torch.no_grad():  # the 0.9 threshold of the "error" class placed amid the captions: half are penalised
        batch = BertTokenizerFast.from_pretrained(encoder)(list(CANDIDATES.values()), padding=True, return_tensors="pt")
        checker.clf.weight[5] *= 100.0  # a tiny random BERT's sentences differ little
        logits = checker(**batch)[:, 5] - checker.clf.bias[5]
        checker.clf.bias[5] = torch.log(torch.tensor(9.0)) - logits.median()
    state = {"model_type": "bert-base-uncased", "num_classes": 6, "state_dict": checker.state_dict()}
    torch.save(state, folder / ECHECKER_FILE)
    word = models.Transformer(str(encoder))
    SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension())]).save(str(folder / FENSE_SBERT))
    return folder, {ECHECKER_FILE: file_sha256(folder / ECHECKER_FILE)}


def test_fense_equals_aac_metrics_own_on_the_same_models(metric_models):
    from aac_metrics.functional.fense import fense
    from aac_metrics.functional.fer import BERTFlatClassifier
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    folder, checksums = metric_models
    ours = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=False, fense_models=load_fense_models(folder, checksums)
    )
    # aac-metrics' own loading of the same files (its checkpoint reader, minus the download), on the same captions
    checker = BERTFlatClassifier(model_type=str(folder / "bert-base-uncased"), num_classes=6)
    weights = torch.load(folder / ECHECKER_FILE)["state_dict"]
    weights.pop("encoder.embeddings.position_ids", None)
    checker.load_state_dict(weights)
    ids, predictions, references = _normalised(CANDIDATES, REFERENCES)
    gts, res = _tokenized(ids, predictions, references)
    candidates = [res[i][0] if res[i][0] != "<empty>" else "" for i in range(len(ids))]
    theirs, clips = fense(
        candidates,
        [gts[i] for i in range(len(ids))],
        sbert_model=SentenceTransformer(str(folder / FENSE_SBERT), device="cpu"),
        echecker=checker.eval(),
        echecker_tokenizer=AutoTokenizer.from_pretrained(str(folder / "bert-base-uncased")),
        device="cpu",
    )
    assert ours["scores"]["fense"] == pytest.approx(float(theirs["fense"]), abs=1e-6)
    assert ours["scores"]["fluency_error_rate"] == pytest.approx(float(theirs["fer"]), abs=1e-6)
    assert ours["scores"]["fense_sbert_sim"] == pytest.approx(float(theirs["sbert_sim"]), abs=1e-6)
    assert 0 < ours["scores"]["fluency_error_rate"] < 1  # the penalty is exercised on some captions, not all
    per_clip = [ours["per_clip"][clip_id]["fense"] for clip_id in ids]
    assert per_clip == pytest.approx(clips["fense"].tolist(), abs=1e-6)
    settings = ours["metric_settings"]["fense"]
    assert settings["sbert"] == FENSE_SBERT and settings["fluency_penalty"] == 0.9  # never a mislabelled FENSE
    assert "fense" not in ours["unavailable"]


def test_a_detector_that_is_not_the_published_file_is_refused(metric_models):
    folder, _ = metric_models
    with pytest.raises(MetricModelsError, match="not the published file"):
        load_fense_models(folder)  # the published sha256 of the real checkpoint


@pytest.mark.parametrize("model", ["bert-base-uncased", FENSE_SBERT])
def test_a_metric_model_folder_whose_config_declares_a_huge_model_is_refused_before_it_is_built(
    metric_models, tmp_path, model
):
    """Both transformers folders (the detector's encoder, sentence-BERT's transformer) are bounded as every model
    folder is (#40): what config.json declares is checked on the meta device against the weights and the bound."""
    import json
    import shutil

    from test_bounds import _probe

    folder, checksums = metric_models
    copy = tmp_path / "metric_models"
    shutil.copytree(folder, copy)
    config = json.loads((copy / model / "config.json").read_text())
    config.update(hidden_size=8_192, num_hidden_layers=128, intermediate_size=32_768, num_attention_heads=64)
    (copy / model / "config.json").write_text(json.dumps(config))
    printed, peak = _probe(
        f"from dali.metric_models import load_fense_models; load_fense_models({str(copy)!r}, {checksums!r})"
    )
    assert printed.startswith("CheckpointError") and "parameters; its weight files hold" in printed, printed
    assert f"{model}/config.json" in printed
    assert peak < 2_000, peak


def test_a_sentence_bert_whose_module_list_points_outside_its_folder_is_refused(metric_models, tmp_path):
    import json
    import shutil

    folder, checksums = metric_models
    copy = tmp_path / "metric_models"
    shutil.copytree(folder, copy)
    listing = copy / FENSE_SBERT / "modules.json"
    modules = json.loads(listing.read_text())
    listing.write_text(json.dumps([dict(m, path="../bert-base-uncased") if m["path"] == "" else m for m in modules]))
    with pytest.raises(MetricModelsError, match="names no transformer inside its folder"):
        load_fense_models(copy, checksums)
    listing.write_text("[{")
    with pytest.raises(MetricModelsError, match="modules.json' is unreadable"):
        load_fense_models(copy, checksums)


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/dali_unpickled_marker", "w"))


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(metric_models, tmp_path):
    folder, _ = metric_models
    bad = tmp_path / "models"
    bad.mkdir()
    for item in folder.iterdir():
        (bad / item.name).symlink_to(item)
    (bad / ECHECKER_FILE).unlink()
    with zipfile.ZipFile(bad / ECHECKER_FILE, "w", zipfile.ZIP_STORED) as archive:  # torch's layout, a pickle inside
        archive.writestr("archive/data.pkl", pickle.dumps({"model_type": Payload()}))
        archive.writestr("archive/version", "3\n")
    marker = "/tmp/dali_unpickled_marker"
    with pytest.raises(MetricModelsError, match=ECHECKER_FILE):
        load_fense_models(bad, {})
    assert not __import__("os").path.exists(marker)


def test_no_metric_model_opens_a_connection(metric_models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a metric opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    folder, checksums = metric_models
    result = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=False, fense_models=load_fense_models(folder, checksums)
    )
    assert "fense" in result["scores"]


def test_without_the_folder_fense_is_unavailable_with_its_reason(tmp_path):
    reason = load_or_reason(None)
    assert isinstance(reason, str) and "--metric-models" in reason
    assert "lacks" in load_or_reason(tmp_path)
    result = evaluate_captions(CANDIDATES, REFERENCES, use_sbert=False, use_spice=False)
    assert "bleu_4" in result["scores"] and "fense" not in result["scores"]
    assert result["unavailable"]["fense"] == result["unavailable"]["fluency_error_rate"] == reason


def test_spider_fl_is_aac_metrics_formula():
    """DCASE 2023's SPIDEr-FL from each clip's SPIDEr and fluency verdict, as aac-metrics combines them."""
    from aac_metrics.functional.spider_fl import _spider_fl_from_outputs

    from dali.evaluation import spider_fl

    generator = torch.Generator().manual_seed(0)
    spider = torch.rand(7, generator=generator, dtype=torch.float64)
    disfluent = (torch.rand(7, generator=generator) > 0.5).double()
    theirs, _ = _spider_fl_from_outputs(({}, {"spider": spider}), ({}, {"fer": disfluent}))
    assert spider_fl(spider.tolist(), disfluent.tolist()) == pytest.approx(float(theirs["spider_fl"]), abs=1e-12)


def test_spider_fl_is_scored_where_spice_runs_else_says_why(metric_models):
    from dali.evaluation import spice_unavailable_reason

    folder, checksums = metric_models
    result = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=True, fense_models=load_fense_models(folder, checksums)
    )
    if spice_unavailable_reason() is None:
        clips = result["per_clip"].values()
        expected = sum(c["spider"] * (1 - 0.9 * c["fluency_error_rate"]) for c in clips) / len(clips)
        assert result["scores"]["spider_fl"] == pytest.approx(expected)
    else:
        assert "spider_fl" not in result["scores"] and "SPIDEr is unavailable" in result["unavailable"]["spider_fl"]


def test_evaluate_lists_the_metric_models_and_checks_a_folder(metric_models, capsys):
    from dali.tools import evaluate

    folder, _ = metric_models
    assert evaluate.main(["--list-metric-models", "--metric-models", str(folder)]) == 0
    text = capsys.readouterr().out
    assert ECHECKER_FILE in text and FENSE_SBERT in text and "bert-base-uncased/" in text
    assert text.count("MISSING") == 1 and "sha256 " in text  # FENSE's files there (not CLAP); the detector's hash
    assert evaluate.main(["--list-metric-models", "--metric-models", str(folder / "nowhere")]) == 0
    assert capsys.readouterr().out.count("MISSING") == 4


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
    """--metric-models with clap_sim/: a tiny random ClapModel, its feature extractor and a byte-level BPE tokenizer
    (RoBERTa's kind, as CLAP's), saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizerFast

    from dali.models.audio_encoders import new_encoder

    folder = tmp_path_factory.mktemp("clap_models")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([*CANDIDATES.values(), *sum(REFERENCES.values(), [])], trainer)
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    torch.manual_seed(2)
    audio = new_encoder("clap", 16, 32, 2, 2).model.config
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = ClapConfig(
        audio_config=audio.to_dict(), text_config=text | {"vocab_size": len(tokenizer)}, projection_dim=16
    )
    ClapModel(config).save_pretrained(folder / "clap_sim")
    ClapFeatureExtractor().save_pretrained(folder / "clap_sim")
    tokenizer.save_pretrained(folder / "clap_sim")
    return folder


def test_clap_sim_equals_a_direct_computation_with_transformers(clap_folder, write_wav, tmp_path):
    import soundfile
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    from dali.audio import resample
    from dali.metric_models import load_clap

    audio = {clip_id: write_wav(f"{clip_id}.wav", seconds=1.0 + i) for i, clip_id in enumerate(CANDIDATES)}
    result = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=False, clap_models=load_clap(clap_folder), audio=audio
    )
    model = ClapModel.from_pretrained(clap_folder / "clap_sim").eval()
    extractor = ClapFeatureExtractor.from_pretrained(clap_folder / "clap_sim")
    tokenizer = AutoTokenizer.from_pretrained(clap_folder / "clap_sim")
    expected = []
    for clip_id, caption in CANDIDATES.items():
        wave, rate = soundfile.read(audio[clip_id], dtype="float32")
        with torch.no_grad():
            features = extractor(
                [resample(wave, rate, 48_000)], sampling_rate=48_000, return_tensors="pt", truncation="rand_trunc"
            )
            sound = model.get_audio_features(**features).pooler_output
            words = model.get_text_features(**tokenizer([caption], return_tensors="pt")).pooler_output
        expected.append(float(torch.nn.functional.cosine_similarity(sound, words)[0]))
    ours = [result["per_clip"][clip_id]["clap_sim"] for clip_id in CANDIDATES]
    assert ours == pytest.approx(expected, abs=1e-5)
    assert result["scores"]["clap_sim"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_clap_sim_lists_unread_audio_and_is_unavailable_without_model_or_audio(clap_folder, write_wav, tmp_path):
    from dali.metric_models import load_clap

    audio = {"a": write_wav("a.wav"), "b": tmp_path / "missing.wav", "c": write_wav("c.wav"), "d": write_wav("d.wav")}
    result = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=False, clap_models=load_clap(clap_folder), audio=audio
    )
    assert [entry["id"] for entry in result["clap_sim_unread"]] == ["b"] and "clap_sim" not in result["per_clip"]["b"]
    without = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=False, clap_models=load_clap(tmp_path)
    )
    assert "lacks clap_sim/" in without["unavailable"]["clap_sim"]
    no_audio = evaluate_captions(
        CANDIDATES, REFERENCES, use_sbert=False, use_spice=False, clap_models=load_clap(clap_folder)
    )
    assert "--audio-dir" in no_audio["unavailable"]["clap_sim"]
