"""Our decoding engine for LLaVA's language model: batched greedy or seeded sampling from input embeddings.

Why not only ``generate``: DALI's prompts have a known shape that ``generate`` cannot exploit. Every row of
a batch starts with the same text (BOS, the system prompt, "USER: ") and all rows have the same length
(the modality block has a fixed number of tokens), so there is never padding. The engine therefore

- computes the shared head's keys and values once (batch 1, kept across calls) and copies them into every
  row of the cache,
- prefills only the per-row part, with one causal pass and the LM head on the last position only; its
  attention runs as a square causal problem over the filled keys (see :func:`shared_head_attention`),
- decodes one token per step against a pre-allocated KV cache (transformers' ``StaticCache``),

and on a GPU compiles the prefill (fused norms, rotary and activations) and captures the decode step in a
CUDA graph. Shapes are kept fixed so nothing recompiles: a smaller batch is padded to the batch the engine
was last built for, and the padding rows are dropped. Beam search stays with transformers' ``generate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dali.constants import DECODING_ENGINES
from dali.limits import number_problem

SHARED_HEAD_ATTENTION = "dali_sdpa"  # our name in transformers' attention registry: sdpa + the prefill below


def shared_head_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    prefill_keys: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except in our prefill, which passes ``prefill_keys``.

    The prefill's queries [B, heads, T, D] are the last T of ``prefill_keys`` filled cache positions (the
    shared head sits in front), and the static cache hands over all of its positions, so transformers builds a
    [T, cache length] boolean mask and SDPA falls back to a masked kernel (11 ms a layer at batch 256 on an
    H200, 11% of the prefill). Padding the queries in front with the head's length makes the problem square:
    plain causal attention over the filled keys, which SDPA runs with its flash kernels (under 3 ms). The
    padded rows' outputs are dropped; every real query sees exactly the keys the mask allowed.

    Returns the attention output [B, T, heads, D], as transformers' attention functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries = query.shape[2]
    if prefill_keys is None or queries == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    batch, heads, _, dim = query.shape
    head = prefill_keys - queries
    key, value = key[:, :, :prefill_keys], value[:, :, :prefill_keys]
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: one key/value head per group of query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    padded = torch.cat([query.new_zeros(batch, heads, head, dim), query], dim=2)
    output = torch.nn.functional.scaled_dot_product_attention(padded, key, value, is_causal=True, scale=scaling)
    return output[:, :, head:].transpose(1, 2).contiguous(), None


def _use_shared_head_attention(language_model: nn.Module) -> str | None:
    """Route an sdpa language model through :func:`shared_head_attention`; returns the implementation it had.

    Outside our prefill the function is transformers' sdpa, so ``generate`` on the same model is unchanged.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    previous = language_model.config._attn_implementation
    if previous != "sdpa":
        return None
    AttentionInterface.register(SHARED_HEAD_ATTENTION, shared_head_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_HEAD_ATTENTION, sdpa_mask)
    language_model.config._attn_implementation = SHARED_HEAD_ATTENTION
    return previous


@dataclass
class DecodeTimings:
    """Seconds spent in each part of the last call (filled only with ``profile=True``: it synchronises)."""

    shared: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    steps: int = 0


