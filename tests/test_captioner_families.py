"""Captioners beyond LLaVA-1.5 (``--llava``): LLaVA-NeXT and LLaVA-OneVision built in their real classes, saved in
their real formats with their processors' chat templates, and taken through the five stages."""

import io
import json
import shutil
from unittest import mock

import pytest
import torch
from helpers import align_flags, prefix_flags
from PIL import Image

from dali.errors import ModelLoadError
from dali.jsonl import read_jsonl
from dali.models.captioner import QUESTION, Captioner
from dali.models.tiny_llava import TinyLlavaConfig, as_llava_family, build_tiny_llava, family_classes, save_tiny_llava
from dali.models.vision_tower import VisionTower
from dali.runs import read_manifest
from dali.stages import align, distill, infer, prefix_tune, pseudo_label

FAMILIES = ("llava_next", "llava_onevision")


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, synthetic, tmp_path_factory):
    """The synthetic world's captioner as a folder of another family (chat templates of Mistral-instruct's and
    Qwen2's shapes, as LLaVA-NeXT and LLaVA-OneVision ship)."""
    _, llava = synthetic
    source = Captioner.from_pretrained(llava)
    model = as_llava_family(source.llava, request.param)
    return save_tiny_llava(model, source.tokenizer, tmp_path_factory.mktemp(request.param))


def test_each_family_loads_in_its_class_with_the_prompt_of_its_chat_template(family_dir):
    captioner = Captioner.from_pretrained(family_dir)
    assert type(captioner.llava) is family_classes(captioner.llava.config.model_type)[1]
    _assert_the_processors_prompt(captioner, family_dir)


