"""--gamma auto: choose gamma (or plain decoding) from the cost model as generation runs.

Every `every` rounds it re-reads the running acceptance rate and the current context length and
asks the cost model for the gamma with the best predicted speedup; gamma 0 is plain decoding, so
speculation switches itself off where it cannot pay (short context, huge batch) and back on as the
context grows. While decoding plainly no acceptance is observed, so it probes with a short burst of
speculation every `probe_every` rounds to keep the estimate current.
"""
from __future__ import annotations

import torch

from .cost_model import HardwareProfile, alpha_from_tokens_per_round, best_gamma
from .drafting import DraftConfig


class AutoGamma:
    """The gamma of each round, 0 for plain decoding; `choices` is every gamma it may return (the
    engine captures a verification step for each of these and no others). One controller serves
    one job at a time: round 0 of a job restarts its counters."""

    def __init__(self, args, hw: HardwareProfile, draft: DraftConfig, dtype_bytes: int, tp: int = 1,
                 draft_args=None, prior_alpha: float = 0.7, every: int = 8, probe_every: int = 64,
                 max_gamma: int = 8):
        self.args, self.hw, self.draft, self.dtype_bytes, self.tp = args, hw, draft, dtype_bytes, tp
        self.draft_args = draft_args
        self.alpha = prior_alpha
        self.every, self.probe_every = every, probe_every
        # A draft must see its own drafts: gamma never exceeds the sliding window.
        self.gammas = range(1, max_gamma + 1 if draft.full else min(max_gamma, draft.view_window) + 1)
        # Every gamma __call__ can return (0: plain decoding; the probe is gamma 1).
        self.choices = frozenset({0, 1, *self.gammas})
        self.gamma = draft.gamma
        self.since_probe = 0
        self._mark = (0, 0)  # (accepted, sequence-rounds) at the last decision
        self.history: list[tuple[int, int, float, int]] = []  # (round, context, alpha, gamma)

    def __call__(self, state, round_idx: int) -> int:
        if round_idx == 0:  # a new job: its counters start from zero again
            self._mark, self.gamma, self.since_probe = (0, 0), self.draft.gamma, 0
        if round_idx % self.every:
            return self.gamma
        # Every statistic in one device-to-host transfer.
        running_mask = ~state.done
        accepted, seq_rounds, running, context_sum = torch.stack(
            [state.accepted.sum(), state.rounds.sum(), running_mask.sum(),
             torch.where(running_mask, state.cache_len, 0).sum()]).tolist()
        new_rounds = seq_rounds - self._mark[1]
        if self.gamma > 0 and new_rounds > 0:  # gamma was constant since the last decision
            tokens_per_round = 1 + (accepted - self._mark[0]) / new_rounds
            observed = alpha_from_tokens_per_round(self.gamma, tokens_per_round)
            self.alpha = 0.5 * self.alpha + 0.5 * observed  # smooth: windows are short
        self._mark = (accepted, seq_rounds)
        context = context_sum // max(running, 1)  # mean committed length of the running sequences
        budget = -1 if self.draft.full else self.draft.budget  # cost_model's spelling of the full cache
        gamma, _ = best_gamma(self.args, self.hw, max(running, 1), context, min(self.alpha, 0.999), budget,
                              gammas=self.gammas, dtype_bytes=self.dtype_bytes, tp=self.tp,
                              draft_args=self.draft_args, draft_budget=budget if self.draft_args else None,
                              reselect_every=self.draft.reselect_every_at if self.draft.reselects else None)
        self.since_probe = self.since_probe + self.every if gamma == 0 else 0
        if gamma == 0 and self.since_probe >= self.probe_every:
            gamma, self.since_probe = 1, 0  # a short probe to re-measure acceptance
        self.gamma = gamma
        self.history.append((round_idx, context, self.alpha, gamma))
        return gamma