class StaticDecoder:
    """Decode from ``[shared head, per-row prompt]`` embeddings with a static KV cache.

    Args:
        llava: a ``LlavaForConditionalGeneration`` (its language model, embeddings and LM head are used).
        compile: compile the prefill and graph-capture the decode step; default: on CUDA devices only.
    """

    def __init__(self, llava: nn.Module, compile: bool | None = None):
        self.language_model = llava.model.language_model
        self.lm_head = llava.lm_head
        self.embed = llava.get_input_embeddings()
        self.config = llava.config.get_text_config(decoder=True)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        self.compile = self.device.type == "cuda" if compile is None else compile
        self._previous_attention = _use_shared_head_attention(self.language_model)
        self.cache = None
        self._cache_shape: tuple[int, int] | None = None
        self._shared_head: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.timings = DecodeTimings()
        self._prefill, self._step = self._last_logits, self._step_logits
        if self.compile:
            self._prefill = torch.compile(self._last_logits, dynamic=False)
            self._step = torch.compile(self._step_logits, mode="reduce-overhead", dynamic=False)

    def close(self) -> None:
        """Free the KV cache and compiled code now, and give the language model back its attention implementation.

        The compiled callables hold this engine (they wrap its bound methods), so without this the cache would
        wait for Python's cycle collector: found on the GPU, where it took the memory of the next batch.
        """
        self.cache = self._cache_shape = self._shared_head = None
        self._prefill = self._step = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self._previous_attention is not None:
            self.language_model.config._attn_implementation = self._previous_attention
            self._previous_attention = None

    # -- model calls (compiled on GPU) --------------------------------------------------------------
    def _last_logits(self, embeds: torch.Tensor, cache, prefill_keys: int | None = None) -> torch.Tensor:
        """[B, T, H] continuing the cache -> float logits of the last position [B, V].

        ``prefill_keys``: the cache positions filled once ``embeds`` are in (prefill only; see
        :func:`shared_head_attention`).
        """
        extra = {"prefill_keys": prefill_keys} if self._previous_attention and prefill_keys else {}
        hidden = self.language_model(inputs_embeds=embeds, cache=cache, use_cache=True, **extra).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    def _step_logits(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """[B, 1] token ids -> float logits of the next token [B, V]."""
        return self._last_logits(self.embed(tokens), cache)

    # -- cache --------------------------------------------------------------------------------------
    def _prepare_cache(self, batch: int, length: int):
        """A static cache of [batch, length], reused (reset) while the shape holds so compiled code stays valid."""
        from transformers import StaticCache

        if self._cache_shape != (batch, length):
            self.cache = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.cache = StaticCache(config=self.config, max_cache_len=length)
            self._cache_shape = (batch, length)
        else:
            self.cache.reset()
        return self.cache

    def _write_shared(self, shared: torch.Tensor, batch: int) -> None:
        """Copy the shared head's keys and values (computed at batch 1) into every row of the cache.

        They depend only on the head's embeddings and the frozen LLM, so they are computed once and kept
        while the same head comes back (it is the same system prompt in every call of a run).
        """
        from transformers import DynamicCache

        if self._shared_head is None or not torch.equal(self._shared_head[0], shared):
            head_cache = DynamicCache(config=self.config)
            self.language_model(inputs_embeds=shared, cache=head_cache, use_cache=True)
            self._shared_head = (shared.clone(), [(layer.keys, layer.values) for layer in head_cache.layers])
        for index, (keys, values) in enumerate(self._shared_head[1]):  # [1, heads, S, head_dim] each
            self.cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)

    # -- decoding -----------------------------------------------------------------------------------
    def _fit_rows(self, rows: torch.Tensor, length: int, max_new_tokens: int) -> torch.Tensor:
        """The rows [B, T, H], checked to fit the model's positions at ``length``; padded (by repeating the first
        row) to the compiled batch when a smaller one comes at the compiled length (the last batch of a run), so
        that no other shape is compiled."""
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {length - max_new_tokens} positions + {max_new_tokens} new tokens exceeds the "
                f"model's {self.config.max_position_embeddings} positions"
            )
        batch = rows.shape[0]
        if self.compile and self._cache_shape is not None:
            compiled_batch, compiled_length = self._cache_shape
            if batch < compiled_batch and length == compiled_length:
                rows = torch.cat([rows, rows[:1].expand(compiled_batch - batch, -1, -1)])
        return rows

    @torch.no_grad()
    def generate(
        self,
        shared: torch.Tensor,
        rows: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int = 0,
        min_new_tokens: int = 0,
        profile: bool = False,
    ) -> torch.Tensor:
        """Token ids [B, <= max_new_tokens] after the prompt; rows that ended carry ``pad_token_id``.

        Args:
            shared: [S, H] embeddings every row starts with.
            rows: [B, T, H] the rest of each row's prompt (no padding: all rows have length T).
            temperature: None decodes greedily; otherwise samples from softmax(logits / temperature),
                restricted to the top-p nucleus when ``top_p`` is set, with a generator seeded by ``seed``.
            min_new_tokens: EOS is forbidden before this many tokens (as ``generate``'s option).
            profile: synchronise around each part and fill :attr:`timings`.
        """
        batch = rows.shape[0]
        length = shared.shape[0] + rows.shape[1] + max_new_tokens
        rows = self._fit_rows(rows, length, max_new_tokens)
        width = rows.shape[0]
        timings = DecodeTimings()
        clock = _Clock(profile, self.device)
        dtype = self.dtype
        cache = self._prepare_cache(width, length)
        self._write_shared(shared.to(self.device, dtype).unsqueeze(0), width)
        timings.shared = clock.lap()
        logits = self._prefill(rows.to(self.device, dtype), cache, shared.shape[0] + rows.shape[1])
        timings.prefill = clock.lap()

        generator = None
        if temperature is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        finished = torch.zeros(width, dtype=torch.bool, device=self.device)
        eos = torch.tensor([eos_token_id], device=self.device)
        tokens = []
        for step in range(max_new_tokens):
            if step < min_new_tokens:  # out of place: on a GPU the logits are the captured graph's output
                logits = logits.index_fill(1, eos, -torch.inf)
            chosen = _choose(logits, temperature, top_p, generator)
            chosen = torch.where(finished, torch.full_like(chosen, pad_token_id), chosen)
            tokens.append(chosen)
            finished |= chosen == eos_token_id
            if step + 1 == max_new_tokens or (step % 8 == 7 and bool(finished[:batch].all())):
                break
            if self.compile:
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(chosen.unsqueeze(1), cache)
        timings.decode = clock.lap()
        timings.steps = len(tokens)
        self.timings = timings
        return torch.stack(tokens, dim=1)[:batch]


