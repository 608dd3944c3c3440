"""What a forward pass attends to (`AttentionView`) and which implementation computes it.

The model never knows whether it is prefilling, verifying or drafting: it hands each layer's
queries, keys and values to the view it was given, and the view writes the cache and attends.
  full view   keys s <= position of the query over the live cache (prefill, decode, verify)
  sparse view the draft's bounded slice: per-layer selected positions (StreamingLLM sink or
              SnapKV picks) plus a sliding window of the most recent `window` positions.
KV selection policies (policies/) choose what a sparse view reads; they are not new model classes.
A sliding-window layer (Mistral-7B-v0.1, Qwen2/3 windows) bounds either view: no query at p reads
a key s <= p - sliding_window, whatever the view would show; the layer passes its window to attend.

A view is anything with `rotary(model, n_tokens) -> (cos, sin)` and
`attend(layer_id, q, k, v, kv_cache, sliding_window)`;
the engine only ever uses AttentionView. (The bundled model's trainer, tools/tiny_model, passes a
cache-free view of its own through the same Transformer.)
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .kernels import decode_attention_reference, full_view_mask, kernel_supports

ATTENTION_BACKENDS = ("auto", "torch", "triton")
MAX_KERNEL_QUERIES = 16  # the Triton kernel's query-tile budget (draft 1-2 tokens, verify gamma+1)


@dataclasses.dataclass
class AttentionView:
    """What one forward pass attends to (geometry), how it is computed (execution), and its side
    effects. One object per pass; every layer reads its own slice of `selected`."""
    # -- geometry: which keys each query reads
    cache_len: torch.Tensor  # [b] committed length; new token t of sequence i sits at cache_len[i] + t
    n_tokens: int  # T, new tokens per sequence in this pass
    window: Optional[int] = None  # None: full view; int: sparse view with this sliding window
    selected: Optional[list] = None  # sparse view: per layer [b, H_kv, K] positions, -1 = unused slot
    # The cache rows of this pass's sequences [b]; None: rows 0..b-1, the whole batch (every decode
    # step). A refill prefills a few rows while the others keep their sequences.
    rows: Optional[torch.Tensor] = None
    # Chunked prefill: every sequence's new tokens start at this position (cache_len == it).
    prefill_start: Optional[int] = None
    # -- execution
    backend: str = "torch"  # "torch" or "triton" (resolved by resolve_backend)
    kv_limit: Optional[int] = None  # eager-only hint: no query reaches past this many keys
    # -- side effects (the defaults are every hot path's)
    write_cache: bool = True  # False: a read-only pass over tokens whose K/V are already cached
    # Called as observer(layer_id, q [b, H, T, D], k_cache [b, H_kv, S, D], view) after the cache
    # write; SnapKV scores prompt positions with it.
    observer: Optional[Callable] = None
    # Full view only: per layer a [b, H_kv, S_max] fp32 buffer overwritten with the attention mass
    # each cache position receives from this pass's queries (a re-selecting draft reads it).
    scores: Optional[list] = None

    @property
    def input_pos(self) -> torch.Tensor:
        """[b, T] absolute position of every new token (used for RoPE and the cache write)."""
        return self.cache_len.long()[:, None] + torch.arange(self.n_tokens, device=self.cache_len.device)

    @property
    def is_sparse(self) -> bool:
        return self.window is not None

    def rotary(self, model, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin [b, 1, T, D] at the new tokens' positions (T = n_tokens), from the model's tables."""
        pos = self.input_pos
        return model.rope_cos[pos].unsqueeze(1), model.rope_sin[pos].unsqueeze(1)

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache,
               sliding_window: Optional[int] = None) -> torch.Tensor:
        """Write k, v [b, H_kv, T, D] into the cache (unless write_cache is off), then attend with
        q [b, H, T, D] through this view, within the layer's `sliding_window` (None: unbounded)
        -> [b, H, T, D]."""
        if self.write_cache:
            kv_cache.update(self.input_pos, k, v, self.rows)
        k_cache, v_cache = kv_cache.read(self.rows, self.keys_needed(kv_cache.max_seq_len))  # [b, H_kv, S, D]
        if self.observer is not None:
            self.observer(layer_id, q, k_cache, self)
        return attend(q, k_cache, v_cache, self, layer_id, q.shape[-1] ** -0.5, sliding_window)

    def keys_needed(self, max_seq_len: int) -> int:
        """How many leading cache positions any query of this pass can read."""
        if self.prefill_start is not None:
            return self.prefill_start + self.n_tokens
        return max_seq_len if self.kv_limit is None else min(self.kv_limit, max_seq_len)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` picks the Triton kernel where it can run (CUDA with triton installed)."""
    from .errors import ParameterError

    if name not in ATTENTION_BACKENDS:
        raise ParameterError(f"{{attention}} must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "torch":
        return "torch"
    from .kernels import triton_available  # lazily: importing triton is slow

    usable = triton_available(device)  # CUDA, or the (slow) interpreter when TRITON_INTERPRET=1
    if name == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not usable:
        raise ParameterError("{attention} 'triton' needs a CUDA device and the triton package (or "
                             "TRITON_INTERPRET=1 for a slow CPU check); use {attention} 'torch'")
    return "triton"


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, view: AttentionView,
           layer_id: int, scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
    """q [B, H, T, D] against the cache [B, H_kv, S_max, D] through `view`, within the layer's
    sliding window -> [B, H, T, D]."""
    selected = view.selected[layer_id] if view.is_sparse else None
    mass_out = view.scores[layer_id] if view.scores is not None else None
    if not view.is_sparse and q.shape[2] > MAX_KERNEL_QUERIES:
        if mass_out is not None:
            raise ValueError(f"attention mass is emitted by decode-shaped passes (<= {MAX_KERNEL_QUERIES} tokens)")
        return _prefill_attention(q, k_cache, v_cache, view, scale, sliding_window)
    use_kernel = view.backend == "triton" and q.shape[2] <= MAX_KERNEL_QUERIES
    if use_kernel and not kernel_supports(q.shape[1] // k_cache.shape[1] * q.shape[2], q.shape[3]):
        warnings.warn(f"head_dim {q.shape[3]} / {q.shape[1] // k_cache.shape[1]} heads per KV head is "
                      "outside the Triton kernel's range: decode attention runs the torch path")
        use_kernel = False
    if use_kernel:
        from .kernels import decode_attention_triton

        fn = decode_attention_triton
    else:
        fn = decode_attention_reference
    return fn(q, k_cache, v_cache, view.cache_len, scale=scale, sel_pos=selected, window=view.window,
              kv_limit=view.kv_limit, sliding_window=sliding_window, mass_out=mass_out)


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       view: AttentionView, scale: float, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Full view for a long chunk of new tokens: SDPA picks a fused kernel (flash / memory-
    efficient on GPU), so scores [T, S] are never materialised in fp32 at 100K-token prompts."""
    from torch.nn.attention.bias import causal_lower_right  # here: importing it starts dynamo (~2 s per CLI run)

    T = q.shape[2]
    if view.prefill_start is not None:
        # Keys 0..start+T-1, causal aligned to the bottom right: one mask for the whole batch,
        # which lets SDPA use flash / memory-efficient kernels instead of a [B, T, S] bool mask.
        start, S = view.prefill_start, view.prefill_start + T
        if sliding_window is None:
            return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S],
                                                  attn_mask=causal_lower_right(T, S), scale=scale, enable_gqa=True)
        # A sliding layer: only keys from start - window + 1 on can be seen by this chunk; its band
        # [T, S - lo] (key lo + j visible to token t iff p - window < lo + j <= p, p = start + t).
        lo = max(start - sliding_window + 1, 0)
        band = full_view_mask(torch.full((1,), start - lo, device=q.device), T, S - lo, sliding_window)[0]
        return F.scaled_dot_product_attention(q, k_cache[:, :, lo:S], v_cache[:, :, lo:S], attn_mask=band,
                                              scale=scale, enable_gqa=True)
    S = k_cache.shape[2] if view.kv_limit is None else min(view.kv_limit, k_cache.shape[2])
    mask = full_view_mask(view.cache_len, T, S, sliding_window)[:, None]  # [B, 1, T, S]
    return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], attn_mask=mask,
                                          scale=scale, enable_gqa=True)
