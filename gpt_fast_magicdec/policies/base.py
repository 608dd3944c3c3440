"""What every KV selection policy provides; see policies/__init__.py for the registry."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserError


class SelectionPolicy:
    """Which cache positions a sparse draft view reads besides its sliding window.

    A policy is stateless: it checks a DraftConfig (filling in its default window), and after
    prefill `select` returns the per-layer selected positions the draft's view reads, or None for
    the full view. Budget = selected + window keys per query, fixed for the run."""

    name: str = ""
    help: str = ""  # one line; the CLI, bench and the acceptance tools show it
    full: bool = False  # True: the draft reads the whole cache (no budget, no window)

    def default_window(self, config) -> int:
        raise NotImplementedError

    def check(self, config) -> None:
        """Policy-specific checks, run after the window default is filled in."""

    def smallest_budget(self, config) -> int:
        """The least budget worth clipping a default budget to (drafting.budget_for_context)."""
        raise NotImplementedError

    def select(self, model, config, tokens: torch.Tensor, prompt_len: torch.Tensor,
               backend: str) -> Optional[list]:
        """After `model` prefilled tokens [B, L_max] (prompt_len [B]): per layer [B, H_kv, K]
        positions (K = config.n_selected, -1 = unused slot), or None for the full view."""
        raise NotImplementedError

    def validate(self, config) -> None:
        """Fill in config.window and check the budget; UserError in the CLI's flag names."""
        if config.budget < 1:
            raise UserError(f"--draft-budget must be positive (or -1 for a full-cache standalone draft), "
                            f"got {config.budget}")
        if config.window is None:
            config.window = self.default_window(config)
        self.check(config)
        if config.window > config.budget:
            raise UserError(f"--draft-window {config.window} is larger than --draft-budget {config.budget} "
                            "(the window is part of the budget): lower the window or raise the budget")
        if config.window < config.gamma:
            raise UserError(f"--draft-budget {config.budget} leaves a sliding window of {config.window} keys, "
                            f"less than gamma={config.gamma} (the draft must see its own drafts): raise the "
                            f"budget to at least {self.selected_name} + gamma = "
                            f"{config.budget - config.window + config.gamma}")

    selected_name = "selected"  # how the error messages call the non-window part of the budget


def same_positions(batch: int, n_kv_heads: int, positions: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """positions [K] for every sequence, KV head and layer -> n_layers x [B, H_kv, K] (one tensor)."""
    sel = positions.expand(batch, n_kv_heads, positions.shape[0]).contiguous()  # [B, H_kv, K]
    return [sel] * n_layers
