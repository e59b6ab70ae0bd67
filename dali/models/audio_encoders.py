"""Audio encoders beyond CAV-MAE: pretrained audio transformers of transformers, each behind its own front end
(its feature extractor) and a trained linear ``proj`` into the vision tower's width, as CAV-MAE's.

Every family maps a clip (16 kHz, cut or padded to the samples of ``target_frames`` CAV-MAE frames: 10.24 s by
default) to N tokens of width D:

=========  ==========================  ================================================  =======================
family     model                       front end -> input                                tokens (10.24 s clip)
=========  ==========================  ================================================  =======================
ast        ``ASTModel``                ``ASTFeatureExtractor``: fbank [1024, 128]        patch tokens (CLS and
                                                                                          distillation dropped)
whisper    Whisper's encoder            ``WhisperFeatureExtractor``: log-mel [80, 3000]   the first 513 (the clip's
                                        (30 s, zero-padded)                               own 20 ms steps)
clap       ``ClapAudioModel`` (HTS-AT)  ``ClapFeatureExtractor`` at 48 kHz                the last stage's grid
hubert     ``HubertModel``              ``Wav2Vec2FeatureExtractor``: the normalised wave 512 (20 ms steps)
wav2vec2   ``Wav2Vec2Model``            ``Wav2Vec2FeatureExtractor``                      512
=========  ==========================  ================================================  =======================

``--audio-tokens K`` average-pools the token sequence to K tokens (neighbours in the family's token order). The
saved file carries the family, the model's config, the feature extractor's and the pooling in its metadata, so the
stages after alignment rebuild it without flags or downloads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dali.audio import SAMPLE_RATE, fit_wave, resample, samples_for_frames
from dali.constants import AUDIO_ENCODERS, TARGET_FRAMES
from dali.limits import MAX_ENCODER_PARAMETERS
from dali.models.cav_mae import audio_encoder_from_state, load_audio_encoder, save_audio_encoder
from dali.models.checkpoints import (
    CheckpointError,
    check_described_model,
    check_described_structure,
    check_folder_fits,
    header_shapes,
    read_metadata,
    read_state_dict,
    strict_from_pretrained,
)

ENCODER_METADATA_KEY = "dali.audio_encoder"


class AudioEncoder(Protocol):
    """What every audio encoder gives the stages (CAV-MAE, :class:`TransformersAudioEncoder`): the loaders return
    it, and callers need probe for nothing."""

    front_end: Callable[[torch.Tensor], torch.Tensor] | None  # a clip's wave -> its features; None: CAV-MAE's fbank
    target_frames: int  # the clip length it takes, in CAV-MAE frames
    output_dim: int  # its tokens' width (the vision tower's)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[B, ...] features -> [B, N, output_dim] tokens."""

    def describe(self) -> dict:
        """What rebuilds it (saved with its weights and in the align stage's manifest)."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in backward instead of keeping its activations."""


def _hidden_size(config) -> int:
    return config.hidden_size


def _all_steps(hidden: torch.Tensor, encoder: "TransformersAudioEncoder") -> torch.Tensor:
    return hidden


