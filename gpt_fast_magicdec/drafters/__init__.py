"""Who proposes the draft tokens: one file per drafter, and this registry.

  self     the target through a sparse view of its own cache (self_draft.py)
  model    a standalone draft model, its own cache (standalone.py)
  lookup   prompt lookup: n-gram matches in the text so far, no model (lookup.py)
  A+B      a chain: A's proposal where it has one, B's elsewhere, e.g. lookup+self (chain.py)

A new drafter is one file (a Drafter subclass, see base.py) plus one line in DRAFTERS; the CLIs,
DraftConfig's checks and the engine read their choices from here.
"""
from __future__ import annotations

from typing import Optional

from ..errors import ParameterError
from .base import DraftContext, Drafter, ModelDrafter, Proposal
from .chain import ChainDrafter
from .lookup import LookupDrafter
from .self_draft import SelfDrafter
from .standalone import StandaloneDrafter

DRAFTERS: dict[str, type[Drafter]] = {
    "self": SelfDrafter,
    "model": StandaloneDrafter,
    "lookup": LookupDrafter,
}
# A drafter with no model can go in front of one with a model (its rows with no proposal fall through).
CHAINS = tuple(f"{a}+{b}" for a, first in DRAFTERS.items() if not first.reads_cache
               for b, second in DRAFTERS.items() if second.reads_cache)
DRAFT_KINDS = ("none", *DRAFTERS, *CHAINS)


def drafter_class(name: str) -> type[Drafter]:
    if name not in DRAFTERS:
        raise ParameterError(f"{{kind}} must be one of {', '.join(DRAFT_KINDS)}, got {name!r}")
    return DRAFTERS[name]


def make_drafter(config, ctx: DraftContext) -> Optional[Drafter]:
    """The drafter for `config` (a DraftConfig) on this rank, or None for plain decoding."""
    stages = [drafter_class(name).create(config, ctx) for name in config.stages]
    if not stages:
        return None
    return stages[0] if len(stages) == 1 else ChainDrafter(*stages)


__all__ = ["CHAINS", "DRAFTERS", "DRAFT_KINDS", "ChainDrafter", "DraftContext", "Drafter", "ModelDrafter",
           "Proposal", "drafter_class", "make_drafter"]
