"""The cache-free pass the trainer and the scoring tools run through the engine's Transformer.

The engine's model takes a view that writes the KV cache and attends (gpt_fast_magicdec.attention);
training needs none of that: a whole window of tokens at once, every position causal, no cache.
CausalView is such a view. Its twin form also runs, teacher-forced, the streaming self-draft the
bundled model is trained to be: the batch is doubled (target rows, then draft rows), and the draft
half reads what a draft step at each position reads.

    logits = causal_logits(model, tokens)                                      # [B, T, V]
    both = causal_logits(model, tokens, CausalView(draft_window=496, sink=16))   # [2B, T, V]
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from gpt_fast_magicdec.kernels import full_view_mask
from gpt_fast_magicdec.model import rope_tables


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

    def rotary(self, model, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin [1, 1, T, D] for positions 0..T-1 (tables built here: no caches are set up)."""
        cos, sin = rope_tables(model.args, n_tokens)
        device = model.tok_embeddings.weight.device
        return cos.to(device)[None, None], sin.to(device)[None, None]

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache,
               sliding_window: Optional[int] = None) -> torch.Tensor:
        """q [B, H, T, D], k and v [B, H_kv, T, D] of the same T tokens -> [B, H, T, D]; no cache.
        A sliding-window layer reads keys p - sliding_window < s <= p (plain pass only)."""
        if sliding_window is not None:
            if self.twin:
                raise ValueError("the twin (self-draft training) pass has no sliding-window layers")
            band = full_view_mask(torch.zeros(1, dtype=torch.long, device=q.device), q.shape[2], q.shape[2],
                                  sliding_window)[0]  # [T, T]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
        return causal_attention(q, k, v, self)


FULL_CAUSAL = CausalView()


def causal_logits(model, tokens: torch.Tensor, view: CausalView = FULL_CAUSAL) -> torch.Tensor:
    """tokens [B, T] -> fp32 logits [B, T, V]; a twin view gives [2B, T, V], the target's logits and
    then its streaming draft's, teacher-forced on the same tokens."""
    return model(torch.cat([tokens, tokens]) if view.twin else tokens, view)


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

