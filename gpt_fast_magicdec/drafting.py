"""Draft configuration and the policies that turn it into a sparse AttentionView.

  --draft none                      plain decoding
  --draft self --draft-kv streaming self-speculation, sink + sliding window over the target's cache
  --draft self --draft-kv snapkv    self-speculation, SnapKV-selected positions + sliding window
  --draft-checkpoint DIR            a standalone draft model, same two views, or budget -1 (full)
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from .attention import MAX_KERNEL_QUERIES, AttentionView
from .cache import SnapKVObserver, streaming_selection
from .errors import UserError

DRAFT_KINDS = ("none", "self", "model")
DRAFT_KV = ("streaming", "snapkv")
# With no --draft-budget the draft reads at most 1/DEFAULT_BUDGET_FRACTION of the shortest prompt:
# a 512-key budget over a 600-token prompt would make the "sparse" draft nearly the target.
DEFAULT_BUDGET_FRACTION = 4


@dataclasses.dataclass
class DraftConfig:
    kind: str = "none"  # none | self | model
    kv: str = "streaming"  # streaming | snapkv
    budget: int = 512  # keys the draft reads per query: selected + window; -1 = full view (model only)
    sink: int = 16  # streaming: attention-sink positions kept at the start
    window: Optional[int] = None  # sliding window; default budget - sink (streaming), budget // 4 (snapkv)
    gamma: int = 3
    obs_window: int = 32  # snapkv: last prompt tokens whose attention votes for positions
    pool_kernel: int = 7  # snapkv: 1-D pooling over the votes

    def __post_init__(self):
        if self.kind not in DRAFT_KINDS:
            raise UserError(f"--draft must be one of {DRAFT_KINDS}, got {self.kind!r}")
        if self.kv not in DRAFT_KV:
            raise UserError(f"--draft-kv must be one of {DRAFT_KV}, got {self.kv!r}")
        if self.kind == "none":
            return
        if self.gamma < 1:
            raise UserError(f"--gamma must be >= 1 for speculative decoding, got {self.gamma} "
                            "(--gamma 0 or --draft none is plain decoding)")
        if self.gamma + 1 > MAX_KERNEL_QUERIES:  # verification must stay a decode-shaped step
            raise UserError(f"--gamma must be <= {MAX_KERNEL_QUERIES - 1}, got {self.gamma} "
                            "(acceptance decays geometrically: useful values are 1-8)")
        if self.full:
            if self.kind == "self":
                raise UserError("--draft-budget -1 (full cache) needs a standalone draft: a full-view "
                                "self-draft is the target itself; give a positive budget")
            return
        if self.budget < 1:
            raise UserError(f"--draft-budget must be positive (or -1 for a full-cache standalone draft), "
                            f"got {self.budget}")
        if self.kv == "streaming":
            if self.sink < 0 or self.sink > self.budget:
                raise UserError(f"--sink {self.sink} must be between 0 and --draft-budget {self.budget}")
            if self.window is None:
                self.window = self.budget - self.sink
            elif self.window + self.sink != self.budget:
                raise UserError(f"streaming: --sink ({self.sink}) + --draft-window ({self.window}) must equal "
                                f"--draft-budget ({self.budget})")
        elif self.window is None:
            self.window = max(self.gamma + 1, self.budget // 4)
        if self.window > self.budget:
            raise UserError(f"--draft-window {self.window} is larger than --draft-budget {self.budget} (the "
                            "window is part of the budget): lower the window or raise the budget")
        if self.window < self.gamma:
            raise UserError(f"--draft-budget {self.budget} leaves a sliding window of {self.window} keys, "
                            f"less than gamma={self.gamma} (the draft must see its own drafts): raise the "
                            f"budget to at least {'sink' if self.kv == 'streaming' else 'selected'} + gamma = "
                            f"{self.budget - self.window + self.gamma}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def full(self) -> bool:
        return self.budget == -1

    @property
    def n_selected(self) -> int:
        """Selected (non-window) keys per layer and KV head."""
        return 0 if self.full or not self.enabled else self.budget - self.window

    def describe(self) -> str:
        if not self.enabled:
            return "none (plain decoding)"
        who = "self" if self.kind == "self" else "standalone model"
        view = "full cache" if self.full else f"{self.kv}, budget {self.budget} (window {self.window})"
        return f"{who}, {view}, gamma {self.gamma}"

    def warn_if_budget_covers(self, context: int) -> None:
        if self.enabled and not self.full and self.budget >= context:
            warnings.warn(f"--draft-budget {self.budget} covers the whole context ({context} tokens): the "
                          "draft sees everything, so it is as expensive as the target", stacklevel=2)


def budget_for_context(config: DraftConfig, context: int) -> DraftConfig:
    """The draft config for a batch whose shortest prompt has `context` tokens, when the user did
    not choose the budget: the default budget, clipped to context // DEFAULT_BUDGET_FRACTION but
    never below what the view needs (the sink, plus a window of 4 * gamma for streaming; a window
    of gamma + 1 for SnapKV's quarter-budget window)."""
    if not config.enabled or config.full:
        return config
    smallest = (config.sink + 4 * config.gamma if config.kv == "streaming"
                else 4 * (config.gamma + 1) + 4)
    budget = min(config.budget, max(context // DEFAULT_BUDGET_FRACTION, smallest))
    if budget == config.budget:
        return config
    return dataclasses.replace(config, budget=budget, window=None)


def select_positions(model, config: DraftConfig, tokens: torch.Tensor, prompt_len: torch.Tensor,
                     backend: str) -> Optional[list]:
    """After `model` has prefilled `tokens` [B, L_max]: per-layer selected positions [B, H_kv, K],
    or None for a full view. SnapKV re-runs the last obs_window prompt tokens (cache untouched)
    with an observer that scores every prompt position from their attention."""
    if config.full:
        return None
    B, n_kv, n_layers = tokens.shape[0], model.args.n_kv_heads, model.args.n_layers
    if config.kv == "streaming":
        return streaming_selection(B, n_kv, config.n_selected, n_layers, device=tokens.device)
    obs = max(1, min(config.obs_window, int(prompt_len.min())))
    observer = SnapKVObserver(config.n_selected, prompt_len, config.pool_kernel)
    start = prompt_len - obs  # [B]
    rows = start[:, None] + torch.arange(obs, device=tokens.device)  # [B, obs]
    view = AttentionView(cache_len=start, n_tokens=obs, backend=backend, observer=observer,
                         write_cache=False, kv_limit=int(prompt_len.max()))
    with torch.no_grad():
        model(tokens.gather(1, rows), view, output_index=rows[:, :1] - start[:, None])
    return observer.layers(n_layers)


def sparse_view(config: DraftConfig, selected: Optional[list], cache_len: torch.Tensor, n_tokens: int,
                backend: str) -> AttentionView:
    """The draft's view for a step of n_tokens tokens starting at cache_len."""
    if selected is None:  # full-cache standalone draft
        return AttentionView(cache_len=cache_len, n_tokens=n_tokens, backend=backend)
    return AttentionView(cache_len=cache_len, n_tokens=n_tokens, window=config.window, selected=selected,
                         backend=backend)
