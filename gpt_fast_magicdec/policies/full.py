"""The whole cache: classic speculative decoding with a standalone draft model."""
from __future__ import annotations

from ..errors import UserError
from .base import SelectionPolicy


class Full(SelectionPolicy):
    name = "full"
    help = "the whole cache (standalone draft only: classic speculative decoding)"
    full = True

    def validate(self, config) -> None:
        if config.kind == "self":
            raise UserError("the full-cache view (--draft-kv full, or --draft-budget -1) needs a standalone draft: "
                            "a full-view self-draft is the target itself; pick a sparse --draft-kv and a positive budget")

    def smallest_budget(self, config) -> int:
        return config.budget

    def select(self, model, config, tokens, prompt_len, backend):
        return None


FULL = Full()
