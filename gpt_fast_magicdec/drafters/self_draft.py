"""Self-speculation: the target drafts for itself through the policy's sparse view of its own cache.

Zero copy: the draft's speculative K/V land at positions >= cache_len, which the verification pass
overwrites; it needs no second cache, no second prefill and no re-read of `prev` (verification
wrote every K/V the view reads)."""
from __future__ import annotations

from ..errors import ParameterError
from .base import DraftContext, ModelDrafter


class SelfDrafter(ModelDrafter):
    def __init__(self, config, ctx: DraftContext):
        super().__init__(config, ctx, ctx.target)

    @classmethod
    def check(cls, config) -> None:
        if config.full:
            raise ParameterError("{kv} 'full' (the whole cache) needs a standalone draft: a full-view self-draft "
                                 "is the target itself; pick a sparse {kv} and a positive {budget}")
        super().check(config)
