"""LLaVA as an audio captioner: transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5, the paper's) or
``LlavaNextForConditionalGeneration`` or ``LlavaOnevisionForConditionalGeneration`` with DALI's token layout.

LLaVA-1.5's LLM sees its v1 conversation with a multimodal block at the ``<image>`` place:

    BOS "<system> USER: " [block] "\\nDescribe the sound that can be heard in this scene. ASSISTANT:" answer EOS

(the others': their own chat template, the block at its image token), where the block is image: [image tokens];
audio: [audio tokens]; audio_vis: [image tokens, audio tokens], each optionally followed by the learned prefix
embeddings. Image tokens are CLIP's penultimate-layer patch tokens through LLaVA's projector; audio tokens come
from the aligned encoder (already in CLIP's space) through LLaVA's projector or a distilled copy of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from dali.constants import CONV_MODES
from dali.errors import ModelLoadError
from dali.models.checkpoints import strict_from_pretrained
from dali.models.decoding import DecodingOptions, StaticDecoder
from dali.models.vision_tower import base_image_processor, patch_tokens, preprocess_images

QUESTION = "Describe the sound that can be heard in this scene."
IGNORE_INDEX = -100
MAX_ANSWER_TOKENS = 256  # longer training captions are cut: a runaway caption must not blow the context
# transformers' class of each LLaVA family whose image tokens are one projector over one vision tower's patch
# tokens (docs/extending.md): LLaVA-1.5, and LLaVA-NeXT and LLaVA-OneVision read through their base image only (no
# tiles for audio).
FAMILIES = {  # model_type -> (config class, model class)
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
}
QUESTION_SLOT = "{question}"


@dataclass(frozen=True)
class Prompt:
    """The text around the modality block: [BOS?] ``head`` [block] ``tail`` (with the question in its slot), then
    the answer."""

    head: str
    tail: str
    bos: bool = True  # the tokenizer adds BOS before the head
    # A chat template's image token: the prompt is then tokenised whole around it, as the model's processor does;
    # None: piece by piece, as the original's ``tokenizer_image_token`` tokenises LLaVA-1.5's conversation.
    image_token: str | None = None

    def after(self, question: str) -> str:
        return self.tail.replace(QUESTION_SLOT, question)

    @classmethod
    def llava_v1(cls, system_prompt: str) -> "Prompt":
        """LLaVA-1.5's conversation, as the original wrote it (its v1 and llava_v1 modes)."""
        return cls(f"{system_prompt} USER: ", f"\n{QUESTION_SLOT} ASSISTANT:")

    @classmethod
    def from_chat_template(cls, owner, image_token: str, bos_token: str | None) -> "Prompt":
        """A user turn of [image, question] rendered by the chat template of ``owner`` (the model's processor or
        tokenizer), cut at its image token."""
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION_SLOT}]}]
        text = owner.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        if text.count(image_token) != 1 or text.count(QUESTION_SLOT) != 1:
            raise ModelLoadError(f"the chat template does not place one {image_token} and the question: {text!r}")
        head, tail = text.split(image_token)
        bos = bos_token or ""
        starts = bool(bos) and head.startswith(bos)  # the tokenizer adds that BOS itself
        return cls(head[len(bos) :] if starts else head, tail, starts, image_token)


