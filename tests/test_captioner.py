import pytest
import torch
from PIL import Image

from dali.models.captioner import IGNORE_INDEX, Captioner
from dali.models.checkpoints import CheckpointError
from dali.models.decoding import DecodingOptions
from dali.models.prefix import Prefix, load_prefix, save_prefix
from dali.models.projector import load_projector, save_projector
from dali.models.vision_tower import expand_to_square


@pytest.fixture(scope="module")
def captioner(tiny_llava_dir):
    return Captioner.from_pretrained(tiny_llava_dir)


def test_loads_and_round_trips(captioner, tiny_llava_dir, tmp_path):
    assert captioner.hidden_size == 32 and captioner.vision_dim == 32 and captioner.num_image_tokens == 16
    assert not any(p.requires_grad for p in captioner.parameters())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Captioner.from_pretrained(tmp_path / "nowhere")


def test_image_preprocessing_pads_to_square_with_clip_mean(captioner):
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(wide)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((20, 20)) == (255, 0, 0)
    pixels = captioner.preprocess_images([wide, Image.new("L", (5, 9))])
    assert pixels.shape == (2, 3, 32, 32)
    tokens = captioner.image_tokens(pixels)
    assert tokens.shape == (2, 16, 32)  # CLS dropped
    hidden = captioner.llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert torch.equal(tokens, hidden[-2][:, 1:])


@pytest.mark.parametrize("modality,expected", [("image", 16), ("audio", 10), ("audio_vis", 26)])
def test_token_layout_per_modality(captioner, modality, expected):
    image = torch.randn(2, 16, 32) if modality in ("image", "audio_vis") else None
    audio = torch.randn(2, 10, 32) if modality in ("audio", "audio_vis") else None
    prefix = torch.randn(4, 32)
    block = captioner.modality_block(image, audio)
    assert block.shape == (2, expected, 32)
    with_prefix = captioner.modality_block(image, audio, prefix=prefix)
    assert with_prefix.shape == (2, expected + 4, 32)
    assert torch.equal(with_prefix[:, -4:], prefix.expand(2, -1, -1))
    if modality == "audio_vis":  # image first, then audio
        assert torch.allclose(with_prefix[:, :16], captioner.projector(image))


def test_labels_cover_only_the_answer(captioner):
    block = captioner.modality_block(audio_tokens=torch.randn(2, 10, 32))
    inputs = captioner.build_inputs(block, ["a dog barks twice", "a cat meows"])
    labels, mask = inputs["labels"], inputs["attention_mask"]
    assert inputs["inputs_embeds"].shape[:2] == labels.shape == mask.shape
    eos = captioner.tokenizer.eos_token_id
    for row, caption in enumerate(["a dog barks twice", "a cat meows"]):
        answer = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert answer[-1] == eos
        assert captioner.tokenizer.decode(answer, skip_special_tokens=True).strip() == caption
    # the block and the prompt are never supervised; padding is masked out
    assert (labels[:, : 10 + 20] == IGNORE_INDEX).all()
    assert ((mask == 0) <= (labels == IGNORE_INDEX)).all()


def test_prefix_gets_gradients_through_the_frozen_llm(captioner):
    prefix = Prefix(num_tokens=4, hidden_size=32, init_std=1e-4)
    block = captioner.modality_block(image_tokens=torch.randn(2, 16, 32), prefix=prefix())
    loss = captioner.caption_loss(block, ["a bell rings once", "wind blows hard"])
    loss.backward()
    assert prefix.embeddings.grad is not None and prefix.embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in captioner.parameters())


def test_generation_from_embeddings_is_seeded(captioner):
    block = captioner.modality_block(audio_tokens=torch.randn(3, 10, 32))
    greedy = captioner.generate(block, DecodingOptions(max_new_tokens=5))
    assert len(greedy) == 3 and all(isinstance(text, str) for text in greedy)
    assert greedy == captioner.generate(block, DecodingOptions(max_new_tokens=5))
    sample = DecodingOptions(strategy="sample", temperature=1.5, max_new_tokens=6, seed=3)
    assert captioner.generate(block, sample) == captioner.generate(block, sample)
    assert len(captioner.generate(block, DecodingOptions(strategy="beam", num_beams=2, max_new_tokens=4))) == 3
    with pytest.raises(ValueError, match="strategy"):
        DecodingOptions(strategy="nucleus")
    with pytest.raises(ValueError, match="engine"):
        DecodingOptions(engine="vllm")


def test_prompt_parts_are_the_generation_prompt(captioner):
    block = captioner.modality_block(audio_tokens=torch.randn(2, 10, 32), prefix=torch.randn(4, 32))
    shared, rows = captioner.prompt_parts(block)
    prompt = captioner.build_inputs(block)
    assert prompt["attention_mask"].all()  # generation prompts of one question are never padded
    joined = torch.cat([shared.unsqueeze(0).expand(2, -1, -1), rows], dim=1)
    assert torch.equal(joined, prompt["inputs_embeds"])


