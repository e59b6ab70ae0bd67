"""Captioners beyond LLaVA-1.5 (``--llava``): LLaVA-NeXT built in its real class, saved in its real format with
its processor's chat template, and taken through the five stages."""

import json

import pytest
import torch
from helpers import align_flags, prefix_flags

from dali.errors import ModelLoadError
from dali.jsonl import read_jsonl
from dali.models.captioner import QUESTION, Captioner
from dali.models.tiny_llava import as_llava_next, save_tiny_llava
from dali.models.vision_tower import VisionTower
from dali.runs import read_manifest
from dali.stages import align, distill, infer, prefix_tune, pseudo_label


@pytest.fixture(scope="module")
def next_dir(synthetic, tmp_path_factory):
    """The synthetic world's captioner as a LLaVA-NeXT folder (its chat template: Mistral-instruct's shape)."""
    _, llava = synthetic
    source = Captioner.from_pretrained(llava)
    return save_tiny_llava(as_llava_next(source.llava), source.tokenizer, tmp_path_factory.mktemp("llava_next"))


def test_llava_next_loads_in_its_class_with_the_prompt_of_its_chat_template(next_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    captioner = Captioner.from_pretrained(next_dir)
    assert isinstance(captioner.llava, LlavaNextForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(next_dir)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    ids = captioner.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    image = ids.index(captioner.llava.config.image_token_id)
    # The prompt around the block is the processor's rendering, token for token, the block at its image token.
    block = torch.zeros(1, 3, captioner.hidden_size)
    inputs = captioner.build_inputs(block)
    embed = captioner.llava.get_input_embeddings()
    expected = torch.cat([embed(torch.tensor(ids[:image])), block[0], embed(torch.tensor(ids[image + 1 :]))])
    assert torch.equal(inputs["inputs_embeds"][0], expected)
    shared, rows = captioner.prompt_parts(block)
    assert torch.equal(torch.cat([shared, rows[0]]), expected)


def test_the_base_image_of_llava_next_gives_llava_15s_tokens(synthetic, next_dir):
    one, nxt = Captioner.from_pretrained(synthetic[1]), Captioner.from_pretrained(next_dir)
    pixels = torch.rand(2, 3, nxt.llava.config.vision_config.image_size, nxt.llava.config.vision_config.image_size)
    assert torch.equal(one.image_tokens(pixels), nxt.image_tokens(pixels))
    tower = VisionTower.from_pretrained(next_dir)
    assert torch.equal(tower.image_tokens(pixels), nxt.image_tokens(pixels))


def test_a_model_of_another_family_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(ModelLoadError, match="is a llama model; --llava takes"):
        Captioner.from_pretrained(tmp_path)


@pytest.mark.slow
def test_llava_next_goes_through_the_five_stages(synthetic, next_dir, tmp_path):
    world, _ = synthetic
    run = tmp_path / "expe" / "run"
    assert prefix_tune.main([*prefix_flags(world, next_dir, 1), "--out", str(run / "prefix")]) == 0
    assert align.main(align_flags(world, next_dir) + ["--epochs", "1", "--out", str(run / "align")]) == 0
    assert read_manifest(run / "align")["metrics"]["llava"] == str(next_dir)
    common = ["--run", "run", "--expe-dir", str(run.parent), "--num-workers", "0", "--max-new-tokens", "6"]
    clips = ["--clips", str(world / "pseudo.json"), "--limit", "8", "--batch-size", "4"]
    assert pseudo_label.main(common + clips) == 0  # the LLaVA recorded upstream: no --llava from here on
    captions = read_jsonl(run / "pseudo_label" / "pseudo_captions.jsonl")
    assert captions and len(captions) + len(read_jsonl(run / "pseudo_label" / "skipped.jsonl")) == 8
    assert distill.main(common[:-2] + ["--epochs", "1", "--batch-size", "4"]) == 0
    test = ["--test-list", str(world / "test.csv"), "--audio-dir", str(world / "audio"), "--limit", "4"]
    assert infer.main(common + test + ["--modality", "audio", "--no-sbert"]) == 0
    assert len(read_jsonl(run / "infer_audio" / "predictions.jsonl")) == 4
    assert json.loads((run / "infer_audio" / "scores.json").read_text())["scores"]
