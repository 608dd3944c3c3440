"""What a forward pass attends to (`AttentionView`) and which implementation computes it.

The model never knows whether it is prefilling, verifying or drafting: it receives a view.
  full view   keys s <= position of the query over the live cache (prefill, decode, verify)
  sparse view the draft's bounded slice: per-layer selected positions (StreamingLLM sink or
              SnapKV picks) plus a sliding window of the most recent `window` positions.
KV selection policies (policies/) choose what a sparse view reads; they are not new model classes.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kernels import decode_attention_reference, full_view_mask, kernel_supports

ATTENTION_BACKENDS = ("auto", "torch", "triton")
MAX_KERNEL_QUERIES = 16  # the Triton kernel's query-tile budget (draft 1-2 tokens, verify gamma+1)


@dataclasses.dataclass(frozen=True)
class ViewHooks:
    """Side effects of a pass, beyond computing attention. The default (NO_HOOKS) is every hot path."""
    # Called as observer(layer_id, q [B, H, T, D], k_cache [B, H_kv, S, D], view) after the cache
    # write; SnapKV uses it to score prompt positions.
    observer: Optional[Callable] = None
    write_cache: bool = True  # False: read-only pass over tokens whose K/V are already cached


NO_HOOKS = ViewHooks()


@dataclasses.dataclass
class AttentionView:
    """What one forward pass attends to (geometry), how it is computed (execution), and its side
    effects (hooks). One object per pass; every layer reads its own slice of `selected`."""
    # -- geometry: which keys each query reads
    cache_len: torch.Tensor  # [B] committed length; new token t of sequence b sits at cache_len[b] + t
    n_tokens: int  # T, new tokens per sequence in this pass
    window: Optional[int] = None  # None: full view; int: sparse view with this sliding window
    selected: Optional[list] = None  # sparse view: per layer [B, H_kv, K] positions, -1 = unused slot
    selected_kv: Optional[list] = None  # optional per-layer (k, v) compact buffers [B, H_kv, K, D]
    # Chunked prefill: every sequence's new tokens start at this position (cache_len == it).
    prefill_start: Optional[int] = None
    # -- execution
    backend: str = "torch"  # "torch" or "triton" (resolved by resolve_backend)
    kv_limit: Optional[int] = None  # eager-only hint: no query reaches past this many keys
    # -- side effects
    hooks: ViewHooks = NO_HOOKS

    @property
    def input_pos(self) -> torch.Tensor:
        """[B, T] absolute position of every new token (used for RoPE and the cache write)."""
        return self.cache_len.long()[:, None] + torch.arange(self.n_tokens, device=self.cache_len.device)

    @property
    def is_sparse(self) -> bool:
        return self.window is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` picks the Triton kernel where it can run (CUDA with triton installed)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    from kernels import triton_available  # lazily: importing triton is slow

    usable = triton_available(device)  # CUDA, or the (slow) interpreter when TRITON_INTERPRET=1
    if name == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not usable:
        from .errors import UserError

        raise UserError("--attention triton needs a CUDA device and the triton package "
                        "(or TRITON_INTERPRET=1 for a slow CPU check); use --attention torch")
    return "triton"


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, view: AttentionView,
           layer_id: int, scale: float) -> torch.Tensor:
    """q [B, H, T, D] against the cache [B, H_kv, S_max, D] through `view` -> [B, H, T, D]."""
    selected = view.selected[layer_id] if view.is_sparse else None
    sel_k = sel_v = None
    if view.selected_kv is not None:
        sel_k, sel_v = view.selected_kv[layer_id]
    if not view.is_sparse and q.shape[2] > MAX_KERNEL_QUERIES:
        return _prefill_attention(q, k_cache, v_cache, view, scale)
    use_kernel = view.backend == "triton" and q.shape[2] <= MAX_KERNEL_QUERIES
    if use_kernel and not kernel_supports(q.shape[1] // k_cache.shape[1] * q.shape[2], q.shape[3]):
        warnings.warn(f"head_dim {q.shape[3]} / {q.shape[1] // k_cache.shape[1]} heads per KV head is "
                      "outside the Triton kernel's range: decode attention runs the torch path")
        use_kernel = False
    if use_kernel:
        from kernels import decode_attention_triton

        fn = decode_attention_triton
    else:
        fn = decode_attention_reference
    return fn(q, k_cache, v_cache, view.cache_len, scale=scale, sel_pos=selected, window=view.window,
              sel_k=sel_k, sel_v=sel_v, kv_limit=view.kv_limit)


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       view: AttentionView, scale: float) -> torch.Tensor:
    """Full view for a long chunk of new tokens: SDPA picks a fused kernel (flash / memory-
    efficient on GPU), so scores [T, S] are never materialised in fp32 at 100K-token prompts."""
    T = q.shape[2]
    if view.prefill_start is not None:
        # Keys 0..start+T-1, causal aligned to the bottom right: one mask for the whole batch,
        # which lets SDPA use flash / memory-efficient kernels instead of a [B, T, S] bool mask.
        S = view.prefill_start + T
        return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S],
                                              attn_mask=causal_lower_right(T, S), scale=scale, enable_gqa=True)
    S = k_cache.shape[2] if view.kv_limit is None else min(view.kv_limit, k_cache.shape[2])
    mask = full_view_mask(view.cache_len, T, S)[:, None]  # [B, 1, T, S]
    return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], attn_mask=mask,
                                          scale=scale, enable_gqa=True)
