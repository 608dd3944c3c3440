"""StreamingLLM (arXiv 2309.17453): the first `sink` positions plus the sliding window."""
from __future__ import annotations

import torch

from ..errors import ParameterError
from .base import SelectionPolicy, same_positions


class Streaming(SelectionPolicy):
    name = "streaming"
    help = "StreamingLLM: the first --sink positions (attention sinks) + a sliding window"
    selected_name = "sink"

    def default_window(self, config) -> int:
        return config.budget - config.sink

    def check(self, config) -> None:
        if config.sink < 0 or config.sink > config.budget:
            raise ParameterError(f"{{sink}} {config.sink} must be between 0 and {{budget}} {config.budget}")
        if config.view_window + config.sink != config.budget:
            raise ParameterError(f"{{kv}} 'streaming': {{sink}} ({config.sink}) + {{window}} ({config.view_window}) "
                                 f"must equal {{budget}} ({config.budget})")

    def smallest_budget(self, config) -> int:
        return config.sink + 4 * config.gamma

    def select(self, model, config, tokens, prompt_len, backend, rows=None):
        sink = torch.arange(config.n_selected, device=tokens.device)  # [sink]
        return same_positions(tokens.shape[0], model.args.n_kv_heads, sink, model.args.n_layers)


STREAMING = Streaming()
