"""SnapKV (arXiv 2404.14469): per layer and KV head, the prompt positions the last prompt tokens
attend to most. Scores are pooled over the observation window and the query heads of each KV
head, smoothed with a 1-D pooling, then top-k; plus the sliding window."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import AttentionView
from .base import SelectionPolicy, top_positions


class SnapKV(SelectionPolicy):
    name = "snapkv"
    help = "SnapKV: per layer and KV head, the prompt positions the last prompt tokens attend to most + a window"

    def default_window(self, config) -> int:
        return max(config.gamma + 1, config.budget // 4)

    def smallest_budget(self, config) -> int:
        return 4 * (config.gamma + 1) + 4  # a quarter-budget window of gamma + 1

    def select(self, model, config, tokens, prompt_len, backend, rows=None):
        """Re-runs the last obs_window prompt tokens (cache untouched) with an observer that scores
        every prompt position from their attention."""
        obs = max(1, min(config.obs_window, int(prompt_len.min())))
        observer = SnapKVObserver(config.n_selected, prompt_len, config.pool_kernel, cache_len=model.max_seq_len,
                                  layer_windows=model.args.layer_windows)
        start = prompt_len - obs  # [b]
        positions = start[:, None] + torch.arange(obs, device=tokens.device)  # [b, obs]
        view = AttentionView(cache_len=start, n_tokens=obs, backend=backend, kv_limit=int(prompt_len.max()),
                             rows=rows, observer=observer, write_cache=False)
        with torch.no_grad():
            model(tokens.gather(1, positions), view, output_index=positions[:, :1] - start[:, None])
        return observer.layers(model.args.n_layers)


SNAPKV_CHUNK = 2048  # keys scored at a time: bounds the scoring temporaries at 100K-token prompts


def _chunk_scores(qg: torch.Tensor, k: torch.Tensor, query_pos: torch.Tensor, first_key: int,
                  sliding_window: Optional[int] = None) -> torch.Tensor:
    """Scaled, masked scores of grouped queries qg [B, H_kv, G*T, D] against keys k [B, H_kv, C, D]
    at positions first_key.. -> fp32 [B, H_kv, G*T, C]. The matmul runs in the cache dtype (fp32
    accumulation on GPUs); only this chunk of scores is fp32."""
    C, D = k.shape[2], k.shape[3]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * D ** -0.5
    key_pos = torch.arange(first_key, first_key + C, device=k.device)[None, None, None, :]  # [1, 1, 1, C]
    visible = key_pos <= query_pos[:, None, :, None]  # [B, 1, G*T, C]
    if sliding_window is not None:
        visible &= key_pos > query_pos[:, None, :, None] - sliding_window
    return scores.masked_fill(~visible, float("-inf"))


def attention_votes(q: torch.Tensor, k_cache: torch.Tensor, cache_len: torch.Tensor, S: int,
                    chunk: int, sliding_window: Optional[int] = None) -> torch.Tensor:
    """Attention each of the first S cache positions receives from the queries q [B, H, T, D] (new
    tokens at cache_len[b] + t, full causal view, within the layer's sliding window), summed over
    the queries of each KV head -> fp32 [B, H_kv, S].

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
        scores = _chunk_scores(qg, k_cache[:, :, s:min(s + chunk, S)], query_pos, s, sliding_window)
        lse = torch.logaddexp(lse, scores.logsumexp(dim=-1, keepdim=True))
    votes = []
    for s in starts:
        scores = _chunk_scores(qg, k_cache[:, :, s:min(s + chunk, S)], query_pos, s, sliding_window)
        votes.append((scores - lse).exp().sum(dim=2))  # [B, H_kv, C]
    return torch.cat(votes, dim=-1)


class SnapKVObserver:
    """Records, per layer, the top-k prompt positions by pooled observation-window attention.

    Installed as the view's observer for one extra full-view pass over the last `T` prompt
    tokens after prefill (it rewrites their K/V with identical values), so prefill itself stays
    one plain code path and ragged prompts need no special casing."""

    def __init__(self, n_select: int, prompt_len: torch.Tensor, pool_kernel: int = 7,
                 chunk: int = SNAPKV_CHUNK, cache_len: Optional[int] = None, layer_windows: Optional[tuple] = None):
        self.n_select = n_select
        self.prompt_len = prompt_len  # [B]
        self.pool_kernel = pool_kernel
        self.chunk = chunk
        self.cache_len = cache_len  # positions of the whole cache (default: what the pass reads)
        # Each layer's sliding window: its observation queries vote only for what that layer's
        # attention reads (a key outside it gets no attention from the target either).
        self.layer_windows = layer_windows
        self.selected: dict[int, torch.Tensor] = {}

    def __call__(self, layer_id: int, q: torch.Tensor, k_cache: torch.Tensor, view) -> None:
        S = int(self.prompt_len.max())
        window = self.layer_windows[layer_id] if self.layer_windows else None
        votes = attention_votes(q, k_cache, view.cache_len, S, self.chunk, window)  # [B, H_kv, S]
        votes = F.avg_pool1d(votes, self.pool_kernel, stride=1, padding=self.pool_kernel // 2,
                             count_include_pad=False)  # keep neighbours of a hit (SnapKV clustering)
        in_prompt = torch.arange(S, device=q.device)[None, None, :] < self.prompt_len[:, None, None]
        votes = votes.masked_fill(~in_prompt, float("-inf"))
        limit = self.cache_len or k_cache.shape[2]
        self.selected[layer_id] = top_positions(votes, self.n_select, self.prompt_len, limit)  # [B, H_kv, n_select]

    def layers(self, n_layers: int) -> list[torch.Tensor]:
        return [self.selected[i] for i in range(n_layers)]


SNAPKV = SnapKV()
