"""The draft's KV selection policies, by name: the one list the CLI, bench and the acceptance
tools read their choices and help text from.

A new policy is one file here (a SelectionPolicy subclass, see base.py) plus one line in
POLICIES. A dynamic one (pillar) also re-selects during decoding from the attention mass that
verification emits; the model drafters ask for it and hand it to the policy's `reselect`.
"""
from __future__ import annotations

from .base import SelectionPolicy
from .full import FULL
from .pillar import PILLAR
from .recent import RECENT
from .snapkv import SNAPKV
from .streaming import STREAMING

POLICIES: dict[str, SelectionPolicy] = {
    "streaming": STREAMING,
    "snapkv": SNAPKV,
    "pillar": PILLAR,
    "recent": RECENT,
    "full": FULL,
}
SPARSE_POLICIES = tuple(name for name, p in POLICIES.items() if not p.full)  # a self-draft's choices
DYNAMIC_POLICIES = tuple(name for name, p in POLICIES.items() if p.dynamic)


def policy_help(names: tuple = tuple(POLICIES)) -> str:
    """'name: help' of each named policy, for a --draft-kv style help text."""
    return "; ".join(f"{name}: {POLICIES[name].help}" for name in names)
