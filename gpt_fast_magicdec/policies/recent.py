"""Only the sliding window: the most recent `budget` positions, no selected keys (StreamingLLM
without its sinks). A baseline that shows what the sinks / SnapKV picks add."""
from __future__ import annotations

import torch

from ..errors import ParameterError
from .base import SelectionPolicy, same_positions


class Recent(SelectionPolicy):
    name = "recent"
    help = "the most recent --draft-budget positions only (a window without sinks)"

    def default_window(self, config) -> int:
        return config.budget

    def check(self, config) -> None:
        if config.view_window != config.budget:
            raise ParameterError(f"{{kv}} 'recent': {{window}} ({config.view_window}) must equal {{budget}} "
                                 f"({config.budget})")

    def smallest_budget(self, config) -> int:
        return 4 * config.gamma

    def select(self, model, config, tokens, prompt_len, backend, rows=None):
        nothing = torch.arange(0, device=tokens.device)  # [0]: the view is its window alone
        return same_positions(tokens.shape[0], model.args.n_kv_heads, nothing, model.args.n_layers)


RECENT = Recent()