def _assert_the_processors_prompt(captioner: Captioner, folder, answer: str = "a dog barks twice") -> None:
    """The prompt around the block is the processor's rendering tokenised whole, token for token, the block at its
    image token; a training answer's labels are the ids of the rendered answer turn."""
    import transformers

    # Rendered by the processor (LLaVA-NeXT's; OneVision's needs torchvision for its video half: its tokenizer
    # holds the same template)
    family = captioner.llava.config.model_type
    owner = (transformers.AutoProcessor if family == "llava_next" else transformers.AutoTokenizer).from_pretrained(
        folder
    )
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = owner.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    ids = captioner.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    image = ids.index(captioner.llava.config.image_token_id)
    block = torch.zeros(1, 3, captioner.hidden_size)
    inputs = captioner.build_inputs(block)
    embed = captioner.llava.get_input_embeddings()
    expected = torch.cat([embed(torch.tensor(ids[:image])), block[0], embed(torch.tensor(ids[image + 1 :]))])
    assert torch.equal(inputs["inputs_embeds"][0], expected)
    shared, rows = captioner.prompt_parts(block)
    assert torch.equal(torch.cat([shared, rows[0]]), expected)
    if family == "llava_next":  # (its template writes the answer turn: " answer</s>")
        reply = [*turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        whole = captioner.tokenizer(owner.apply_chat_template(reply, tokenize=False), add_special_tokens=False)
        labels = captioner.build_inputs(block, captions=[answer])["labels"][0]
        assert labels[labels != -100].tolist() == whole["input_ids"][len(ids) :]


def _sentencepiece_tokenizer(folder, legacy: bool):
    """A Llama/Mistral tokenizer as released: a SentencePiece BPE model (byte fallback) in ``tokenizer.model``,
    read by transformers, with ``<image>`` and ``<pad>`` added, as LLaVA-NeXT's folders add them."""
    import sentencepiece
    from transformers import LlamaTokenizer

    from dali.constants import SYSTEM_PROMPT

    texts = [QUESTION, SYSTEM_PROMPT, "[INST] [/INST]", "a dog barks twice", "wind blows hard"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=legacy, add_bos_token=True)
    tokenizer.add_tokens(["<image>", "<pad>"], special_tokens=True)
    tokenizer.pad_token = "<pad>"
    return tokenizer


@pytest.mark.parametrize("legacy", [False, True])
def test_a_sentencepiece_tokenizer_with_a_mistral_template_gives_the_processors_prompt(tmp_path, legacy):
    """LLaVA-NeXT (Mistral) as released: ``[INST] <image>\n{question} [/INST]`` over a SentencePiece tokenizer,
    which marks the start of a text it tokenises alone (the prompt is cut after tokenisation, not before)."""
    tokenizer = _sentencepiece_tokenizer(tmp_path / "spm", legacy)
    assert tokenizer.convert_ids_to_tokens(tokenizer("x", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    shape = TinyLlavaConfig(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, vocab_size=0)
    folder = save_tiny_llava(build_tiny_llava(tokenizer, shape, family="llava_next"), tokenizer, tmp_path / "next")
    captioner = Captioner.from_pretrained(folder)
    assert captioner.prompt.tail.startswith("\n") and captioner.prompt.image_token == "<image>"
    _assert_the_processors_prompt(captioner, folder)


def test_a_config_and_tokenizer_that_disagree_about_the_image_token_is_a_clear_error(family_dir, tmp_path):
    """The config's image token must be the tokenizer's added ``<image>``, never an ordinary word of it."""
    shutil.copytree(family_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    tokenizer = Captioner.from_pretrained(family_dir).tokenizer
    word = tokenizer("wind", add_special_tokens=False)["input_ids"][-1]
    config["image_token_index"] = word
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    named = repr(tokenizer.convert_ids_to_tokens(word))
    with pytest.raises(
        ModelLoadError, match=f"disagree about the image token: .* {word} is the ordinary token {named}"
    ):
        Captioner.from_pretrained(tmp_path / "model")


def test_the_base_image_of_each_family_gives_llava_15s_tokens(synthetic, family_dir):
    one, other = Captioner.from_pretrained(synthetic[1]), Captioner.from_pretrained(family_dir)
    frames = [Image.new("RGB", (48, 30), (200, 40, 10)), Image.new("RGB", (30, 30), (0, 90, 250))]
    pixels = other.preprocess_images(frames)
    assert torch.allclose(pixels, one.preprocess_images(frames), atol=1e-6)
    assert torch.equal(one.image_tokens(pixels), other.image_tokens(pixels))
    tower = VisionTower.from_pretrained(family_dir)
    assert torch.equal(tower.image_tokens(pixels), other.image_tokens(pixels))


def test_onevision_with_siglip_selects_every_patch_token(tmp_path):
    """LLaVA-OneVision's own tower: SigLIP, no CLS, its last layer's tokens all kept (the ``full`` selection)."""
    from transformers import (
        LlamaConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        SiglipVisionConfig,
    )

    from dali.models.tiny_llava import train_tokenizer

    tokenizer = train_tokenizer(["a dog barks", "wind blows hard", QUESTION] * 4, vocab_size=120)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=7)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[28, 28]],
    )  # fmt: skip
    save_tiny_llava(LlavaOnevisionForConditionalGeneration(config), tokenizer, tmp_path)
    captioner = Captioner.from_pretrained(tmp_path)
    pixels = captioner.preprocess_images([Image.new("RGB", (40, 20), (10, 200, 30))])
    assert pixels.shape == (1, 3, 28, 28)
    tokens = captioner.image_tokens(pixels)
    hidden = captioner.llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    assert tokens.shape == (1, 16, 32) and torch.equal(tokens, hidden)
    assert captioner.num_image_tokens == 16 and VisionTower.from_pretrained(tmp_path).num_tokens == 16
    assert torch.equal(VisionTower.from_pretrained(tmp_path).image_tokens(pixels), tokens)


def test_a_model_of_another_family_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(ModelLoadError, match="is a llama model; --llava takes"):
        Captioner.from_pretrained(tmp_path)


@pytest.mark.slow
def test_each_family_goes_through_the_five_stages(synthetic, family_dir, tmp_path):
    world, _ = synthetic
    run = tmp_path / "expe" / "run"
    assert prefix_tune.main([*prefix_flags(world, family_dir, 1), "--out", str(run / "prefix")]) == 0
    assert align.main(align_flags(world, family_dir) + ["--epochs", "1", "--out", str(run / "align")]) == 0
    assert read_manifest(run / "align")["inputs"]["llava"]["path"] == str(family_dir.resolve())
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


def _loss_gradients_and_positions(folder, run_head_in_each_row: bool, checkpointing: bool = False):
    """caption_loss of one batch (answers of three lengths, a block with gradients): the loss, every gradient, and
    how many positions the LLM's first layer ran."""
    captioner = Captioner.from_pretrained(folder)
    captioner.llava.requires_grad_(True)
    if checkpointing:
        captioner.enable_gradient_checkpointing()
    torch.manual_seed(0)
    block = torch.randn(3, 5, captioner.hidden_size, requires_grad=True)
    positions = []
    captioner.llava.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(_positions(args, kwargs)), with_kwargs=True
    )
    captions = ["a dog barks twice and then a bell rings", "wind", "a car passes by"]
    decide = (lambda self, batch: False) if run_head_in_each_row else Captioner._shares_head
    with mock.patch.object(Captioner, "_shares_head", decide):
        loss = captioner.caption_loss(block, captions)
    loss.backward()
    gradients = {name: p.grad for name, p in captioner.llava.named_parameters() if p.grad is not None}
    return loss, gradients | {"block": block.grad}, sum(positions)


