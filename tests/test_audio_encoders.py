"""Audio encoders other than CAV-MAE (``--audio-encoder``): each family built in its real transformers class,
saved in its real format, and taken through alignment, pseudo-labelling, distillation and inference."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import align_flags

from dali import AudioCaptioner
from dali.artifacts import load_align_stage
from dali.flags import ConfigError
from dali.jsonl import read_jsonl
from dali.models.audio_encoders import FAMILIES, load_encoder, new_encoder, pretrained_encoder, save_encoder
from dali.models.checkpoints import CheckpointError
from dali.models.decoding import DecodingOptions
from dali.runs import read_manifest
from dali.stages import align, distill, infer, pseudo_label

# Tokens of a 10.24 s clip for each family at a tiny shape (AST: 16 x 16 patches without overlap here; Whisper:
# the clip's own 20 ms steps; CLAP: its last stage's grid; HuBERT and wav2vec2: 20 ms steps).
TOKENS = {"ast": 512, "whisper": 513, "clap": 1024, "hubert": 512, "wav2vec2": 512}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_makes_tokens_of_the_vision_width_and_saves_exactly(family, tmp_path):
    torch.manual_seed(0)
    encoder = new_encoder(family, 48, 32, 2, 2).eval()
    wave = 0.1 * torch.randn(16_000 * 12)  # longer than a clip: the front end cuts it
    features = encoder.front_end(wave)
    pickle.loads(pickle.dumps(encoder.front_end))  # it runs in loader workers
    with torch.no_grad():
        tokens = encoder.project(torch.stack([features, encoder.front_end(wave[:8000])]))
    assert tokens.shape == (2, TOKENS[family], 48) and torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])  # each clip its own tokens

    save_encoder(encoder, tmp_path / "encoder.safetensors")
    loaded = load_encoder(tmp_path / "encoder.safetensors")
    assert type(loaded.model) is type(encoder.model) and loaded.describe() == encoder.describe()
    with torch.no_grad():
        assert torch.equal(loaded.project(features[None]), encoder.project(features[None]))


def test_pooling_gives_the_asked_token_count(tmp_path):
    encoder = new_encoder("hubert", 48, 32, 1, 2, tokens=64).eval()
    with torch.no_grad():
        assert encoder.project(encoder.front_end(torch.randn(16_000))[None]).shape == (1, 64, 48)
    save_encoder(encoder, tmp_path / "e.safetensors")
    assert load_encoder(tmp_path / "e.safetensors").audio_tokens == 64


def _save_released(family: str, folder):
    """A tiny checkpoint laid out as a released one: the whole model (Whisper and CLAP ship more than their audio
    part) and its feature extractor, through transformers' own ``save_pretrained``."""
    import transformers

    torch.manual_seed(1)
    encoder = new_encoder(family, 48, 32, 2, 2)
    if family == "whisper":
        whole = transformers.WhisperModel(encoder.model.config)
        whole.encoder.load_state_dict(encoder.model.state_dict())
    elif family == "clap":
        config = transformers.ClapConfig(
            audio_config=encoder.model.config.to_dict(),
            text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
            projection_dim=16,
        )
        whole = transformers.ClapModel(config)
        whole.audio_model.load_state_dict(encoder.model.state_dict())
    else:
        whole = encoder.model
    whole.save_pretrained(folder)
    encoder.front_end.extractor.save_pretrained(folder)
    return encoder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_released_checkpoint_loads_with_its_weights_and_front_end(family, tmp_path):
    saved = _save_released(family, tmp_path / "released")
    loaded = pretrained_encoder(family, tmp_path / "released", proj_dim=48)
    assert loaded.model.state_dict().keys() == saved.model.state_dict().keys()
    for key, value in saved.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    wave = 0.1 * torch.randn(16_000 * 3)
    assert torch.equal(loaded.front_end(wave), saved.front_end(wave))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_listing_the_keys(family, tmp_path):
    """A wrong or partial download trained from random weights, with only a transformers warning (silenced)."""
    from safetensors.torch import load_file, save_file

    _save_released(family, tmp_path / "released")
    weights = tmp_path / "released" / "model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    state["stray.weight"] = state.pop(dropped)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not hold the weights its config describes") as caught:
        pretrained_encoder(family, tmp_path / "released", proj_dim=48)
    assert "missing keys" in str(caught.value) and "unexpected keys ['stray.weight']" in str(caught.value)


