"""Triton attention mass: the twin of `decode_attention_reference(..., mass_out=)` for the full view.

A re-selecting draft (policies/pillar.py) learns which cache positions matter from what a
verification pass attended to: per (b, h_kv) and cache position, the softmax probability summed
over the T new tokens and the G query heads of the KV head. The decode kernel never holds a row's
whole softmax (flash-decoding keeps a running max and sum per split), so the mass is a second,
lighter pass after it:

* the row log-sum-exp comes from the split kernel's partials (row max and row sum of exp per
  split, `lse_from_partials`), so nothing is recomputed for it;
* `_mass_kernel`, one program per (b, h_kv, block of BLOCK_N positions), loads the query tile (row
  m = g * T + t as in the split kernel), the block's K (not V), recomputes q.k, and writes
  sum_m exp2(s - lse) for each position: zeros where no query can look (past the live length,
  outside a sliding layer's window), so a stale buffer is fully overwritten. K of positions no
  query sees is never loaded.

Its cost is one more read of the keys verification read (half its KV read) and a 4-byte write per
position and KV head; `cost_model.reselect_cost` prices it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _mass_kernel(Q, K, CacheLen, Lse, Mass,
                 sqb, sqh, sqt, sqd, skb, skh, sks, skd, smb, smh, sms,
                 qk_scale, T, G, layer_window, S_max,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # int64 so b * stride cannot overflow on big caches
    h_kv = tl.program_id(1)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] cache positions
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    g = offs_m // T
    t = offs_m % T
    row_ok = offs_m < G * T
    head = h_kv * G + g

    cache_len = tl.load(CacheLen + b).to(tl.int32)
    pos_q = cache_len + t  # [BLOCK_M]
    # Keys some query sees: up to the last new token, and after the first token's layer window.
    first = tl.maximum(cache_len - layer_window + 1, 0)
    key_ok = (offs_n < cache_len + T) & (offs_n >= first) & (offs_n < S_max)  # [BLOCK_N]

    q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k = tl.load(K + b * skb + h_kv * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if DOT_FP32:  # interpreter only: its tl.dot multiplies bf16 bit patterns (triton#11584)
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    # Row log-sum-exp (base 2) of the verification's softmax; +inf for a row that saw no key.
    lse = tl.load(Lse + (b * tl.num_programs(1) + h_kv) * (G * T) + offs_m, mask=row_ok, other=float("inf"))
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    visible = (row_ok[:, None] & key_ok[None, :] & (offs_n[None, :] <= pos_q[:, None])
               & (offs_n[None, :] > pos_q[:, None] - layer_window))
    p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
    tl.store(Mass + b * smb + h_kv * smh + offs_n * sms, tl.sum(p, axis=0), mask=offs_n < S_max)


def lse_from_partials(part_m: torch.Tensor, part_l: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp (base 2) from the split kernel's partials part_m / part_l [B, H_kv, splits,
    G*T] (row max and row sum of exp2 per split) -> [B, H_kv, G*T] fp32, +inf where no split saw a key."""
    m_max = part_m.amax(dim=2, keepdim=True)
    m_safe = torch.where(torch.isfinite(m_max), m_max, 0.0)
    total = (torch.exp2(part_m - m_safe) * part_l).sum(dim=2)
    return torch.where(total > 0, m_safe.squeeze(2) + torch.log2(total), float("inf")).contiguous()


def mass_launch(q: torch.Tensor, k_cache: torch.Tensor, cache_len: torch.Tensor, lse: torch.Tensor,
                mass_out: torch.Tensor, *, scale: float, tile, sliding_window: Optional[int] = None):
    """(grid, args, constexprs, num_warps) of `_mass_kernel` for these inputs: q [B, H, T, D],
    k_cache [B, H_kv, S_max, D], lse [B, H_kv, G*T] base 2, mass_out [B, H_kv, S_max] fp32.
    `tile` is the split kernel's (decode_attention.choose_tile): the same query rows and head_dim."""
    B, H, T, D = q.shape
    H_kv, S_max = k_cache.shape[1], k_cache.shape[2]
    layer_window = S_max + T if sliding_window is None else int(sliding_window)
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # interpreter bf16 workaround
    precision = "ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32"
    grid = (B, H_kv, triton.cdiv(S_max, tile.block_n))
    args = (q, k_cache, cache_len, lse, mass_out, *q.stride(), *k_cache.stride(), *mass_out.stride(),
            scale * _LOG2E, T, H // H_kv, layer_window, S_max)
    constexprs = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=tile.block_d, HEAD_D=D,
                      PRECISION=precision, DOT_FP32=dot_fp32)
    return grid, args, constexprs, tile.num_warps
