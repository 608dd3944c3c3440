"""What every KV selection policy provides; see policies/__init__.py for the registry."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ParameterError


class SelectionPolicy:
    """Which cache positions a sparse draft view reads besides its sliding window.

    A policy is stateless: it checks a DraftConfig and names its default window, and after a
    prefill `select` returns the per-layer selected positions the draft's view reads for the
    prefilled rows, or None for the full view. Budget = selected + window keys per query, fixed
    for the run. A dynamic policy also `reselect`s during decoding, from the attention mass a
    verification pass gave every cache position (the drafter asks for it every few rounds)."""

    name: str = ""
    help: str = ""  # one line; the CLI, bench and the acceptance tools show it
    full: bool = False  # True: the draft reads the whole cache (no budget, no window)
    dynamic: bool = False  # True: re-selects from verification's attention mass (reselect)

    def default_window(self, config) -> int:
        raise NotImplementedError

    def check(self, config) -> None:
        """Policy-specific checks of the config (config.view_window is the resolved window)."""

    def smallest_budget(self, config) -> int:
        """The least budget worth clipping a default budget to (drafting.budget_for_context)."""
        raise NotImplementedError

    def select(self, model, config, tokens: torch.Tensor, prompt_len: torch.Tensor, backend: str,
               rows: Optional[torch.Tensor] = None) -> Optional[list]:
        """After `model` prefilled tokens [b, L_max] (prompt_len [b]) into its cache rows `rows` [b]
        (None: rows 0..b-1): per layer [b, H_kv, K] positions (K = config.n_selected, -1 = unused
        slot), or None for the full view."""
        raise NotImplementedError

    def default_reselect(self, gamma: int) -> int:
        """Dynamic policies: rounds between re-selections when the config leaves it open."""
        raise NotImplementedError

    def reselect(self, mass: torch.Tensor, config, cache_len: torch.Tensor) -> torch.Tensor:
        """Dynamic policies: mass [..., B, H, S] fp32 (what verification's queries gave each cache
        position; H KV heads, or 1 when pooled), cache_len [B] committed lengths after the round
        -> positions [..., B, H, K] (K = config.n_selected, -1 = unused slot) for the next drafts."""
        raise NotImplementedError(f"{self.name} selects once, at prefill")

    def validate(self, config) -> None:
        """Check the budget and window of `config`; ParameterError naming the parameters."""
        if config.budget < 1:
            raise ParameterError(f"{{budget}} must be positive, got {config.budget} (a standalone draft reads the "
                                 "whole cache with {kv} 'full')")
        self.check(config)
        window = config.view_window
        if window > config.budget:
            raise ParameterError(f"{{window}} {window} is larger than {{budget}} {config.budget} (the window is "
                                 "part of the budget): lower the window or raise the budget")
        if window < config.gamma:
            raise ParameterError(f"{{budget}} {config.budget} leaves a sliding window of {window} keys, less than "
                                 f"{{gamma}} {config.gamma} (the draft must see its own drafts): raise the budget "
                                 f"to at least {self.selected_name} + gamma = {config.budget - window + config.gamma}")

    selected_name = "selected"  # how the error messages call the non-window part of the budget


def same_positions(batch: int, n_kv_heads: int, positions: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """positions [K] for every sequence, KV head and layer -> n_layers x [B, H_kv, K] (one tensor)."""
    sel = positions.expand(batch, n_kv_heads, positions.shape[0]).contiguous()  # [B, H_kv, K]
    return [sel] * n_layers


def top_positions(scores: torch.Tensor, n_select: int, n_eligible: torch.Tensor, limit: int) -> torch.Tensor:
    """The n_select highest-scoring positions of scores [..., B, H, S], ascending, per row; the
    eligible positions of row b are 0 .. n_eligible[b] - 1 (the others are -inf) -> [..., B, H, n_select].

    A row with fewer eligible positions than slots gives its spare slots to the positions right
    after them, n_eligible[b], n_eligible[b] + 1, ...: the sparse view shows those once they are
    committed and out of its window, so a budget covering the whole context really shows the draft
    everything. Positions >= limit (past the cache) become -1, an unused slot."""
    S = scores.shape[-1]
    k = min(n_select, S)
    top = scores.topk(k, dim=-1)
    # Valid picks first (ascending), then the slots the row cannot fill.
    picks = torch.where(torch.isfinite(top.values), top.indices, S + n_select).sort(dim=-1).values
    picks = F.pad(picks, (0, n_select - k), value=S + n_select)
    slot = torch.arange(n_select, device=scores.device)
    n_valid = n_eligible.clamp(max=k)[:, None, None]  # [B, 1, 1]
    spare = n_eligible[:, None, None] + slot - n_valid
    sel = torch.where(slot < n_valid, picks, spare)
    return torch.where(sel < limit, sel, -1)
