"""DALI's attentive token weights for OT (the 'Att' in DALI-OT^Att)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class TokenWeights(NamedTuple):
    audio: torch.Tensor  # [B, N], rows sum to 1
    image: torch.Tensor  # [B, M], rows sum to 1
    entropy: torch.Tensor  # [B], H(audio) + H(image) in nats


def categorical_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of [B, K] probabilities -> [B] (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


class AttentiveTokenWeights(nn.Module):
    """Token weights from cross-attention, as in the original (parameter names kept so released weights load).

    Audio-token weights: ``image_scorer(query=a_q(A), key=i_k(V), value=i_v(V))`` gives an output vector per
    audio token; its mean over features, divided by ``temperature``, is soft-maxed over the tokens and mixed
    half and half with uniform. Image-token weights likewise with ``audio_scorer(i_q(V), a_k(A), a_v(A))``.
    (The score is the mean of the attention *output*, not an attention probability: the original's choice.)
    """

    def __init__(self, dim: int = 1024, num_heads: int = 8, temperature: float = 20.0, uniform_mix: float = 0.5):
        super().__init__()
        self.temperature = temperature
        self.uniform_mix = uniform_mix
        self.audio_scorer = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.image_scorer = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        for name in ("a_q", "a_k", "a_v", "i_q", "i_k", "i_v"):
            setattr(self, name, nn.Linear(dim, dim))

    def _weights(self, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        return (1 - self.uniform_mix) * probs + self.uniform_mix / scores.shape[-1]

    def forward(self, audio_tokens: torch.Tensor, image_tokens: torch.Tensor) -> TokenWeights:
        """[B, N, D] audio and [B, M, D] image tokens -> weights [B, N], [B, M] and entropy [B]."""
        audio_out, _ = self.image_scorer(
            self.a_q(audio_tokens), self.i_k(image_tokens), self.i_v(image_tokens), need_weights=False
        )  # [B, N, D]
        image_out, _ = self.audio_scorer(
            self.i_q(image_tokens), self.a_k(audio_tokens), self.a_v(audio_tokens), need_weights=False
        )  # [B, M, D]
        audio_weights = self._weights(audio_out.mean(-1))
        image_weights = self._weights(image_out.mean(-1))
        entropy = categorical_entropy(audio_weights) + categorical_entropy(image_weights)
        return TokenWeights(audio_weights, image_weights, entropy)
