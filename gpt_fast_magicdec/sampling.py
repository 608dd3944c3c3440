"""Logits -> probabilities -> tokens, with random numbers that belong to a sequence, not a batch.

No host synchronisation anywhere (CUDA-graph friendly).

Every random draw is a pure function of (the sequence's key, the position the draw is about, what
it is for), computed by a counter-based generator (splitmix64 on int64 tensors) instead of torch's
global generator. The key is derived from the run's seed and the prompt's index in its job, so a
sampled completion depends on the seed, the prompt, its index and the options, and on nothing
else: not on the batch it ran in, its slot, the prompts beside it, when it was refilled, how many
replicas or tensor-parallel ranks served the job, or whether the job was resumed. Speculative
sampling stays exact: every position's draws decide its token once, in the round that commits it;
draws made for a position in an earlier round whose drafts were rejected before it influenced
nothing, so reusing them is as good as fresh.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .errors import ParameterError

# What a draw is for: one independent stream of numbers per purpose at every position.
DRAFT_STREAM = 1  # a draft token, from the draft's distribution q
ACCEPT_STREAM = 2  # accept a draft token with probability min(1, p / q)
TARGET_STREAM = 3  # the target's own token: after prefill, a correction or bonus, plain decoding

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: splitmix64's increment
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _int64(x: int) -> int:
    """A Python int wrapped to int64's range, as the tensor arithmetic wraps it."""
    return (x + 2**63) % 2**64 - 2**63


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: int64 -> well-mixed int64 (multiplication wraps modulo 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def sequence_keys(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """The random key of each sequence [B] int64: its prompt's index in the job, under `seed`."""
    return _mix(_mix(torch.full_like(indices, seed)) + indices * _GOLDEN)


def uniform(keys: torch.Tensor, positions: torch.Tensor, stream: int, width: Optional[int] = None) -> torch.Tensor:
    """Uniform numbers in (0, 1), float32: one per (keys [B], positions [B, ...]) -> [B, ...], or
    `width` of them per position -> [B, ..., width] (one per vocabulary entry for an exponential race)."""
    keys = keys.view(keys.shape + (1,) * (positions.dim() - 1))
    base = _mix(_mix(keys + _int64(stream * _GOLDEN)) + positions * _GOLDEN)  # [B, ...]
    if width is not None:
        counter = torch.arange(1, width + 1, device=positions.device) * _GOLDEN  # [width]
        base = _mix(base[..., None] + counter)  # [B, ..., width]: splitmix64's stream from `base`
    return (_shift_right(base, 40).float() + 0.5) * 2.0 ** -24  # the top 24 bits, centred: never 0 or 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. The same warps apply to draft and target distributions, which
    speculative sampling needs for its output to follow the (warped) target distribution."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # nan would make every probability nan: token 0 forever
            raise ParameterError(f"{{temperature}} must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ParameterError(f"{{top_k}} must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ParameterError(f"{{top_p}} must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


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


def sample_from_probs(probs: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One token per row of probs [B, ..., V] -> [B, ...], drawn with the sequences' own numbers
    (keys [B], positions [B, ...]). argmax(p / Exp(1)) is an exact draw from p (the exponential
    race) and, unlike torch.multinomial, never syncs with the host."""
    race = -torch.log(uniform(keys, positions, stream, probs.shape[-1]))  # Exp(1) per vocabulary entry
    return torch.argmax(probs / race, dim=-1)


def select_tokens(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor, positions: torch.Tensor,
                  stream: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """logits [B, ..., V] of the tokens at positions [B, ...] -> (tokens [B, ...], probs [B, ..., V]
    or None when greedy)."""
    if params.greedy:
        return logits.argmax(dim=-1), None
    probs = logits_to_probs(logits, params)
    return sample_from_probs(probs, keys, positions, stream), probs