@pytest.mark.parametrize("new_tokens", [1, 12])
def test_our_engine_decodes_what_generate_decodes(captioner, new_tokens):
    torch.manual_seed(1)
    block = captioner.modality_block(audio_tokens=torch.randn(5, 10, 32) * 3, prefix=torch.randn(4, 32))
    ours = captioner.generate(block, DecodingOptions(strategy="greedy", max_new_tokens=new_tokens))
    plain = captioner.generate(block, DecodingOptions(strategy="greedy", max_new_tokens=new_tokens, engine="generate"))
    static = DecodingOptions(strategy="greedy", max_new_tokens=new_tokens, engine="generate-static")
    assert ours == plain == captioner.generate(block, static)
    # seeded sampling draws the same stream as generate's (same warpers, one draw per step over the batch)
    sample = dict(strategy="sample", temperature=0.8, top_p=0.9, max_new_tokens=new_tokens, seed=5)
    assert captioner.generate(block, DecodingOptions(**sample)) == captioner.generate(
        block, DecodingOptions(**sample, engine="generate")
    )
    # exactly N tokens when EOS is forbidden before N, as generate's min_new_tokens
    shared, rows = captioner.prompt_parts(block)
    tokenizer = captioner.tokenizer
    ids = captioner.decoder.generate(
        shared, rows, new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, min_new_tokens=new_tokens
    )
    assert ids.shape == (5, new_tokens) and not (ids == tokenizer.eos_token_id).any()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefill_attention_is_the_masked_attention_over_the_filled_cache(kv_heads):
    from types import SimpleNamespace

    from dali.models.decoding import shared_head_attention

    torch.manual_seed(0)
    batch, heads, head_len, queries, spare, dim = 3, 4, 5, 7, 4, 8
    length = head_len + queries + spare  # a static cache with room for new tokens
    query = torch.randn(batch, heads, queries, dim)
    key, value = torch.randn(2, batch, kv_heads, length, dim).unbind(0)
    position = torch.arange(length)
    allowed = position[None, :] <= head_len + torch.arange(queries)[:, None]  # causal after the head
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    output, _ = shared_head_attention(module, query, key, value, None, scaling=0.3, prefill_keys=head_len + queries)
    assert output.shape == (batch, queries, heads, dim)
    torch.testing.assert_close(output, expected)


def test_engine_prefill_uses_the_square_attention_and_gives_the_model_back(captioner, monkeypatch):
    import gc
    import weakref

    import dali.models.decoding as decoding

    seen = []
    original = decoding.shared_head_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[2], kwargs.get("prefill_keys")))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(decoding, "shared_head_attention", spy)
    captioner.release_decoder()
    block = captioner.modality_block(audio_tokens=torch.randn(2, 10, 32), prefix=torch.randn(4, 32))
    shared, rows = captioner.prompt_parts(block)
    captioner.generate(block, DecodingOptions(strategy="greedy", max_new_tokens=3))
    layers = captioner.llava.config.text_config.num_hidden_layers
    prefill = [keys for queries, keys in seen if keys is not None]  # (the shared head runs as plain sdpa)
    assert prefill == [shared.shape[0] + rows.shape[1]] * layers  # every layer of the per-row prefill
    text_config = captioner.llava.model.language_model.config
    assert text_config._attn_implementation == decoding.SHARED_HEAD_ATTENTION
    keys = weakref.ref(captioner.decoder.cache.layers[0].keys)
    gc.disable()  # the cache must go with the engine, not wait for the cycle collector
    try:
        captioner.release_decoder()
        assert keys() is None
    finally:
        gc.enable()
    assert text_config._attn_implementation == "sdpa"


def test_our_engine_stops_rows_at_eos_and_samples_reproducibly(captioner):
    tokenizer = captioner.tokenizer
    eos = tokenizer.eos_token_id
    block = captioner.modality_block(audio_tokens=torch.randn(4, 10, 32))
    shared, rows = captioner.prompt_parts(block)
    # an LM head biased towards EOS makes every row stop at once; later positions are padding
    decoder = captioner.decoder
    head = decoder.lm_head
    bias = torch.zeros(head.out_features)
    bias[eos] = 1e4
    decoder.lm_head = lambda hidden: head(hidden) + bias
    try:
        ids = decoder.generate(shared, rows, 12, eos, tokenizer.pad_token_id)
    finally:
        decoder.lm_head = head
    assert (ids[:, 0] == eos).all() and ids.shape[1] <= 8  # stops at the first check once all rows ended
    assert (ids[:, 1:] == tokenizer.pad_token_id).all()
    sample = dict(temperature=1.0, top_p=0.9, seed=7)
    first = captioner.decoder.generate(shared, rows, 6, eos, tokenizer.pad_token_id, **sample)
    assert torch.equal(first, captioner.decoder.generate(shared, rows, 6, eos, tokenizer.pad_token_id, **sample))
    cold = captioner.decoder.generate(shared, rows, 6, eos, tokenizer.pad_token_id, temperature=1e-4, seed=1)
    assert torch.equal(cold, captioner.decoder.generate(shared, rows, 6, eos, tokenizer.pad_token_id))


