"""Draft configuration: which drafter proposes (drafters/), through which KV selection policy a
model drafter reads the cache (policies/), its budget, and gamma. Frozen and checked when built.

  DraftConfig()                                   plain decoding (kind "none")
  DraftConfig(kind="self")                        self-speculation: streaming view, sink 16, budget 512
                                                  (clipped to 1/4 of a job's shortest prompt)
  DraftConfig(kind="self", kv="snapkv")           self-speculation through SnapKV-selected keys
  DraftConfig(kind="self", kv="pillar")           ... re-selected from verification every few rounds
  DraftConfig(kind="model", kv="full")            a standalone draft model with a full cache
  DraftConfig(kind="lookup")                      prompt lookup: n-gram matches in the text so far
  DraftConfig(kind="lookup+self")                 the lookup's proposal where it has one, else self
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from .attention import MAX_KERNEL_QUERIES
from .errors import ParameterError
from .policies import DYNAMIC_POLICIES, POLICIES, SelectionPolicy

DEFAULT_BUDGET = 512  # keys a draft query reads when the budget is not chosen (MagicDec's default)
# ... clipped to 1/DEFAULT_BUDGET_FRACTION of the job's shortest prompt: a 512-key budget over a
# 600-token prompt would make the "sparse" draft nearly the target.
DEFAULT_BUDGET_FRACTION = 4


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    kind: str = "none"  # "none", a drafter of drafters.DRAFTERS, or a chain such as "lookup+self"
    kv: str = "streaming"  # model drafters: a POLICIES name
    # Model drafters: keys read per draft query, selected + window (unused by `full`). None: DEFAULT_BUDGET,
    # clipped by the job to its shortest prompt (see `for_context`); a budget given is used as is.
    budget: Optional[int] = None
    sink: int = 16  # streaming: attention-sink positions kept at the start
    window: Optional[int] = None  # the sliding window; None: the policy's default (see `view_window`)
    gamma: int = 3  # draft tokens per round
    obs_window: int = 32  # snapkv: last prompt tokens whose attention votes for positions
    pool_kernel: int = 7  # snapkv, pillar: 1-D pooling over the votes / the verification mass
    # pillar: rounds between re-selections from verification's attention; None: the policy's
    # default for the round's gamma (see reselect_every_at)
    reselect: Optional[int] = None
    ngram: int = 3  # lookup: the longest n-gram matched (shorter ones are tried when it has no match)
    ngram_min: int = 1  # lookup: the shortest n-gram that may propose (raise it to trust only long matches)

    def __post_init__(self):
        from .drafters import DRAFT_KINDS, drafter_class

        if self.kind not in DRAFT_KINDS:
            raise ParameterError(f"{{kind}} must be one of {', '.join(DRAFT_KINDS)}, got {self.kind!r}")
        if self.kv not in POLICIES:
            raise ParameterError(f"{{kv}} must be one of {', '.join(POLICIES)}, got {self.kv!r}")
        if not self.enabled:
            return
        if self.budget is not None and not isinstance(self.budget, int):
            raise ParameterError(f"{{budget}} must be an integer or None, got {self.budget!r}")
        if self.gamma < 1:
            raise ParameterError(f"{{gamma}} must be >= 1 for speculative decoding, got {self.gamma} "
                                 "(plain decoding is kind 'none')")
        if self.reselect is not None:
            if not isinstance(self.reselect, int) or self.reselect < 1:
                raise ParameterError(f"{{reselect}} must be a positive number of rounds, got {self.reselect!r}")
            if not self.policy.dynamic:
                raise ParameterError(f"{{reselect}} applies to a re-selecting {{kv}} ({', '.join(DYNAMIC_POLICIES)}), "
                                     f"not {{kv}} {self.kv!r}")
        if self.gamma + 1 > MAX_KERNEL_QUERIES:  # verification must stay a decode-shaped step
            raise ParameterError(f"{{gamma}} must be <= {MAX_KERNEL_QUERIES - 1}, got {self.gamma} "
                                 "(acceptance decays geometrically: useful values are 1-8)")
        # An unresolved budget is checked as the largest it can become (the default): clipping keeps a
        # budget at or above what the view needs (SelectionPolicy.smallest_budget).
        checked = self if self.budget is not None else dataclasses.replace(self, budget=DEFAULT_BUDGET)
        for stage in self.stages:
            drafter_class(stage).check(checked)

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def stages(self) -> tuple[str, ...]:
        """The drafters it chains, first to last ("lookup+self" -> ("lookup", "self"))."""
        return tuple(self.kind.split("+")) if self.enabled else ()

    @property
    def reads_cache(self) -> bool:
        """A model drafter is part of it, reading a KV cache through the policy's view."""
        return any(drafter_needs_view(stage) for stage in self.stages)

    @property
    def policy(self) -> SelectionPolicy:
        return POLICIES[self.kv]

    @property
    def full(self) -> bool:
        """The draft model reads the whole cache (no window, no selection)."""
        return self.policy.full

    @property
    def view_window(self) -> Optional[int]:
        """The sliding window the draft view reads: `window`, or the policy's default; None for a
        full view or no model drafter."""
        if not self.reads_cache or self.full:
            return None
        return self.window if self.window is not None else self.policy.default_window(self)

    @property
    def reselects(self) -> bool:
        """A model drafter re-selects its keys during decoding (a dynamic policy)."""
        return self.reads_cache and self.policy.dynamic

    def reselect_every_at(self, gamma: int) -> Optional[int]:
        """Rounds between re-selections in rounds of this gamma (None: the selection is fixed)."""
        if not self.reselects:
            return None
        return self.reselect if self.reselect is not None else self.policy.default_reselect(gamma)

    @property
    def reselect_every(self) -> Optional[int]:
        return self.reselect_every_at(self.gamma)

    @property
    def n_selected(self) -> int:
        """Selected (non-window) keys per layer and KV head."""
        window = self.view_window
        return 0 if window is None else self.budget - window

    def describe(self) -> str:
        if not self.enabled:
            return "none (plain decoding)"
        grams = (f"<= {self.ngram}" if self.ngram_min == 1 else f"{self.ngram}" if self.ngram_min == self.ngram
                 else f"{self.ngram_min}-{self.ngram}")
        names = {"self": "self", "model": "standalone model", "lookup": f"prompt lookup (n-gram {grams})"}
        who = " then ".join(names.get(stage, stage) for stage in self.stages)
        if not self.reads_cache:
            return f"{who}, gamma {self.gamma}"
        if self.full:
            view = "full cache"
        elif self.budget is None:
            view = f"{self.kv}, budget up to {DEFAULT_BUDGET} (1/{DEFAULT_BUDGET_FRACTION} of the shortest prompt)"
        else:
            view = f"{self.kv}, budget {self.budget} (window {self.view_window})"
        if self.reselects:
            every = self.reselect_every
            view += ", re-selected every round" if every == 1 else f", re-selected every {every} rounds"
        return f"{who}, {view}, gamma {self.gamma}"

    def for_context(self, shortest_prompt: int) -> "DraftConfig":
        """This config with its budget decided, for a job whose shortest prompt has `shortest_prompt`
        tokens. A budget given is kept. None becomes DEFAULT_BUDGET, clipped to shortest_prompt //
        DEFAULT_BUDGET_FRACTION (never below what the policy's view needs) unless a window was
        given (the window then decides the view, and the default budget is kept around it)."""
        if self.budget is not None:
            return self
        budget = DEFAULT_BUDGET
        if self.reads_cache and not self.full and self.window is None:
            resolved = dataclasses.replace(self, budget=budget)
            budget = min(budget, max(shortest_prompt // DEFAULT_BUDGET_FRACTION,
                                     self.policy.smallest_budget(resolved)))
        return dataclasses.replace(self, budget=budget)

    def warn_if_budget_covers(self, context: int) -> None:
        if self.reads_cache and not self.full and self.budget >= context:
            warnings.warn(f"the draft budget ({self.budget}) covers the whole context ({context} tokens): the "
                          "draft sees everything, so it is as expensive as the target", stacklevel=2)


def drafter_needs_view(stage: str) -> bool:
    from .drafters import drafter_class

    return drafter_class(stage).reads_cache
