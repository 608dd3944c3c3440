"""Logits -> probabilities -> tokens. No host synchronisation anywhere (CUDA-graph friendly)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. The same warps apply to draft and target distributions, which
    speculative sampling needs for its output to follow the (warped) target distribution."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # nan would make every probability nan: token 0 forever
            raise UserError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> warped probabilities [..., V] in fp32 (temperature, top-k, top-p)."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of probs [..., V] -> [...]. argmax(p / Exp(1)) is an exact draw from
    p (the exponential race) and, unlike torch.multinomial, never syncs with the host."""
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1)


def select_tokens(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """logits [..., V] -> (tokens [...], probs [..., V] or None when greedy)."""
    if params.greedy:
        return logits.argmax(dim=-1), None
    probs = logits_to_probs(logits, params)
    return sample_from_probs(probs), probs