def _assert_same_loss_and_gradients(actual: tuple, expected: tuple) -> None:
    """(loss, {name: gradient}) pairs equal to rounding, the block's gradient among them."""
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
    assert actual[1].keys() == expected[1].keys() and "block" in expected[1]
    for name, gradient in expected[1].items():
        torch.testing.assert_close(actual[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def _assert_the_head_runs_once_with_the_same_loss_and_gradients(folder) -> None:
    loss, gradients, positions = _loss_gradients_and_positions(folder, run_head_in_each_row=True)
    shared_loss, shared_gradients, shared_positions = _loss_gradients_and_positions(folder, False)
    _assert_same_loss_and_gradients((shared_loss, shared_gradients), (loss, gradients))
    head = len(Captioner.from_pretrained(folder)._prompt_ids(QUESTION)[0])
    assert head > 0 and shared_positions == positions - 2 * head  # the head ran in one row, not three
    _, checkpointed, checkpointed_positions = _loss_gradients_and_positions(folder, False, checkpointing=True)
    assert checkpointed_positions == positions  # transformers' checkpointing keeps no cache: the head runs per row
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_the_prompts_head_runs_once_per_batch_with_the_loss_and_gradients_of_each_row(synthetic, family_dir):
    _assert_the_head_runs_once_with_the_same_loss_and_gradients(family_dir)


def test_llava_15s_head_runs_once_per_batch_with_the_loss_and_gradients_of_each_row(synthetic):
    _assert_the_head_runs_once_with_the_same_loss_and_gradients(synthetic[1])


_QUESTIONS_AND_ANSWERS = (
    [QUESTION, "What sounds might this scene make?"],
    [["a red car on a road", "wind", "a dog"], ["a dog barks twice and then a bell rings", "a car", "rain"]],
)


def _answers_loss_gradients_and_positions(folder, together: bool):
    """Two questions with answers of several lengths to each row of one block: answers_loss (``together``) or
    caption_loss per question with the head in every row; the loss, every gradient, and how many positions the
    LLM's first layer ran."""
    captioner = Captioner.from_pretrained(folder)
    captioner.llava.requires_grad_(True)
    torch.manual_seed(0)
    block = torch.randn(3, 5, captioner.hidden_size, requires_grad=True)
    positions = []
    captioner.llava.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(_positions(args, kwargs)), with_kwargs=True
    )
    questions, answers = _QUESTIONS_AND_ANSWERS
    if together:
        loss = captioner.answers_loss(block, questions, answers)
    else:
        with mock.patch.object(Captioner, "_shares_head", lambda self, batch: False):
            sums = [captioner.caption_loss(block, rows, q, reduction="sum") for q, rows in zip(questions, answers)]
        loss = sum(total for total, _ in sums) / sum(count for _, count in sums)
    loss.backward()
    gradients = {name: p.grad for name, p in captioner.llava.named_parameters() if p.grad is not None}
    return loss, gradients | {"block": block.grad}, sum(positions)


def _positions(args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.shape[0] * hidden.shape[1]


def test_every_answer_to_a_block_trains_on_one_pass_of_its_block_with_the_loss_and_gradients_of_each_row(family_dir):
    """The captioner's image steps: each image's caption and sounds from one pass of the LM over its block."""
    loss, gradients, positions = _answers_loss_gradients_and_positions(family_dir, together=False)
    together, together_gradients, together_positions = _answers_loss_gradients_and_positions(family_dir, True)
    _assert_same_loss_and_gradients((together, together_gradients), (loss, gradients))
    captioner = Captioner.from_pretrained(family_dir)
    head = len(captioner._prompt_ids(QUESTION)[0])
    widths = [captioner.build_inputs(torch.zeros(3, 5, captioner.hidden_size), rows, q)["attention_mask"].shape[1]
              for q, rows in zip(*_QUESTIONS_AND_ANSWERS)]  # fmt: skip
    assert positions == sum(3 * width for width in widths)  # every row whole
    assert together_positions == head + 3 * 5 + 2 * 3 * (max(widths) - head - 5)  # one head, each block once
