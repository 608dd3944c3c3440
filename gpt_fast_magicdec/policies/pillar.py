"""A re-selecting draft view in the manner of PillarAttn (SparseSpec, arXiv 2512.01278): the keys a
draft reads are re-chosen during decoding from what the target's verification pass attended to.

Verification reads the whole cache anyway; every few rounds it also writes, per layer and KV head,
the attention mass each cache position received from its gamma + 1 queries (summed over the query
heads of the KV head). The top-K positions of that mass, smoothed like SnapKV's votes, become the
draft's selection for the next rounds, in place in the drafter's buffers, so captured draft steps
stay valid. A new sequence's first selection is SnapKV's, from its prompt (there is no verification
yet). The sliding window keeps the most recent tokens in view, as PillarAttn does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import top_positions
from .snapkv import SnapKV

# PillarAttn re-uses one selection for about this many draft steps before verification refreshes it.
DRAFT_STEPS_PER_SELECTION = 8


class Pillar(SnapKV):
    name = "pillar"
    help = ("re-selected: SnapKV at prefill, then the positions verification attends to most, every "
            "--reselect rounds + a window")
    dynamic = True

    def default_reselect(self, gamma: int) -> int:
        return max(1, round(DRAFT_STEPS_PER_SELECTION / gamma))

    def reselect(self, mass: torch.Tensor, config, cache_len: torch.Tensor) -> torch.Tensor:
        """Top-K of the pooled mass among the positions the next draft's window leaves out.

        The first draft query sits at cache_len and its window covers cache_len - window + 1 ..
        cache_len, so only positions s <= cache_len - window are worth a slot (the sparse view
        hides a selected key inside the window anyway). A context shorter than the selection gives
        its spare slots to the positions right after it, which become visible as they leave the
        window: a budget covering the whole context shows the draft everything, as SnapKV's does."""
        H, S = mass.shape[-2:]
        # Pooling keeps the neighbours of a hit: verification's mass is spikier than SnapKV's
        # prompt-wide votes, and on held-out text the raw top-K accepts markedly fewer drafts.
        pooled = F.avg_pool1d(mass.reshape(-1, H, S), config.pool_kernel, stride=1,
                              padding=config.pool_kernel // 2, count_include_pad=False).reshape(mass.shape)
        n_eligible = (cache_len.long() - config.view_window + 1).clamp(min=0)  # [B]
        positions = torch.arange(S, device=mass.device)
        pooled.masked_fill_(positions[None, None, :] >= n_eligible[:, None, None], float("-inf"))
        return top_positions(pooled, config.n_selected, n_eligible, S)


PILLAR = Pillar()
