"""Plain-torch twins of the Triton decode-attention kernels: same signature, same answer.

They define what the kernels must compute, run everywhere (CPU tests, prefill, fallback), and
are what the Triton kernels are checked against under TRITON_INTERPRET=1.

Conventions shared with the kernels
-----------------------------------
q         [B, H, T, D]          T new query tokens per sequence; token t sits at position
                                p[b, t] = cache_len[b] + t, and its K/V are already in the cache.
k_cache   [B, H_kv, S_max, D]   static cache; H is a multiple of H_kv (GQA group G = H // H_kv).
v_cache   [B, H_kv, S_max, D]
cache_len [B] int               committed length before the new tokens.

Full view:   query (b, t) reads keys s <= p[b, t].
Sparse view: query (b, t) reads the sliding window  p - window < s <= p  plus the selected keys
             sel_pos[b, h_kv, :] (>= 0; -1 marks an unused slot) that lie before the window,
             s <= p - window, so a selected key inside the window is counted once. A selected
             position may lie past the live cache (a slot reserved for a future token): the
             same rule keeps it invisible until it is committed and has left the window.
             With sel_k / sel_v [B, H_kv, K, D] the selected keys and values are read from that
             compact buffer (gathered once after prefill) instead of the cache.
"""
from __future__ import annotations

from typing import Optional

import torch


def full_view_mask(cache_len: torch.Tensor, n_queries: int, n_keys: int) -> torch.Tensor:
    """[B, T, S] bool: key s is visible to query t of sequence b (causal over the live cache)."""
    pos = cache_len.long()[:, None] + torch.arange(n_queries, device=cache_len.device)  # [B, T]
    keys = torch.arange(n_keys, device=cache_len.device)
    return keys[None, None, :] <= pos[:, :, None]


def sparse_view_mask(cache_len: torch.Tensor, n_queries: int, n_keys: int,
                     sel_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H_kv, T, S] bool: the sparse draft view over the cache positions (see module doc)."""
    B, H_kv, _ = sel_pos.shape
    pos = cache_len.long()[:, None] + torch.arange(n_queries, device=cache_len.device)  # [B, T]
    keys = torch.arange(n_keys, device=cache_len.device)
    in_window = (keys[None, None, :] <= pos[:, :, None]) & (keys[None, None, :] > pos[:, :, None] - window)
    selected = torch.zeros(B, H_kv, n_keys + 1, dtype=torch.bool, device=sel_pos.device)
    # Slot n_keys soaks up -1 padding and positions past the keys looked at (never visible yet).
    selected.scatter_(2, torch.where((sel_pos < 0) | (sel_pos >= n_keys), n_keys, sel_pos).long(), True)
    selected = selected[:, :, :n_keys]  # [B, H_kv, S]
    before_window = keys[None, None, :] <= pos[:, :, None] - window  # [B, T, S]
    return in_window[:, None] | (selected[:, :, None, :] & before_window[:, None])


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H_kv, S, D], mask [B, 1 or H_kv, T, S] -> [B, H, T, D].

    Query heads of one KV head are folded into the query axis so K/V are never repeated."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    qg = q.reshape(B, H_kv, G * T, D)  # heads h = h_kv * G + g, the transformers convention
    mask = mask.unsqueeze(2).expand(B, mask.shape[1], G, T, mask.shape[-1]).reshape(B, mask.shape[1], G * T, -1)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale  # [B, H_kv, G*T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key gives zeros, not NaN
    out = torch.matmul(probs, v.float())  # [B, H_kv, G*T, D]
    return out.reshape(B, H, T, D).to(q.dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_len: torch.Tensor, *, scale: float,
                               sel_pos: Optional[torch.Tensor] = None, window: Optional[int] = None,
                               sel_k: Optional[torch.Tensor] = None, sel_v: Optional[torch.Tensor] = None,
                               kv_limit: Optional[int] = None) -> torch.Tensor:
    """Attention of T new tokens over the cache, full or sparse view. Returns [B, H, T, D].

    kv_limit (eager only) trims the key axis to the first kv_limit positions when the caller
    knows no query reaches further; it changes cost, never the result."""
    T = q.shape[2]
    S = k_cache.shape[2] if kv_limit is None else min(kv_limit, k_cache.shape[2])
    k, v = k_cache[:, :, :S], v_cache[:, :, :S]
    if window is None:
        return _grouped_attention(q, k, v, full_view_mask(cache_len, T, S)[:, None], scale)
    if sel_pos is None:
        raise ValueError("the sparse view needs sel_pos (use an empty [B, H_kv, 0] tensor for window only)")
    if sel_k is None:
        return _grouped_attention(q, k, v, sparse_view_mask(cache_len, T, S, sel_pos, window), scale)
    # Compact buffer: keys are [selected ; cache], the window rule applied to the cache part only.
    pos = cache_len.long()[:, None] + torch.arange(T, device=q.device)  # [B, T]
    sel_visible = (sel_pos[:, :, None, :] >= 0) & (sel_pos[:, :, None, :] <= pos[:, None, :, None] - window)
    no_selected = sel_pos.new_empty(sel_pos.shape[:2] + (0,))
    win_visible = sparse_view_mask(cache_len, T, S, no_selected, window)
    mask = torch.cat([sel_visible, win_visible], dim=-1)  # [B, H_kv, T, K + S]
    return _grouped_attention(q, torch.cat([sel_k, k], dim=2), torch.cat([sel_v, v], dim=2), mask, scale)
