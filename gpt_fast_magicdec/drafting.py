"""Draft configuration: which drafter (none / self / a standalone model), which KV selection
policy it reads the cache through (policies/), its budget and gamma.

  --draft none                      plain decoding
  --draft self --draft-kv streaming self-speculation, sink + sliding window over the target's cache
  --draft self --draft-kv snapkv    self-speculation, SnapKV-selected positions + sliding window
  --draft-checkpoint DIR            a standalone draft model, any policy, or `full` (the whole cache)
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from .attention import MAX_KERNEL_QUERIES
from .errors import UserError
from .policies import POLICIES, SelectionPolicy

DRAFT_KINDS = ("none", "self", "model")
DRAFT_KV = tuple(POLICIES)
FULL_BUDGET = -1  # --draft-budget -1, the CLI's older spelling of --draft-kv full
# With no --draft-budget the draft reads at most 1/DEFAULT_BUDGET_FRACTION of the shortest prompt:
# a 512-key budget over a 600-token prompt would make the "sparse" draft nearly the target.
DEFAULT_BUDGET_FRACTION = 4


@dataclasses.dataclass
class DraftConfig:
    kind: str = "none"  # none | self | model
    kv: str = "streaming"  # a POLICIES name
    budget: int = 512  # keys the draft reads per query: selected + window (unused by `full`)
    sink: int = 16  # streaming: attention-sink positions kept at the start
    window: Optional[int] = None  # sliding window; None: the policy's default
    gamma: int = 3
    obs_window: int = 32  # snapkv: last prompt tokens whose attention votes for positions
    pool_kernel: int = 7  # snapkv: 1-D pooling over the votes

    def __post_init__(self):
        if self.kind not in DRAFT_KINDS:
            raise UserError(f"--draft must be one of {DRAFT_KINDS}, got {self.kind!r}")
        if self.budget == FULL_BUDGET:
            # CLI compatibility, and the only place the sentinel is read: generate.py and bench.py
            # still spell the full-cache draft as --draft-budget -1.
            self.kv = "full"
        if self.kv not in POLICIES:
            raise UserError(f"--draft-kv must be one of {DRAFT_KV}, got {self.kv!r}")
        if self.kind == "none":
            return
        if self.gamma < 1:
            raise UserError(f"--gamma must be >= 1 for speculative decoding, got {self.gamma} "
                            "(--gamma 0 or --draft none is plain decoding)")
        if self.gamma + 1 > MAX_KERNEL_QUERIES:  # verification must stay a decode-shaped step
            raise UserError(f"--gamma must be <= {MAX_KERNEL_QUERIES - 1}, got {self.gamma} "
                            "(acceptance decays geometrically: useful values are 1-8)")
        self.policy.validate(self)

    @property
    def policy(self) -> SelectionPolicy:
        return POLICIES[self.kv]

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def full(self) -> bool:
        """The draft reads the whole cache (no window, no selection)."""
        return self.policy.full

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
    never below what the policy's view needs (SelectionPolicy.smallest_budget)."""
    if not config.enabled or config.full:
        return config
    budget = min(config.budget, max(context // DEFAULT_BUDGET_FRACTION, config.policy.smallest_budget(config)))
    if budget == config.budget:
        return config
    return dataclasses.replace(config, budget=budget, window=None)
