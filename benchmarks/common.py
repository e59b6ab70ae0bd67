"""Shared pieces of the GPU benchmarks: device description, timing, LLaVA-1.5-7B shapes with random weights."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(0)} x{count}" if count > 1 else torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "cpu")
    return f"{model}, {os.cpu_count()} cores"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timer(result: dict, key: str):
    sync()
    start = time.perf_counter()
    yield
    sync()
    result[key] = time.perf_counter() - start


def measured_ceilings() -> dict:
    """bf16 matmul TFLOP/s and device-to-device copy bandwidth (read + write) measured here."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    tflops = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    src = torch.randn(1 << 30, device="cuda", dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync()
    bandwidth = 5 * 2 * src.numel() * 4 / (time.perf_counter() - start) / 1e12
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"bf16_tflops": round(tflops, 1), "copy_tb_s": round(bandwidth, 2)}


def clip_vit_l_336_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def llava_7b_config(vocab_size: int = 32064, text_layers: int = 32, image_token_index: int | None = None):
    """LLaVA-1.5-7B's config; ``image_token_index`` must name the tokenizer's ``<image>`` where a folder is saved
    and loaded (its chat template is cut there), by default the last id."""
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=text_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlavaConfig(
        vision_config=clip_vit_l_336_config(),
        text_config=text,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=vocab_size - 1 if image_token_index is None else image_token_index,
    )


def random_llava(config, dtype=torch.bfloat16, device="cuda"):
    """A randomly initialised LLaVA of the config's family built straight on the device (no 28 GB fp32 copy on the
    host)."""
    from dali.models.tiny_llava import family_classes

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = family_classes(config.model_type)[1](config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def benchmark_tokenizer():
    """A small tokenizer for the prompt text (ids stay below any vocabulary size used here)."""
    from dali.constants import SYSTEM_PROMPT
    from dali.models.captioner import QUESTION
    from dali.models.tiny_llava import train_tokenizer

    return train_tokenizer([SYSTEM_PROMPT, QUESTION, "USER: ASSISTANT:"] * 20, vocab_size=300)


def report(name: str, rows: dict, out_dir: str | None = None) -> None:
    payload = {"benchmark": name, "device": device_name(), **rows}
    print(json.dumps(payload, indent=2))
    out_dir = out_dir or os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as stream:
            json.dump(payload, stream, indent=2)
