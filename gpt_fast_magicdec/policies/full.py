"""The whole cache: classic speculative decoding with a standalone draft model."""
from __future__ import annotations

from .base import SelectionPolicy


class Full(SelectionPolicy):
    name = "full"
    help = "the whole cache (standalone draft only: classic speculative decoding)"
    full = True

    def validate(self, config) -> None:
        """Nothing to check: no budget, no window. (A self-draft cannot be full: SelfDrafter.check.)"""

    def smallest_budget(self, config) -> int:
        return config.budget

    def select(self, model, config, tokens, prompt_len, backend, rows=None):
        return None


FULL = Full()
