"""The whole cache: classic speculative decoding with a standalone draft model."""
from __future__ import annotations

from ..errors import ParameterError
from .base import SelectionPolicy


class Full(SelectionPolicy):
    name = "full"
    help = "the whole cache (standalone draft only: classic speculative decoding)"
    full = True

    def validate(self, config) -> None:
        if "self" in config.stages:
            raise ParameterError("{kv} 'full' (the whole cache) needs a standalone draft: a full-view self-draft is "
                                 "the target itself; pick a sparse {kv} and a positive {budget}")

    def smallest_budget(self, config) -> int:
        return config.budget

    def select(self, model, config, tokens, prompt_len, backend, rows=None):
        return None


FULL = Full()