class Captioner(nn.Module):
    """A frozen LLaVA-1.5 with helpers to build DALI's inputs, train against captions and decode.

    Attributes:
        llava: the ``LlavaForConditionalGeneration``.
        tokenizer, image_processor: loaded from the same folder or hub id.
    """

    def __init__(
        self, llava: nn.Module, tokenizer, image_processor, source: str = "", conv_mode: str = "v1", prompt=None
    ):
        super().__init__()
        if conv_mode not in CONV_MODES:
            raise ValueError(f"conversation mode must be one of {sorted(CONV_MODES)}, got '{conv_mode}'")
        self.conv_mode = conv_mode
        self.prompt = prompt or Prompt.llava_v1(CONV_MODES[conv_mode])  # others: their own chat template
        self.llava = llava
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self._text_cache: dict[str, list[int]] = {}
        self._decoder: StaticDecoder | None = None

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = "sdpa",
        conv_mode: str = "v1",
    ) -> "Captioner":
        """Load a LLaVA in Hugging Face format (hub id such as ``llava-hf/llava-1.5-7b-hf`` or a local folder):
        LLaVA-1.5 with the original's conversation (``conv_mode``), LLaVA-NeXT and LLaVA-OneVision with their own
        chat template."""
        import transformers
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        source = str(name_or_path)
        try:
            config = AutoConfig.from_pretrained(source)
            family = config.model_type
            if family not in FAMILIES:
                raise ModelLoadError(f"'{source}' is a {family} model; --llava takes {sorted(FAMILIES)}")
            llava = strict_from_pretrained(
                getattr(transformers, FAMILIES[family][1]),
                source,
                "the LLaVA captioner",
                dtype=dtype,
                attn_implementation=attn_implementation,
            )
            tokenizer = AutoTokenizer.from_pretrained(source)
            _check_image_token(tokenizer, llava.config.image_token_id)
            image_processor = base_image_processor(source, config)  # (the base image: tiles are not used)
            prompt = None if family == "llava" else _chat_prompt(source, tokenizer, llava.config.image_token_id)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the LLaVA captioner from '{source}': {error}") from None
        llava.requires_grad_(False)
        return cls(llava.to(device).eval(), tokenizer, image_processor, source, conv_mode, prompt)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.llava.config.text_config.hidden_size

    @property
    def vision_dim(self) -> int:
        return self.llava.config.vision_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        config = self.llava.config.vision_config
        return (config.image_size // config.patch_size) ** 2

    @property
    def device(self) -> torch.device:
        return self.llava.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llava.lm_head.weight.dtype

    @property
    def precision(self) -> str:
        """The ``--dtype`` it runs in: its dtype's name, or float8 where its LLM's linear layers were made float8
        (the LM head, which gives :attr:`dtype`, stays bfloat16 then)."""
        layer = self.llava.model.language_model.layers[0].self_attn.q_proj.weight
        return "float8" if type(layer) is not nn.Parameter else str(self.dtype).removeprefix("torch.")

    @property
    def projector(self) -> nn.Module:
        """LLaVA's own multimodal projector (``linear_1``, ``act``, ``linear_2``)."""
        return self.llava.model.multi_modal_projector

    def copy_projector(self) -> nn.Module:
        """A trainable float32 copy of LLaVA's projector, the starting point of distillation."""
        projector = copy.deepcopy(self.projector).float()
        return projector.requires_grad_(True)

    # -- images --------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel values [B, 3, S, S] (pad to square, CLIP resize + crop + normalise)."""
        return preprocess_images(self.image_processor, images)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens as the LLaVA uses them (LLaVA-1.5: CLIP layer -2, CLS dropped). [B, 3, S, S] -> [B, P, D]."""
        config = self.llava.config
        return patch_tokens(
            self.llava.model.vision_tower,
            pixel_values,
            config.vision_feature_layer,
            config.vision_feature_select_strategy,
        )

    # -- inputs --------------------------------------------------------------------------------------
    def modality_block(
        self,
        image_tokens: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        audio_projector: nn.Module | None = None,
        image_projector: nn.Module | None = None,
    ) -> torch.Tensor:
        """Embeddings inserted at the ``<image>`` place: [image?, audio?, prefix?] -> [B, K, hidden].

        Args:
            image_tokens: [B, P, vision_dim] CLIP patch tokens.
            audio_tokens: [B, N, vision_dim] aligned audio tokens (after the encoder's ``proj``).
            prefix: [L, hidden] learned prefix, appended after the modality tokens.
            audio_projector / image_projector: projector for each modality (LLaVA's own by default).
        """
        parts = []
        if image_tokens is not None:
            parts.append(_apply(image_projector or self.projector, image_tokens))
        if audio_tokens is not None:
            parts.append(_apply(audio_projector or self.projector, audio_tokens))
        if not parts:
            raise ValueError("a modality block needs image tokens, audio tokens or both")
        batch = parts[0].shape[0]
        if prefix is not None:
            parts.append(prefix.to(self.device).unsqueeze(0).expand(batch, -1, -1))
        return torch.cat([part.to(self.dtype) for part in parts], dim=1)

    def _ids(self, text: str, bos: bool = False) -> list[int]:
        key = ("B" if bos else "-") + text
        if key not in self._text_cache:
            self._text_cache[key] = self.tokenizer(text, add_special_tokens=bos)["input_ids"]
        return self._text_cache[key]

    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt before and after the block. A chat template's prompt is tokenised as its
        processor tokenises it: the rendered text whole (its BOS written out), cut at the image token after. Cut
        before, a SentencePiece tokenizer would mark the start of each piece (``legacy=False``) where the whole
        text has none."""
        after = self.prompt.after(question)
        image_token = self.prompt.image_token
        if image_token is None:
            return self._ids(self.prompt.head, bos=self.prompt.bos), self._ids(after)
        bos = self.tokenizer.bos_token if self.prompt.bos else ""
        ids = self._ids(bos + self.prompt.head + image_token + after)
        cut = ids.index(self.tokenizer.convert_tokens_to_ids(image_token))
        return ids[:cut], ids[cut + 1 :]

    def _answer_ids(self, after: str, caption: str) -> list[int]:
        """Token ids of the answer, tokenised together with the text before it (as LLaVA masks by length)."""
        joint = self.tokenizer(f"{after} {caption}", add_special_tokens=False)["input_ids"]
        head = self._ids(after)
        answer = joint[len(head) :] if joint[: len(head)] == head else self._ids(f" {caption}")
        if len(answer) >= MAX_ANSWER_TOKENS:
            return answer[:MAX_ANSWER_TOKENS]  # cut: no EOS, the caption did not end there
        return answer + [self.tokenizer.eos_token_id]

    def build_inputs(
        self, block: torch.Tensor, captions: Sequence[str] | None = None, question: str = QUESTION
    ) -> dict[str, torch.Tensor]:
        """Full input embeddings around a modality block.

        Args:
            block: [B, K, hidden] from :meth:`modality_block`.
            captions: answers to train on (labels cover only them and EOS); None builds generation prompts.
        Returns:
            ``inputs_embeds`` [B, T, hidden], ``attention_mask`` [B, T] and, with captions, ``labels`` [B, T].
            Training batches are right-padded; generation prompts are left-padded.
        """
        batch = block.shape[0]
        before, after = self._prompt_ids(question)
        after_text = self.prompt.after(question)
        answers = [self._answer_ids(after_text, caption) for caption in captions] if captions is not None else None
        if answers is not None and len(answers) != batch:
            raise ValueError(f"got {len(answers)} captions for a block of batch {batch}")
        embed = self.llava.get_input_embeddings()
        device = self.device
        before_embeds = embed(torch.tensor(before, device=device)).unsqueeze(0).expand(batch, -1, -1)
        tail_ids = [after + (answers[i] if answers else []) for i in range(batch)]
        width = max(len(ids) for ids in tail_ids)
        tails = torch.full((batch, width), self._pad_id, dtype=torch.long, device=device)
        tail_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for i, ids in enumerate(tail_ids):
            tails[i, : len(ids)] = torch.tensor(ids, device=device)
            tail_mask[i, : len(ids)] = 1
        embeds = torch.cat([before_embeds, block.to(device), embed(tails)], dim=1)
        head_len = len(before) + block.shape[1]
        mask = torch.cat([torch.ones((batch, head_len), dtype=torch.long, device=device), tail_mask], dim=1)
        result = {"inputs_embeds": embeds, "attention_mask": mask}
        if answers is not None:
            labels = torch.full_like(mask, IGNORE_INDEX)
            for i, answer in enumerate(answers):
                start = head_len + len(after)
                labels[i, start : start + len(answer)] = torch.tensor(answer, device=device)
            result["labels"] = labels
        elif width != len(after):  # only when questions differ; move padding to the left for generation
            result = _left_pad(result)
        return result

    # -- training ------------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LLM's activations in backward; gradients still reach the prefix or projector copy."""
        self.llava.model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        self.llava.model.language_model.train()  # checkpointing is active in train mode only (no dropout here)

    def caption_loss(
        self, block: torch.Tensor, captions: Sequence[str], question: str = QUESTION, reduction: str = "mean"
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy over the answer tokens of a batch (LLaVA's masking).

        The LM head runs only at the answer positions (a [tokens, vocab] slice instead of [B, T, vocab]), and
        the prompt's head, the same in every row, runs once (:meth:`_hidden_after_head`).
        ``reduction="sum"`` returns (sum, number of answer tokens), so that processes can normalise by the
        token count of the whole global batch, as one process would.
        """
        inputs = self.build_inputs(block, captions, question=question)
        labels = inputs.pop("labels")
        head = len(self._prompt_ids(question)[0]) if self._shares_head(block.shape[0]) else 0
        hidden = self._hidden_after_head(inputs, head)  # [B, T - head, H]
        total, count = self._answer_loss_sum(hidden, labels[:, head + 1 :])  # the head holds no answer token
        return total / count.clamp_min(1) if reduction == "mean" else (total, count)

    def _answer_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of the answer tokens and their number, from hidden states [B, T, H] and the labels
        [B, T - 1] of the positions after the first (each position predicts the next; the LM head runs only at
        the answer positions, a [tokens, vocab] slice instead of [B, T, vocab])."""
        answer = targets != IGNORE_INDEX
        logits = self.llava.lm_head(hidden[:, :-1][answer]).float()  # [tokens, vocab]
        return torch.nn.functional.cross_entropy(logits, targets[answer], reduction="sum"), answer.sum()

    def _shares_head(self, batch: int) -> bool:
        """Whether the head can run once for the batch: transformers turns the cache off under gradient
        checkpointing, so the head then runs in every row."""
        return batch > 1 and not self.llava.model.language_model.is_activation_checkpointing

    def _hidden_after_head(self, inputs: dict[str, torch.Tensor], head: int) -> torch.Tensor:
        """The LLM's last hidden states [B, T - head, H] of the positions after the first ``head``.

        The first ``head`` positions (BOS, system prompt, "USER: ") are the same in every row of a batch built by
        :meth:`build_inputs` (right-padded): they run once, in one row, and every row attends to their keys and
        values, whose gradients add up over the rows. The loss and gradients are those of running the head in
        each row, to rounding; the head is a quarter of a synthetic-world sequence and most of a text-only one.
        """
        if head == 0:
            return self.llava.model(**inputs, use_cache=False).last_hidden_state
        embeds = inputs["inputs_embeds"]
        cache = self._head_cache(embeds[:1, :head], embeds.shape[0])
        output = self.llava.model.language_model(
            inputs_embeds=embeds[:, head:], attention_mask=inputs["attention_mask"], cache=cache, use_cache=True
        )
        return output.last_hidden_state

    def _head_cache(self, head: torch.Tensor, rows: int):
        """The keys and values of ``head`` [1, S, hidden], run once, repeated for ``rows`` rows."""
        from transformers import DynamicCache

        language_model = self.llava.model.language_model
        cache = DynamicCache(config=language_model.config)
        language_model(inputs_embeds=head, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(rows)
        return cache

    def answers_loss(
        self, block: torch.Tensor, questions: Sequence[str], answers: Sequence[Sequence[str]]
    ) -> torch.Tensor:
        """Next-token cross-entropy over the answer tokens of several answers to each row of ``block``: the loss
        of :meth:`caption_loss` on the B x Q rows that ask each row every question, to rounding. The prompt's
        head runs once and each row's block once; the row's Q continuations (question and answer) attend to its
        keys and values, whose gradients add up over them.

        Args:
            block: [B, K, hidden] from :meth:`modality_block`.
            questions: Q questions whose prompts share their text before the block.
            answers: Q lists of B answers, ``answers[q]`` to ``questions[q]``.
        """
        if len(questions) != len(answers):
            raise ValueError(f"got {len(answers)} lists of answers for {len(questions)} questions")
        heads = {tuple(self._prompt_ids(question)[0]) for question in questions}
        if len(heads) > 1 or self.llava.model.language_model.is_activation_checkpointing:
            sums = [self.caption_loss(block, rows, q, reduction="sum") for q, rows in zip(questions, answers)]
            return sum(total for total, _ in sums) / sum(count for _, count in sums).clamp_min(1)
        built = [self.build_inputs(block, rows, question=q) for q, rows in zip(questions, answers)]
        head = len(next(iter(heads)))
        shared = head + block.shape[1]
        prefix = built[0]["inputs_embeds"][:, :shared]  # the same in every question's rows
        cache = self._head_cache(prefix[:1, :head], block.shape[0])
        language_model = self.llava.model.language_model
        ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        language_model(inputs_embeds=prefix[:, head:], attention_mask=ones, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(questions))
        tails = {key: _interleave([b[key][:, shared:] for b in built], fill) for key, fill in _TAIL_FILL.items()}
        mask = torch.cat([ones.repeat_interleave(len(questions), 0), tails["attention_mask"]], dim=1)
        hidden = language_model(
            inputs_embeds=tails["inputs_embeds"], attention_mask=mask, cache=cache, use_cache=True
        ).last_hidden_state  # [B * Q, W, H]
        # the block's last position predicts a question's token, never an answer's
        total, count = self._answer_loss_sum(hidden, tails["labels"][:, 1:])
        return total / count.clamp_min(1)

    # -- decoding ------------------------------------------------------------------------------------
    def prompt_parts(self, block: torch.Tensor, question: str = QUESTION) -> tuple[torch.Tensor, torch.Tensor]:
        """A generation prompt split into the head every row shares and the rest of each row.

        Returns:
            shared [S, hidden] (BOS, system prompt, "USER: ") and rows [B, K + Q, hidden] (the block, then the
            question and "ASSISTANT:"); concatenated they are :meth:`build_inputs`' prompt, without padding.
        """
        embed = self.llava.get_input_embeddings()
        before, after = (torch.tensor(ids, device=self.device) for ids in self._prompt_ids(question))
        shared, after = embed(before), embed(after)
        rows = torch.cat([block.to(self.device, self.dtype), after.unsqueeze(0).expand(block.shape[0], -1, -1)], 1)
        return shared, rows

    @property
    def decoder(self) -> StaticDecoder:
        """Our decoding engine, built on first use (it keeps its KV cache and compiled code between calls)."""
        if self._decoder is None:
            self._decoder = StaticDecoder(self.llava)
        return self._decoder

    def release_decoder(self) -> None:
        """Drop the engine and its KV cache (memory for something else); the next call builds a new one."""
        if self._decoder is not None:
            self._decoder.close()
        self._decoder = None

    @torch.no_grad()
    def generate(
        self, block: torch.Tensor, options: DecodingOptions = DecodingOptions(), question: str = QUESTION
    ) -> list[str]:
        """Decode one caption per row of a [B, K, hidden] modality block."""
        if options.engine == "dali" and options.strategy != "beam":
            shared, rows = self.prompt_parts(block, question)
            output = self.decoder.generate(
                shared,
                rows,
                max_new_tokens=options.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self._pad_id,
                temperature=options.temperature if options.strategy == "sample" else None,
                top_p=options.top_p,
                seed=options.seed,
                min_new_tokens=options.min_new_tokens,
            )
        else:
            inputs = self.build_inputs(block, question=question)
            kwargs = dict(
                max_new_tokens=options.max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self._pad_id,
                **options.generate_kwargs(),
            )
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(options.seed)
                output = self.llava.generate(**inputs, **kwargs)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [" ".join(text.replace("\n", " ").split()) for text in texts]

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def _check_image_token(tokenizer, image_token_id: int) -> None:
    """The config's image token must be one the tokenizer added (``<image>``), never an ordinary word: the chat
    template is split at it, and a word there would put the block in the middle of the prompt's text."""
    added = {index: str(token) for index, token in tokenizer.added_tokens_decoder.items()}
    if image_token_id in added:
        return
    word = tokenizer.convert_ids_to_tokens(image_token_id) if 0 <= image_token_id < len(tokenizer) else None
    named = sorted(f"{token!r} (id {index})" for index, token in added.items() if "image" in token.lower())
    raise ModelLoadError(
        f"its config and its tokenizer disagree about the image token: config.json's image_token_index "
        f"{image_token_id} is {'the ordinary token ' + repr(word) if word is not None else 'outside the vocabulary'}"
        f" of its tokenizer; the tokenizer's added image tokens: {', '.join(named) or 'none'}"
    )


def _chat_prompt(source: str, tokenizer, image_token_id: int) -> Prompt:
    """The prompt of a model that ships a chat template (with its processor, else with its tokenizer)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, ImportError):
        processor = None
    owner = processor if getattr(processor, "chat_template", None) else tokenizer
    if not getattr(owner, "chat_template", None):
        raise ModelLoadError(f"'{source}' ships no chat template to place the image and the question")
    return Prompt.from_chat_template(owner, tokenizer.convert_ids_to_tokens(image_token_id), tokenizer.bos_token)


def _apply(projector: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A projector on tokens moved to its device and dtype (encoders and projector copies may differ)."""
    weight = next(projector.parameters())
    return projector(tokens.to(weight.device, weight.dtype))


# What a continuation is padded with on the right: embeddings of nothing, no attention, no label.
_TAIL_FILL = {"inputs_embeds": 0.0, "attention_mask": 0, "labels": IGNORE_INDEX}


def _interleave(parts: list[torch.Tensor], fill) -> torch.Tensor:
    """Q tensors [B, W_q, ...] right-padded with ``fill`` to the widest and interleaved by row: [B * Q, W, ...],
    row ``b * Q + q`` from ``parts[q][b]``."""
    width = max(part.shape[1] for part in parts)
    padded = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]), value=fill) for p in parts]
    return torch.stack(padded, dim=1).flatten(0, 1)


def _left_pad(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's padding from the right end to the left end (generation continues from the right)."""
    embeds, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, then tokens in their order
    return {
        "inputs_embeds": torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds)),
        "attention_mask": torch.gather(mask, 1, order),
    }