def _transformer_shape(dim: int, depth: int, heads: int, target_frames: int) -> dict:
    return {"hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads, "intermediate_size": dim * 4}


@dataclass(frozen=True)
class Family:
    """How one transformers audio model becomes a DALI audio encoder: one row of :data:`FAMILIES`."""

    config: str  # transformers config class of the audio model
    model: str  # transformers model class of the audio model
    feature_extractor: str
    input_name: str  # the model's keyword for the front end's output
    output_key: str  # the feature extractor's key of that output
    sample_rate: int = SAMPLE_RATE
    whole: str | None = None  # the class of a released checkpoint holding more than the audio model ...
    audio_part: str | None = None  # ... and the attribute that holds it
    width: Callable[[Any], int] = _hidden_size  # the model's output width, from its config
    tokens: Callable[[torch.Tensor, Any], torch.Tensor] = _all_steps  # last hidden state -> the clip's tokens
    tiny_shape: Callable[[int, int, int, int], dict] = _transformer_shape  # (dim, depth, heads, frames) -> config
    extractor_args: Callable[[int], dict] = lambda target_frames: {}  # a new feature extractor's, by frames
    pinned: tuple[tuple[str, Any], ...] = ()  # extractor settings a released one is given too
    time_major: bool = False  # features [frames, bins], as CAV-MAE's fbank: its augmentation applies (AST)
    one_window: bool = False  # the front end sees at most the extractor's window (``nb_max_samples``)


def _ast_shape(dim: int, depth: int, heads: int, target_frames: int) -> dict:
    # AST's patches do not overlap here, to keep the token count down
    return _transformer_shape(dim, depth, heads, target_frames) | {
        "max_length": target_frames, "frequency_stride": 16, "time_stride": 16,
    }  # fmt: skip


def _whisper_shape(dim: int, depth: int, heads: int, target_frames: int) -> dict:
    shape = {"d_model": dim, "encoder_layers": depth, "encoder_attention_heads": heads, "encoder_ffn_dim": dim * 4}
    return shape | {"decoder_layers": 1, "decoder_attention_heads": heads, "decoder_ffn_dim": dim * 4}  # (unused)


def _whisper_clip_steps(hidden: torch.Tensor, encoder: "TransformersAudioEncoder") -> torch.Tensor:
    """The steps of the clip itself, not of the padding to 30 s (the second convolution has stride 2)."""
    hop = encoder.front_end.extractor.hop_length * 2
    return hidden[:, : math.ceil(samples_for_frames(encoder.target_frames) / hop)]


def _clap_shape(dim: int, depth: int, heads: int, target_frames: int) -> dict:
    # ``depth`` stages of one block; the last one ``dim`` wide
    shape = {"patch_embeds_hidden_size": dim // 2 ** (depth - 1), "depths": [1] * depth, "window_size": 8}
    return shape | {"num_attention_heads": [heads] * depth, "hidden_size": dim}


def _clap_width(config) -> int:
    return config.patch_embeds_hidden_size * 2 ** (len(config.depths) - 1)  # HTS-AT doubles its channels per stage


def _wave_shape(dim: int, depth: int, heads: int, target_frames: int) -> dict:
    return _transformer_shape(dim, depth, heads, target_frames) | {
        "conv_dim": (dim,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": heads,
    }  # fmt: skip


CLAP_WINDOW = (("truncation", "rand_trunc"), ("padding", "repeatpad"))  # a fixed window, never the fused front end
WAVE_EXTRACTOR = {"do_normalize": True, "return_attention_mask": False}
FAMILIES = {
    "ast": Family(
        "ASTConfig", "ASTModel", "ASTFeatureExtractor", "input_values", "input_values",
        tokens=lambda hidden, encoder: hidden[:, 2:],  # CLS and distillation tokens dropped
        tiny_shape=_ast_shape, extractor_args=lambda target_frames: {"max_length": target_frames}, time_major=True,
    ),
    "whisper": Family(
        "WhisperConfig", "WhisperEncoder", "WhisperFeatureExtractor", "input_features", "input_features",
        whole="WhisperModel", audio_part="encoder",
        width=lambda config: config.d_model, tokens=_whisper_clip_steps, tiny_shape=_whisper_shape,
    ),
    "clap": Family(
        "ClapAudioConfig", "ClapAudioModel", "ClapFeatureExtractor", "input_features", "input_features", 48_000,
        whole="ClapModel", audio_part="audio_model",
        width=_clap_width, tokens=lambda hidden, encoder: hidden.flatten(2).transpose(1, 2),  # [B,C,F,T] -> [B,FT,C]
        tiny_shape=_clap_shape, extractor_args=lambda target_frames: dict(CLAP_WINDOW), pinned=CLAP_WINDOW,
        one_window=True,  # longer clips would be cut at a random place
    ),
    "hubert": Family(
        "HubertConfig", "HubertModel", "Wav2Vec2FeatureExtractor", "input_values", "input_values",
        tiny_shape=_wave_shape, extractor_args=lambda target_frames: dict(WAVE_EXTRACTOR),
    ),
    "wav2vec2": Family(
        "Wav2Vec2Config", "Wav2Vec2Model", "Wav2Vec2FeatureExtractor", "input_values", "input_values",
        tiny_shape=_wave_shape, extractor_args=lambda target_frames: dict(WAVE_EXTRACTOR),
    ),
}  # fmt: skip
assert AUDIO_ENCODERS == ("cav-mae", *FAMILIES)


def attention_of(model_class) -> str:
    """The attention a family's model runs: PyTorch's fused ``scaled_dot_product_attention`` (flash or
    memory-efficient kernels on a GPU, in the autocast dtype; never a materialised [B, heads, N, N] score matrix),
    or eager where transformers has no sdpa path for the model (CLAP's HTS-AT)."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _model_from_config(spec: Family, config) -> nn.Module:
    model_class = hf_class(spec.model)
    return model_class._from_config(config, attn_implementation=attention_of(model_class))


def hf_class(name: str):
    """A transformers class by name (Whisper's encoder is not exported at the top level)."""
    import transformers

    if name == "WhisperEncoder":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder
    return getattr(transformers, name)


class FrontEnd:
    """A family's feature extractor on one clip (picklable: it runs in the loader workers).

    ``__call__(wave [samples] at 16 kHz) -> features`` (the model's input for one clip, without batch axis).
    ``time_major``: the features are [frames, bins] as CAV-MAE's fbank, so the original's noise and time roll
    apply to them (AST); the other families are trained without that augmentation.
    """

    def __init__(self, family: str, extractor, target_frames: int):
        self.family, self.extractor, self.target_frames = family, extractor, target_frames
        self.time_major = FAMILIES[family].time_major

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        wave = fit_wave(wave, samples_for_frames(self.target_frames)).numpy().astype(np.float32)
        spec = FAMILIES[self.family]
        if spec.sample_rate != SAMPLE_RATE:
            wave = resample(wave, SAMPLE_RATE, spec.sample_rate)
        if spec.one_window:
            wave = wave[: self.extractor.nb_max_samples]
        out = self.extractor(wave, sampling_rate=spec.sample_rate, return_tensors="pt")
        return out[spec.output_key][0].float()


class TransformersAudioEncoder(nn.Module):
    """A transformers audio model + DALI's ``proj``.

    ``forward(features [B, ...]) -> [B, N, D]``; ``project(features) -> [B, N, proj_dim]`` (the tokens that stand
    in for the vision tower's patch tokens).
    """

    def __init__(self, family: str, model: nn.Module, extractor, proj_dim: int, target_frames: int, tokens=None):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown audio encoder family '{family}' (one of {sorted(FAMILIES)})")
        self.family, self.model, self.audio_tokens = family, model, tokens
        self.front_end = FrontEnd(family, extractor, target_frames)
        self.proj = nn.Linear(self.width, proj_dim)

    @property
    def width(self) -> int:
        return FAMILIES[self.family].width(self.model.config)

    @property
    def output_dim(self) -> int:
        return self.proj.out_features

    @property
    def target_frames(self) -> int:
        return self.front_end.target_frames

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        spec = FAMILIES[self.family]
        features = features.to(self.proj.weight.dtype)
        hidden = spec.tokens(self.model(**{spec.input_name: features}).last_hidden_state, self)
        if self.audio_tokens:
            hidden = F.adaptive_avg_pool1d(hidden.transpose(1, 2), self.audio_tokens).transpose(1, 2)
        return hidden

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Audio tokens in the image-token space: [B, ...] -> [B, N, proj_dim]."""
        return self.proj(self(features))

    def enable_gradient_checkpointing(self) -> None:
        """transformers' own checkpointing of the model's layers (non-reentrant: it composes with torch.compile)."""
        if not self.model.supports_gradient_checkpointing:
            raise ValueError(f"transformers' {type(self.model).__name__} ({self.family}) has no gradient checkpointing")
        self.model.activation_checkpointing_enable({"use_reentrant": False})

    def describe(self) -> dict:
        """What rebuilds this encoder (saved with its weights, and in the align stage's manifest)."""
        return {
            "family": self.family,
            "config": self.model.config.to_dict(),
            "feature_extractor": self.front_end.extractor.to_dict(),
            "proj_dim": self.output_dim,
            "target_frames": self.target_frames,
            "audio_tokens": self.audio_tokens,
        }


def new_encoder(
    family: str, proj_dim: int, dim: int, depth: int, heads: int, target_frames: int = TARGET_FRAMES, tokens=None
) -> TransformersAudioEncoder:
    """A randomly initialised encoder of the family at a given width, depth and head count (the rest of the config
    is the family's default, shaped by its row's ``tiny_shape``)."""
    spec = FAMILIES[family]
    config = hf_class(spec.config)(**spec.tiny_shape(dim, depth, heads, target_frames))
    extractor = hf_class(spec.feature_extractor)(**spec.extractor_args(target_frames))
    return TransformersAudioEncoder(
        family, _model_from_config(spec, config), extractor, proj_dim, target_frames, tokens
    )


def pretrained_encoder(
    family: str, folder: str | Path, proj_dim: int, target_frames: int = TARGET_FRAMES, tokens=None
) -> TransformersAudioEncoder:
    """A released checkpoint saved in Hugging Face format (``config.json``, weights, ``preprocessor_config.json``),
    with a fresh ``proj``; a whole Whisper or CLAP checkpoint gives its audio part."""
    spec = FAMILIES[family]
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        whole = spec.whole is not None and config.get("model_type") == family  # the whole model's type
        what = f"a {family} audio encoder"
        check_folder_fits(hf_class(spec.whole if whole else spec.model), folder, what, MAX_ENCODER_PARAMETERS)
        attention = attention_of(hf_class(spec.model))
        if whole:
            whole_model = strict_from_pretrained(hf_class(spec.whole), folder, what, attn_implementation=attention)
            model = getattr(whole_model, spec.audio_part)
        else:
            model = strict_from_pretrained(hf_class(spec.model), folder, what, attn_implementation=attention)
        extractor = hf_class(spec.feature_extractor).from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load a {family} audio encoder from '{folder}': {error}") from None
    for name, value in spec.pinned:  # (CLAP: a fixed window; the fused front end needs a model built for it)
        setattr(extractor, name, value)
    return TransformersAudioEncoder(family, model, extractor, proj_dim, target_frames, tokens)


def save_encoder(encoder: nn.Module, path: str | Path) -> None:
    """Write any of our audio encoders as safetensors, with what rebuilds it in the metadata."""
    from safetensors.torch import save_file

    if not isinstance(encoder, TransformersAudioEncoder):
        return save_audio_encoder(encoder, path)

    state = {key: value.detach().contiguous().cpu() for key, value in encoder.state_dict().items()}
    save_file(state, str(path), metadata={ENCODER_METADATA_KEY: json.dumps(encoder.describe())})


def load_encoder(path: str | Path) -> AudioEncoder:
    """An encoder written by :func:`save_encoder` (or any file :func:`load_audio_encoder` reads), rebuilt from its
    metadata, strictly, in eval mode."""
    metadata = read_metadata(path)  # the header alone: a CAV-MAE file is read once
    if ENCODER_METADATA_KEY not in metadata:
        return load_audio_encoder(path)
    return _encoder_described(metadata, header_shapes(path), lambda: read_state_dict(path)[0], str(path))


def encoder_from_state(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> AudioEncoder:
    """:func:`load_encoder` on tensors already read, with their file's metadata (``source`` names it)."""
    if ENCODER_METADATA_KEY not in metadata:
        return audio_encoder_from_state(state, metadata, source)
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    return _encoder_described(metadata, shapes, lambda: state, source)


def _encoder_described(metadata: dict[str, str], shapes: dict, tensors, source: str) -> AudioEncoder:
    """The encoder the metadata describes, checked on the meta device against the tensors' ``shapes`` before it is
    built, then filled with ``tensors()``, strictly."""
    try:
        described = json.loads(metadata[ENCODER_METADATA_KEY])
        with torch.device("meta"):  # what the metadata describes, checked against the tensors before it is built
            check_described_structure(described["config"], source)
            check_described_model(_described_encoder(described), shapes, source)
        encoder = _described_encoder(described)
        encoder.load_state_dict(tensors(), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"'{source}' is not a valid audio encoder file: {error}") from None
    return encoder.eval()


def _described_encoder(described: dict) -> TransformersAudioEncoder:
    spec = FAMILIES[described["family"]]
    config = hf_class(spec.config).from_dict(described["config"])
    extractor = hf_class(spec.feature_extractor).from_dict(described["feature_extractor"])
    return TransformersAudioEncoder(
        described["family"], _model_from_config(spec, config), extractor, described["proj_dim"],
        described["target_frames"], described.get("audio_tokens"),
    )  # fmt: skip
