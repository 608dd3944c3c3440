"""Two drafters in a row: the first's proposal where it has one, the second's elsewhere.

`lookup+self`: rows whose text repeats take the free prompt-lookup draft, the others the sparse
self-draft. The second stage still runs for the whole batch (its step shapes are fixed, and a
captured graph cannot skip rows); only its proposals for the rows the first stage served are
thrown away."""
from __future__ import annotations

import torch

from .base import Drafter, Proposal


class ChainDrafter(Drafter):
    def __init__(self, first: Drafter, second: Drafter):
        super().__init__(first.config)
        self.first, self.second = first, second

    def steps(self, greedy):
        return self.first.steps(greedy) + self.second.steps(greedy)

    def prefill(self, rows, tokens, prompt_len, chunk, progress=False) -> None:
        self.first.prefill(rows, tokens, prompt_len, chunk, progress)
        self.second.prefill(rows, tokens, prompt_len, chunk, progress)

    # Only the second stage reads a cache through a view, so only it can re-select.
    def score_buffers(self):
        return self.second.score_buffers()

    def round_scores(self, gamma):
        return self.second.round_scores(gamma)

    def reselect(self, state) -> None:
        self.second.reselect(state)

    def propose(self, state, gamma, sampling) -> Proposal:
        a, b = self.first.propose(state, gamma, sampling), self.second.propose(state, gamma, sampling)
        use_a = a.counts() > 0  # [B]
        tokens = torch.where(use_a[:, None], a.tokens, b.tokens)
        probs = None
        if not sampling.greedy:  # q per row: the stage whose token it is (one-hot for a deterministic one)
            vocab = b.probs.shape[-1] if b.probs is not None else a.probs.shape[-1]
            qa = a.probs if a.probs is not None else torch.nn.functional.one_hot(a.tokens, vocab).float()
            qb = b.probs if b.probs is not None else torch.nn.functional.one_hot(b.tokens, vocab).float()
            probs = torch.where(use_a[:, None, None], qa, qb)
        return Proposal(tokens, probs, torch.where(use_a, a.counts(), b.counts()))