def _choose(
    logits: torch.Tensor, temperature: float | None, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy argmax, or a seeded draw from the temperature-scaled (and nucleus-filtered) distribution."""
    if temperature is None:
        return logits.argmax(dim=-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


class _Clock:
    """Lap times that synchronise the device only when profiling."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.last = self._now()

    def _now(self) -> float:
        if self.enabled and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        if not self.enabled:
            return 0.0
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


@dataclass(frozen=True)
class DecodingOptions:
    """How captions are decoded; saved next to every set of predictions.

    ``sample`` with temperature 0.2 is what the original ran (unseeded); here sampling is always seeded.
    """

    strategy: str = "greedy"  # greedy | beam | sample
    max_new_tokens: int = 64
    num_beams: int = 4  # beam only
    temperature: float = 0.2  # sample only
    top_p: float | None = None  # sample only
    seed: int = 0
    # "dali": our engine (dali.models.decoding: the shared prompt head prefilled once, static KV cache, prefill
    # compiled and decode graph-captured on a GPU); "generate": transformers' generate with its growing cache;
    # "generate-static": generate with a static cache. Beam search always runs through generate.
    engine: str = "dali"
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens (benchmarks decode a fixed length)

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding strategy must be greedy, beam or sample, got '{self.strategy}'")
        for name in ("max_new_tokens", "num_beams", "temperature", "seed", "min_new_tokens", "top_p"):
            problem = getattr(self, name) is not None and number_problem(name, getattr(self, name))
            if problem:  # the bounds every command's flags have (dali.limits.BOUNDS), for the Python API too
                raise ValueError(f"decoding option {name} {problem}")
        if self.engine not in DECODING_ENGINES:
            raise ValueError(f"decoding engine must be one of {DECODING_ENGINES}, got '{self.engine}'")

    def generate_kwargs(self) -> dict:
        """Keyword arguments of transformers' ``generate`` for these options."""
        kwargs = {"cache_implementation": "static"} if self.engine == "generate-static" else {}
        kwargs["min_new_tokens"] = self.min_new_tokens
        if self.strategy == "greedy":
            return kwargs | {"do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return kwargs | {"do_sample": False, "num_beams": self.num_beams}
        kwargs |= {"do_sample": True, "num_beams": 1, "temperature": self.temperature, "top_k": 0}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs
