"""The static KV cache and the draft's KV selection policies.

A policy decides which cache positions the sparse draft view reads besides its sliding window:
  streaming  the first `sink` positions (StreamingLLM attention sinks), same for every layer
  snapkv     per layer and KV head, the prompt positions the last prompt tokens attend to most
             (SnapKV, arXiv 2404.14469): scores pooled over the observation window and the query
             heads of each KV head, smoothed with a 1-D pooling, top-k.
Both produce `selected`: one [B, H_kv, K] tensor of positions per layer (-1 = unused slot), which
the AttentionView hands to the attention kernels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def streaming_selection(batch: int, n_kv_heads: int, sink: int, n_layers: int,
                        device=None) -> list[torch.Tensor]:
    """The attention sinks: positions 0..sink-1 for every sequence, head and layer."""
    sel = torch.arange(sink, device=device).expand(batch, n_kv_heads, sink).contiguous()  # [B, H_kv, sink]
    return [sel] * n_layers


SNAPKV_CHUNK = 2048  # keys scored at a time: bounds the scoring temporaries at 100K-token prompts


def _chunk_scores(qg: torch.Tensor, k: torch.Tensor, query_pos: torch.Tensor, first_key: int) -> torch.Tensor:
    """Scaled, masked scores of grouped queries qg [B, H_kv, G*T, D] against keys k [B, H_kv, C, D]
    at positions first_key.. -> fp32 [B, H_kv, G*T, C]. The matmul runs in the cache dtype (fp32
    accumulation on GPUs); only this chunk of scores is fp32."""
    C, D = k.shape[2], k.shape[3]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * D ** -0.5
    key_pos = torch.arange(first_key, first_key + C, device=k.device)  # [C]
    visible = key_pos[None, None, None, :] <= query_pos[:, None, :, None]  # [B, 1, G*T, C]
    return scores.masked_fill(~visible, float("-inf"))


def attention_votes(q: torch.Tensor, k_cache: torch.Tensor, cache_len: torch.Tensor, S: int,
                    chunk: int) -> torch.Tensor:
    """Attention each of the first S cache positions receives from the queries q [B, H, T, D] (new
    tokens at cache_len[b] + t, full causal view), summed over the queries of each KV head
    -> fp32 [B, H_kv, S].

    Two passes over S in chunks, so nothing of size S beyond the votes is ever materialised (at a
    100K-token prompt an fp32 copy of the keys, or the full score matrix, would not fit): the first
    accumulates each query row's log-sum-exp, the second adds up exp(score - lse) per key."""
    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv
    qg = q.to(k_cache.dtype).reshape(B, H_kv, G * T, D)  # query heads of one KV head together (g-major)
    query_pos = (cache_len[:, None] + torch.arange(T, device=q.device)).repeat(1, G)  # [B, G*T]
    starts = range(0, S, chunk)
    lse = torch.full((B, H_kv, G * T, 1), float("-inf"), device=q.device)  # [B, H_kv, G*T, 1]
    for s in starts:
        scores = _chunk_scores(qg, k_cache[:, :, s:min(s + chunk, S)], query_pos, s)
        lse = torch.logaddexp(lse, scores.logsumexp(dim=-1, keepdim=True))
    votes = []
    for s in starts:
        scores = _chunk_scores(qg, k_cache[:, :, s:min(s + chunk, S)], query_pos, s)
        votes.append((scores - lse).exp().sum(dim=2))  # [B, H_kv, C]
    return torch.cat(votes, dim=-1)


class SnapKVObserver:
    """Records, per layer, the top-k prompt positions by pooled observation-window attention.

    Installed as AttentionView.observer for one extra full-view pass over the last `T` prompt
    tokens after prefill (it rewrites their K/V with identical values), so prefill itself stays
    one plain code path and ragged prompts need no special casing."""

    def __init__(self, n_select: int, prompt_len: torch.Tensor, pool_kernel: int = 7,
                 chunk: int = SNAPKV_CHUNK):
        self.n_select = n_select
        self.prompt_len = prompt_len  # [B]
        self.pool_kernel = pool_kernel
        self.chunk = chunk
        self.selected: dict[int, torch.Tensor] = {}

    def __call__(self, layer_id: int, q: torch.Tensor, k_cache: torch.Tensor, view) -> None:
        S = int(self.prompt_len.max())
        votes = attention_votes(q, k_cache, view.cache_len, S, self.chunk)  # [B, H_kv, S]
        votes = F.avg_pool1d(votes, self.pool_kernel, stride=1, padding=self.pool_kernel // 2,
                             count_include_pad=False)  # keep neighbours of a hit (SnapKV clustering)
        in_prompt = torch.arange(S, device=q.device)[None, None, :] < self.prompt_len[:, None, None]
        votes = votes.masked_fill(~in_prompt, float("-inf"))
        k_sel = min(self.n_select, S)
        top = votes.topk(k_sel, dim=-1)  # [B, H_kv, k_sel]
        n_valid = torch.clamp(self.prompt_len, max=k_sel)[:, None, None]  # [B, 1, 1]
        # Valid picks first (ascending), then the slots a short prompt cannot fill.
        picks = torch.where(torch.isfinite(top.values), top.indices, S + self.n_select).sort(dim=-1).values
        picks = F.pad(picks, (0, self.n_select - k_sel), value=S + self.n_select)
        # A prompt shorter than the selection gives its spare slots to the positions generated right
        # after it: they become visible only once committed and outside the window (s <= p - window),
        # so a budget covering the whole context really shows the draft everything.
        slot = torch.arange(self.n_select, device=q.device)[None, None, :]
        spare = self.prompt_len[:, None, None] + slot - n_valid
        sel = torch.where(slot < n_valid, picks, spare)
        self.selected[layer_id] = torch.where(sel < k_cache.shape[2], sel, -1)  # [B, H_kv, n_select]

    def layers(self, n_layers: int) -> list[torch.Tensor]:
        return [self.selected[i] for i in range(n_layers)]
