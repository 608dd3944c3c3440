"""The static KV cache: one [B, H_kv, S_max, D] key / value pair per layer, per-sequence writes.

Which positions a sparse draft reads is a selection policy's business (policies/)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.max_seq_len = max_seq_len
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> None:
        """Write k, v [b, H_kv, T, D] at positions input_pos [b, T], each sequence its own, into the
        cache rows `rows` [b] (None: rows 0..b-1)."""
        batch = (torch.arange(k.shape[0], device=k.device) if rows is None else rows)[:, None]  # [b, 1]
        # Advanced indices on dims 0 and 2 put [b, T] first: the slot is [b, T, H_kv, D].
        self.k_cache[batch, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[batch, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)

    def read(self, rows: Optional[torch.Tensor], n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache a pass attends over: all of it (rows None, every decode step: no copy), or the
        first n_keys positions of the given rows [b] (a refill's prefill: a copy of what it reads)."""
        if rows is None:
            return self.k_cache, self.v_cache
        return (self.k_cache[:, :, :n_keys].index_select(0, rows),
                self.v_cache[:, :, :n_keys].index_select(0, rows))
