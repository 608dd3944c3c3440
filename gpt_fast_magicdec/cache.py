"""The static KV cache: one [B, H_kv, S_max, D] key / value pair per layer, per-sequence writes.

Which positions a sparse draft reads is a selection policy's business (policies/)."""
from __future__ import annotations

import torch
import torch.nn as nn


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H_kv, T, D] at positions input_pos [B, T]; each sequence its own."""
        batch = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        # Advanced indices on dims 0 and 2 put [B, T] first: the slot is [B, T, H_kv, D].
        self.k_cache[batch, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[batch, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache, self.v_cache
