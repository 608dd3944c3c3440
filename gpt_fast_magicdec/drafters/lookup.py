"""Prompt lookup (n-gram) drafting: no model pass; the draft is copied from the text itself.

For each sequence it matches the last n tokens (n = config.ngram, then shorter, down to
config.ngram_min) against every earlier position of the prompt and the text generated so far, and
proposes the gamma tokens that followed the most recent match. It pays where the output repeats its context: summaries, code
edits, extraction, "repeat the paragraph that begins ...". A sequence with no match proposes
nothing that round (acceptance 0; verification still emits the target's next token).

Everything is fixed-shape tensor work on the device over DecodeState.tokens [B, S], the slots'
whole token history, so it runs inside the one-sync-per-round loop like the model drafters.
"""
from __future__ import annotations

import torch

from ..errors import ParameterError
from .base import Drafter, Proposal


class LookupDrafter(Drafter):
    @classmethod
    def check(cls, config) -> None:
        if config.ngram < 1:
            raise ParameterError(f"{{ngram}} must be >= 1, got {config.ngram}")
        if not 1 <= config.ngram_min <= config.ngram:
            raise ParameterError(f"{{ngram_min}} must be between 1 and {{ngram}} ({config.ngram}), got {config.ngram_min}")

    def propose(self, state, gamma, sampling) -> Proposal:
        history, last = state.tokens, state.cache_len  # [B, S]; known positions are 0..last[b]
        B, S = history.shape
        start = torch.full_like(last, -1)  # [B] where the proposal's tokens start (-1: no match yet)
        for n in range(self.config.ngram, self.config.ngram_min - 1, -1):  # the longest n-gram that matches wins
            found = most_recent_match(history, last, n)  # [B] position after the match, or -1
            start = torch.where(start < 0, found, start)
        # Only known tokens are proposed: positions start .. last (never past the history's end).
        count = torch.where(start >= 0, (last - start + 1).clamp(0, gamma), 0)  # [B]
        at = (start.clamp(min=0)[:, None] + torch.arange(gamma, device=history.device)).clamp(max=S - 1)
        return Proposal(history.gather(1, at), probs=None, count=count)  # q: one-hot at the copied token


def most_recent_match(history: torch.Tensor, last: torch.Tensor, n: int) -> torch.Tensor:
    """For each row of history [B, S] whose known tokens end at position last [B]: the position
    right after the most recent earlier occurrence of its last n tokens, or -1 -> [B]."""
    B, S = history.shape
    if S <= n:
        return torch.full_like(last, -1)
    offsets = torch.arange(n, device=history.device)
    suffix = history.gather(1, (last[:, None] - n + 1 + offsets).clamp(min=0))  # [B, n]
    windows = history.unfold(1, n, 1)  # [B, S - n + 1, n]: windows[b, j] = history[b, j:j+n]
    starts = torch.arange(S - n + 1, device=history.device)  # [S - n + 1]
    # An earlier occurrence ends before the suffix does (j + n - 1 < last) and the suffix exists.
    earlier = (starts[None, :] + n - 1 < last[:, None]) & (last[:, None] >= n - 1)
    hit = (windows == suffix[:, None, :]).all(dim=-1) & earlier  # [B, S - n + 1]
    best = torch.where(hit, starts[None, :], -1).amax(dim=1)  # [B] the most recent start
    return torch.where(best >= 0, best + n, -1)
