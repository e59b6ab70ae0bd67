"""Tiny LLaVA-1.5-shaped captioners built offline: a Llama LM, a CLIP vision tower, a trained tokenizer.

Used by the synthetic world (trained from scratch as its image captioner) and by the tests. The folder
written by :func:`save_tiny_llava` has the layout of a Hugging Face LLaVA checkpoint, so the same loader
reads it as reads ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# A Qwen2 chat template, the shape LLaVA-OneVision ships: "<|im_start|>user <image>\n{question}<|im_end|>...".
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Mistral-instruct chat template, the shape LLaVA-NeXT (Mistral) ships: "<s>[INST] <image>\n{question} [/INST]".
NEXT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} [/INST]{% else %}{% for part in message['content'] %} {{ part['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TinyLlavaConfig:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A Llama-style (metaspace BPE, BOS added) tokenizer trained on ``texts`` with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_tiny_llava(tokenizer, config: TinyLlavaConfig = TinyLlavaConfig(), seed: int = 0, family: str = "llava"):
    """A randomly initialised LLaVA at tiny size: ``LlavaForConditionalGeneration`` (LLaVA-1.5's structure), or
    with ``family="llava_next"`` ``LlavaNextForConditionalGeneration`` (the same tower and projector, plus tiles)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=4 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tiles = {"image_grid_pinpoints": _tiles(config.image_size)} if family != "llava" else {}
    config_class, model_class = family_classes(family)
    llava_config = config_class(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        **tiles,
    )
    torch.manual_seed(seed)
    return model_class(llava_config)


def save_tiny_llava(model, tokenizer, folder: str | Path) -> Path:
    """Write model, tokenizer and CLIP image-processor config like a Hugging Face LLaVA folder."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = {"shortest_edge": model.config.vision_config.image_size}
    crop = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
    model.save_pretrained(folder)
    family, pinpoints = model.config.model_type, getattr(model.config, "image_grid_pinpoints", None)
    if family == "llava_next":  # its processor's files, chat template included
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        tokenizer.chat_template = NEXT_CHAT_TEMPLATE
        LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pinpoints).save_pretrained(folder)
    elif family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
        LlavaOnevisionImageProcessorPil(size=crop, image_grid_pinpoints=pinpoints).save_pretrained(folder)
    else:
        CLIPImageProcessorPil(size=size, crop_size=crop).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def as_llava_family(llava, family: str):
    """A LLaVA-NeXT or LLaVA-OneVision holding a LLaVA-1.5's weights (its tower, projector and LM; the newline
    embedding of their tiles is new): what their base-image path computes is then the LLaVA-1.5's. The tests take a
    captioner that writes words through every stage this way."""
    import torch

    config = llava.config
    config_class, model_class = family_classes(family)
    family_config = config_class(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token_index=config.image_token_id,
        projector_hidden_act=config.projector_hidden_act,
        image_grid_pinpoints=_tiles(config.vision_config.image_size),
    )
    torch.manual_seed(0)
    model = model_class(family_config)
    missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
    if unexpected or set(missing) - {"model.image_newline"}:
        raise ValueError(f"LLaVA-1.5 and {family} weights differ: missing {missing}, unexpected {unexpected}")
    return model


def family_classes(family: str):
    """The transformers (config class, model class) of a LLaVA family (``captioner.FAMILIES``)."""
    import transformers

    from dali.models.captioner import FAMILIES

    return tuple(getattr(transformers, name) for name in FAMILIES[family])


def _tiles(size: int) -> list[list[int]]:
    """A tiny tile grid for the families that tile (the base image is all DALI uses)."""
    return [[size, size], [size, 2 * size], [2 * size, size]]