def test_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load a ast audio encoder from"):
        pretrained_encoder("ast", tmp_path, proj_dim=48)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_goes_through_the_stages(family, synthetic, tmp_path):
    """Alignment (2 steps), pseudo-captions of 8 clips, distillation, audio-only inference of 4 test clips: the
    later stages find the family in the align stage's file, without a flag."""
    world, llava = synthetic
    run = tmp_path / "expe" / "run"
    shape = ["--audio-encoder", family, "--audio-tokens", "32", "--epochs", "1"]
    assert align.main(align_flags(world, llava) + shape + ["--out", str(run / "align")]) == 0
    recorded = read_manifest(run / "align")["metrics"]["audio_encoder"]
    assert recorded["family"] == family and recorded["audio_tokens"] == 32
    encoder = load_align_stage(run / "align", vision_dim=recorded["proj_dim"])
    assert type(encoder.model).__name__ == FAMILIES[family].model

    common = ["--llava", str(llava), "--run", "run", "--expe-dir", str(run.parent), "--num-workers", "0"]
    clips = ["--clips", str(world / "pseudo.json"), "--limit", "8", "--batch-size", "4", "--max-new-tokens", "6"]
    assert pseudo_label.main(common + clips + ["--no-use-prefix"]) == 0
    captions = read_jsonl(run / "pseudo_label" / "pseudo_captions.jsonl")
    assert captions and len(captions) + len(read_jsonl(run / "pseudo_label" / "skipped.jsonl")) == 8
    assert distill.main(common + ["--epochs", "1", "--batch-size", "4"]) == 0
    test = ["--test-list", str(world / "test.csv"), "--audio-dir", str(world / "audio"), "--limit", "4"]
    flags = common + test + ["--projector", "distilled", "--modality", "audio", "--max-new-tokens", "6", "--no-sbert"]
    assert infer.main(flags + ["--no-use-prefix"]) == 0
    predictions = read_jsonl(run / "infer_audio" / "predictions.jsonl")
    assert len(predictions) == 4
    assert json.loads((run / "infer_audio" / "scores.json").read_text())["scores"]
    captioner = AudioCaptioner.from_run(run, decoding=DecodingOptions(max_new_tokens=6))  # `dali caption`, the page
    assert [
        (start, end) for start, end, _ in captioner.caption(0.1 * np.random.randn(16_000 * 12), sample_rate=16_000)
    ] == [(0.0, 10.24), (10.24, 12.0)]


def test_alignment_starts_from_a_released_checkpoint_folder(synthetic, tmp_path):
    world, llava = synthetic
    saved = _save_released("hubert", tmp_path / "released")
    flags = ["--audio-encoder", "hubert", "--init-encoder", str(tmp_path / "released"), "--epochs", "0"]
    assert align.main(align_flags(world, llava) + flags + ["--out", str(tmp_path / "align")]) == 0
    manifest = read_manifest(tmp_path / "align")
    assert manifest["inputs"]["init_encoder"]["config_sha256"]
    aligned = load_align_stage(tmp_path / "align", vision_dim=manifest["metrics"]["audio_encoder"]["proj_dim"])
    for key, value in saved.model.state_dict().items():
        assert torch.equal(aligned.model.state_dict()[key], value), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_runs_pytorchs_fused_attention_where_transformers_has_it(family, tmp_path, monkeypatch):
    """sdpa (flash or memory-efficient kernels on a GPU, in the autocast dtype) built, loaded and released; eager
    only for CLAP, whose HTS-AT transformers runs eagerly."""
    torch.manual_seed(0)
    expected = "eager" if family == "clap" else "sdpa"
    encoder = new_encoder(family, 48, 32, 2, 2).eval()
    save_encoder(encoder, tmp_path / "encoder.safetensors")
    _save_released(family, tmp_path / "released")
    for built in (
        encoder,
        load_encoder(tmp_path / "encoder.safetensors"),
        pretrained_encoder(family, tmp_path / "released", 48),
    ):
        assert built.model.config._attn_implementation == expected
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    with torch.no_grad():
        encoder.project(encoder.front_end(0.1 * torch.randn(16_000))[None])
    assert len(calls) == (0 if family == "clap" else 2)  # once a layer


def _saved_bytes_and_grads(encoder, features):
    """The bytes autograd keeps from the forward, and the parameters' gradients after backward."""
    kept = []

    def keep(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    encoder.zero_grad()
    torch.manual_seed(1)  # the same SpecAugment masks (drawn by numpy) and dropped layers (HuBERT) in both passes
    np.random.seed(1)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = encoder.project(features).square().mean()
    loss.backward()
    return sum(kept), {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["cav-mae", "ast", "hubert", "whisper"])
def test_gradient_checkpointing_gives_the_same_gradients_keeping_less(family):
    from dali.models.cav_mae import CAVMAEAudioEncoder, CAVMAEConfig

    torch.manual_seed(0)
    if family == "cav-mae":
        encoder = CAVMAEAudioEncoder(CAVMAEConfig(embed_dim=32, depth_audio=3, num_heads=2, proj_dim=48))
        features = torch.randn(2, 1024, 128)
    else:
        encoder = new_encoder(family, 48, 32, 3, 2)
        features = torch.stack([encoder.front_end(0.1 * torch.randn(16_000)) for _ in range(2)])
    encoder.train()
    for module in encoder.modules():  # dropout off: the two passes must see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    full, expected = _saved_bytes_and_grads(encoder, features)
    encoder.enable_gradient_checkpointing()
    recomputed, grads = _saved_bytes_and_grads(encoder, features)
    assert recomputed < full / 2
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_of_a_family_without_it_is_a_clear_error(synthetic, tmp_path):
    world, llava = synthetic
    flags = ["--audio-encoder", "clap", "--encoder-dim", "32", "--encoder-depth", "2", "--gradient-checkpointing"]
    message = "--gradient-checkpointing: transformers' ClapAudioModel [(]clap[)] has no gradient checkpointing"
    with pytest.raises(ConfigError, match=message):
        align.main(align_flags(world, llava) + flags + ["--out", str(tmp_path / "align")])
    assert not (tmp_path / "align" / "audio_encoder.safetensors").exists()
