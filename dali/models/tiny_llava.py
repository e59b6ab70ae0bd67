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


def build_tiny_llava(tokenizer, config: TinyLlavaConfig = TinyLlavaConfig(), seed: int = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` of LLaVA-1.5's structure at tiny size."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    llava_config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava_config)


def save_tiny_llava(model, tokenizer, folder: str | Path) -> Path:
    """Write model, tokenizer and CLIP image-processor config like a Hugging Face LLaVA folder."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = model.config.vision_config.image_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder
    )
    return folder
