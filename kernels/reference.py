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
             Selected positions are distinct per (b, h_kv) apart from -1 (top-k output is); both the
             reference and the kernel count every slot. Only selected + window keys are read, so
             the sparse view costs O(budget) whatever the context length.
             With sel_k / sel_v [B, H_kv, K, D] the selected keys and values are read from that
             compact buffer (gathered once after prefill) instead of the cache.
sliding_window W_l (either view, optional): the layer's own attention window, as transformers
             defines it: no key s <= p - W_l is visible. The full view becomes the band
             p - W_l < s <= p; a sparse view's window is clipped to W_l and its selected keys keep
             only those with s > p - W_l, so a draft never reads what the target's layer cannot.
mass_out  [B, H_kv, S_max] fp32 (full view only, optional): overwritten with the attention mass
             each cache position received in this call, summed over the T queries and the G query
             heads of each KV head (a dynamic draft re-selects its keys from it); 0 where no query
             looked. Each (query head, token) row sums to 1, so a position's mass is at most G * T.
"""
from __future__ import annotations

from typing import Optional

import torch


def full_view_mask(cache_len: torch.Tensor, n_queries: int, n_keys: int,
                   sliding_window: Optional[int] = None) -> torch.Tensor:
    """[B, T, S] bool: key s is visible to query t of sequence b (causal over the live cache, and
    inside the layer's sliding window when it has one)."""
    pos = cache_len.long()[:, None] + torch.arange(n_queries, device=cache_len.device)  # [B, T]
    keys = torch.arange(n_keys, device=cache_len.device)
    visible = keys[None, None, :] <= pos[:, :, None]
    if sliding_window is not None:
        visible &= keys[None, None, :] > pos[:, :, None] - sliding_window
    return visible


def sparse_view_keys(cache_len: torch.Tensor, n_queries: int, sel_pos: torch.Tensor, window: int,
                     n_keys: int, sliding_window: Optional[int] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse view as key lists: (sel_visible [B, H_kv, T, K], window positions [B, W+T-1],
    win_visible [B, T, W+T-1]). Only selected + window keys ever appear, so a draft step costs
    O(budget), not O(context). Positions are distinct per (b, h_kv) apart from -1 (as top-k gives).
    A layer's sliding_window clips the window and hides the selected keys it excludes."""
    pos = cache_len.long()[:, None] + torch.arange(n_queries, device=cache_len.device)  # [B, T]
    if sliding_window is not None:
        window = min(window, sliding_window)
    # A selected key counts only before the query's window (so an overlap is counted once); a slot
    # reserved for a future position stays invisible until it is committed and out of the window.
    sel_visible = (sel_pos[:, :, None, :] >= 0) & (sel_pos[:, :, None, :] <= pos[:, None, :, None] - window)
    if sliding_window is not None:
        sel_visible &= sel_pos[:, :, None, :] > pos[:, None, :, None] - sliding_window
    # Token 0's window starts at cache_len - window + 1; token T-1's ends at cache_len + T - 1.
    # A window longer than the cache (n_keys) only adds negative positions: list at most n_keys.
    span = min(window, n_keys)
    win_pos = cache_len.long()[:, None] - span + 1 + torch.arange(span + n_queries - 1, device=cache_len.device)
    win_visible = ((win_pos[:, None, :] >= 0) & (win_pos[:, None, :] <= pos[:, :, None])
                   & (win_pos[:, None, :] > pos[:, :, None] - window))
    return sel_visible, win_pos, win_visible


def _gather_positions(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cache [B, H_kv, S, D] at positions [B, H_kv, N] (clamped into range; callers mask) -> [B, H_kv, N, D]."""
    idx = positions.clamp(0, cache.shape[2] - 1)
    return torch.gather(cache, 2, idx[..., None].expand(-1, -1, -1, cache.shape[-1]))


def masked_softmax_(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) over the keys `mask` shows; a row with no visible key gives zeros.

    scores [B, H_kv, G * T, S] fp32 (overwritten), mask [B, 1 or H_kv, T, S] -> probabilities, same
    shape. The mask is broadcast over the G query heads of a KV head (never copied) and scale and mask
    are applied in place, so the only score-sized tensor allocated is the probabilities: fresh
    score-sized temporaries cost page faults on CPU once they pass the allocator's mmap threshold
    (benchmarks/cost_model_validation_cpu.md)."""
    B, H_kv, rows, S = scores.shape
    T = mask.shape[-2]
    grouped = scores.view(B, H_kv, rows // T, T, S)  # row g * T + t: query head g of the group, token t
    grouped.mul_(scale).masked_fill_(~mask.unsqueeze(2), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num_(0.0)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float, mass_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H_kv, S, D], mask [B, 1 or H_kv, T, S] -> [B, H, T, D]; mass_out
    [B, H_kv, S_max] (S <= S_max) receives the probabilities summed over each KV head's rows.

    Query heads of one KV head are folded into the query axis so K/V are never repeated."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, H_kv, H // H_kv * T, D)  # heads h = h_kv * G + g, the transformers convention
    probs = masked_softmax_(torch.matmul(qg.float(), k.float().transpose(-1, -2)), mask, scale)
    if mass_out is not None:
        mass_out[:, :, :S].copy_(probs.sum(dim=2))
        mass_out[:, :, S:].zero_()
    out = torch.matmul(probs, v.float())  # [B, H_kv, G*T, D]
    return out.reshape(B, H, T, D).to(q.dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_len: torch.Tensor, *, scale: float,
                               sel_pos: Optional[torch.Tensor] = None, window: Optional[int] = None,
                               sel_k: Optional[torch.Tensor] = None, sel_v: Optional[torch.Tensor] = None,
                               kv_limit: Optional[int] = None, sliding_window: Optional[int] = None,
                               mass_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of T new tokens over the cache, full or sparse view, within the layer's
    sliding_window (None: unbounded). Returns [B, H, T, D]; a full view also fills mass_out.

    kv_limit (eager only) trims the key axis to the first kv_limit positions when the caller
    knows no query reaches further; it changes cost, never the result."""
    T = q.shape[2]
    if window is None:
        S = k_cache.shape[2] if kv_limit is None else min(kv_limit, k_cache.shape[2])
        mask = full_view_mask(cache_len, T, S, sliding_window)[:, None]  # [B, 1, T, S]
        return _grouped_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], mask, scale, mass_out)
    if mass_out is not None:
        raise ValueError("mass_out is the full view's (verification's); a sparse view reads too few keys to score")
    if sel_pos is None:
        raise ValueError("the sparse view needs sel_pos (use an empty [B, H_kv, 0] tensor for window only)")
    B, H_kv = k_cache.shape[:2]
    sel_visible, win_pos, win_visible = sparse_view_keys(cache_len, T, sel_pos, window, k_cache.shape[2],
                                                         sliding_window)
    if sel_k is None:  # selected keys read from the cache by position
        sel_k, sel_v = _gather_positions(k_cache, sel_pos), _gather_positions(v_cache, sel_pos)
    win_pos = win_pos[:, None].expand(B, H_kv, -1)  # [B, H_kv, W+T-1]
    keys = torch.cat([sel_k, _gather_positions(k_cache, win_pos)], dim=2)  # [B, H_kv, K+W+T-1, D]
    values = torch.cat([sel_v, _gather_positions(v_cache, win_pos)], dim=2)
    mask = torch.cat([sel_visible, win_visible[:, None].expand(B, H_kv, -1, -1)], dim=-1)  # [B, H_kv, T, K+W+T-1]
    return _grouped_attention(q, keys, values, mask, scale)
