"""What a forward pass attends to (`AttentionView`) and which implementation computes it.

The model never knows whether it is prefilling, verifying or drafting: it receives a view.
  full view   keys s <= position of the query over the live cache (prefill, decode, verify)
  sparse view the draft's bounded slice: per-layer selected positions (StreamingLLM sink or
              SnapKV picks) plus a sliding window of the most recent `window` positions.
KV selection policies (policies/) choose what a sparse view reads; they are not new model classes.
A cache-free pass (training, scoring) takes a `CausalView` instead: every earlier token, or the
streaming draft's sink + window, computed over the given tokens without a cache.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .kernels import decode_attention_reference, full_view_mask, kernel_supports

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


@dataclasses.dataclass(frozen=True)
class CausalView:
    """A cache-free pass over positions 0..T-1 of the given tokens (training, scoring).

    draft_window None: the plain causal pass, each query reads every earlier position.
    draft_window W: a teacher-forced self-speculation pass, for training a model to draft for
    itself. The batch is doubled: the first half is the target (plain causal), the second half is
    its streaming draft, which at every position p reads what a draft step at p reads: the keys and
    values the target wrote (the first half's) at positions p - W < s < p and at the sink positions
    s < sink with s <= p - W, plus its own key and value at p."""
    draft_window: Optional[int] = None
    sink: int = 0
    chunk: int = 256  # draft queries per block of the banded computation (cost only, never the result)

    @property
    def twin(self) -> bool:
        return self.draft_window is not None


FULL_CAUSAL = CausalView()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: CausalView) -> torch.Tensor:
    """q [B, H, T, D], k and v [B, H_kv, T, D] of the same T tokens -> [B, H, T, D] through `view`
    (for a twin view B is twice the batch: target rows, then draft rows)."""
    if not view.twin:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    B = q.shape[0] // 2
    target = F.scaled_dot_product_attention(q[:B], k[:B], v[:B], is_causal=True, enable_gqa=True)
    draft = _streaming_draft_attention(q[B:], k[B:], v[B:], k[:B], v[:B], view)
    return torch.cat([target, draft])


def _streaming_draft_attention(q, k_own, v_own, k, v, view: CausalView) -> torch.Tensor:
    """The draft half of a twin view, in blocks of `chunk` queries: block c reads the sink keys and
    the chunk + window target keys ending just before its last query, plus each query's own key, so
    the cost grows with T * (sink + chunk + window) instead of T^2 and no [T, T] mask is built.
    Scores are formed explicitly (the own key differs per query, which SDPA cannot express)."""
    B, H, T, D = q.shape
    H_kv, sink, window, chunk = k.shape[1], view.sink, view.draft_window, view.chunk
    G, n = H // H_kv, -(-T // chunk)
    pad, span = n * chunk - T, chunk + window

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, d] -> [B, n, h, chunk, d]
        return F.pad(x, (0, 0, 0, pad)).view(B, x.shape[1], n, chunk, x.shape[-1]).transpose(1, 2)

    def keys(x: torch.Tensor) -> torch.Tensor:  # [B, H_kv, T, D] -> [B, n, H_kv, sink + span, D]
        windows = F.pad(x, (0, 0, window, pad)).unfold(2, span, chunk).permute(0, 2, 1, 4, 3)
        return torch.cat([x[:, None, :, :sink].expand(B, n, -1, -1, -1), windows], dim=3)

    pos = torch.arange(n * chunk, device=q.device).view(n, chunk, 1)  # query positions p
    key_pos = pos[:, :1] - window + torch.arange(span, device=q.device)  # key j of block c: c*chunk - W + j
    in_window = (key_pos > pos - window) & (key_pos < pos) & (key_pos >= 0)  # p itself: the own key
    sink_visible = (torch.arange(sink, device=q.device) <= pos - window).expand(n, chunk, sink)
    mask = torch.cat([sink_visible, in_window], dim=-1).repeat(1, G, 1)[None, :, None]  # [1, n, 1, G*chunk, K]
    # query heads grouped by KV head, row g * chunk + i: [B, n, H_kv, G * chunk, D]; a query's own
    # key and value are its KV head's at the same position i, tiled over the G heads of the group
    qg = blocks(q).reshape(B, n, H_kv, G * chunk, D) * D ** -0.5
    k_own, v_own = blocks(k_own).repeat(1, 1, 1, G, 1), blocks(v_own).repeat(1, 1, 1, G, 1)
    scores = (qg @ keys(k).transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(torch.cat([scores, (qg * k_own).sum(-1, keepdim=True)], dim=-1), dim=-1)
    out = probs[..., :-1] @ keys(v) + probs[..., -1:] * v_own
    return out.reshape(B, n, H, chunk, D).transpose(1, 2).reshape(B, H, n * chunk, D)[:, :, :T]


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` picks the Triton kernel where it can run (CUDA with triton installed)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    from .kernels import triton_available  # lazily: importing triton is slow

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
        from .kernels import decode_attention_triton

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