def test_prefix_and_projector_files(captioner, tmp_path):
    prefix = Prefix(4, 32)
    save_prefix(prefix, tmp_path / "prefix.safetensors")
    assert torch.equal(load_prefix(tmp_path / "prefix.safetensors", hidden_size=32).embeddings, prefix.embeddings)
    with pytest.raises(CheckpointError, match="hidden size"):
        load_prefix(tmp_path / "prefix.safetensors", hidden_size=64)
    torch.save({"model.audio_tower.prefix": prefix.embeddings.detach()}, tmp_path / "prefix.bin")
    assert torch.equal(load_prefix(tmp_path / "prefix.bin").embeddings, prefix.embeddings)

    projector = captioner.copy_projector()
    torch.nn.init.normal_(projector.linear_1.weight)
    save_projector(projector, tmp_path / "projector.safetensors")
    loaded = load_projector(tmp_path / "projector.safetensors", captioner.projector)
    assert torch.equal(loaded.linear_1.weight, projector.linear_1.weight)
    original = {
        "model.mm_projector.0.weight": projector.linear_1.weight.detach(),
        "model.mm_projector.0.bias": projector.linear_1.bias.detach(),
        "model.mm_projector.2.weight": projector.linear_2.weight.detach(),
        "model.mm_projector.2.bias": projector.linear_2.bias.detach(),
    }
    torch.save(original, tmp_path / "prefixMLP.bin")
    assert torch.equal(
        load_projector(tmp_path / "prefixMLP.bin", captioner.projector).linear_2.bias, projector.linear_2.bias
    )
    with pytest.raises(CheckpointError, match="not a projector"):
        load_projector(tmp_path / "prefix.safetensors", captioner.projector)


def test_bfloat16_captioner_takes_float32_tokens_and_a_float32_projector_copy(tiny_llava_dir):
    captioner = Captioner.from_pretrained(tiny_llava_dir, dtype=torch.bfloat16)
    copy = captioner.copy_projector()  # float32, trained in full precision
    block = captioner.modality_block(torch.randn(1, 16, 32), torch.randn(1, 10, 32), audio_projector=copy)
    assert block.dtype == torch.bfloat16 and block.shape == (1, 26, 32)
    assert len(captioner.generate(block, DecodingOptions(max_new_tokens=3))) == 1


@pytest.mark.gpu
def test_compiled_engine_on_gpu_matches_generate_and_pads_smaller_batches(tiny_llava_dir):
    captioner = Captioner.from_pretrained(tiny_llava_dir, device="cuda")
    assert captioner.decoder.compile
    block = captioner.modality_block(audio_tokens=torch.randn(4, 10, 32, device="cuda") * 3)
    options = DecodingOptions(strategy="greedy", max_new_tokens=8)
    plain = captioner.generate(block, DecodingOptions(strategy="greedy", max_new_tokens=8, engine="generate"))
    assert captioner.generate(block, options) == plain
    assert captioner.generate(block[:3], options) == plain[:3]  # padded to the compiled batch of 4


@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1])
def test_clip_stops_at_the_feature_layer_with_the_numbers_and_gradients_of_the_whole_tower(
    tiny_llava_dir, feature_layer
):
    from dali.models.vision_tower import layer_states

    tower = Captioner.from_pretrained(tiny_llava_dir).llava.model.vision_tower.requires_grad_(True)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ran = []
    for layer in tower.encoder.layers:
        layer.register_forward_hook(lambda module, args, output: ran.append(module))
    states = layer_states(tower, pixels, feature_layer)
    assert len(ran) == range(len(tower.encoder.layers) + 1)[feature_layer]  # none after it
    states.square().sum().backward()
    ours = {name: p.grad.clone() for name, p in tower.named_parameters() if p.grad is not None}
    tower.zero_grad(set_to_none=True)
    whole = tower(pixels, output_hidden_states=True).hidden_states[feature_layer]
    whole.square().sum().backward()
    assert torch.equal(states, whole)
    assert ours.keys() == {name for name, p in tower.named_parameters() if p.grad is not None}
    assert all(torch.equal(ours[name], p.grad) for name, p in tower.named_parameters() if p.grad is not None)
