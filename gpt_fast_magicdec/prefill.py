"""Chunked prefill of ragged prompts into chosen cache rows.

Prefill is compute-bound and its shapes vary with the prompts, so it runs outside the captured
graphs, in chunks that bound activation memory at 100K-token prompts."""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from .attention import AttentionView
from .model import Transformer


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, prompt_len: torch.Tensor, backend: str, chunk: int,
            rows: Optional[torch.Tensor] = None, progress: bool = False) -> torch.Tensor:
    """Prefill prompts tokens [b, L_max] (ragged: padding sits after each prompt and is never
    attended by a real query; prompt_len [b]) into the model's cache rows `rows` [b] (None: rows
    0..b-1) -> the logits at each prompt's last token [b, V] (this rank's vocabulary slice under
    tensor parallelism; see steps.step_output)."""
    b, L = tokens.shape
    last = None
    starts = range(0, L, chunk)
    for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 4, leave=False):
        T = min(chunk, L - start)
        view = AttentionView(cache_len=torch.full((b,), start, device=tokens.device), n_tokens=T, rows=rows,
                             backend=backend, kv_limit=start + T, prefill_start=start)
        idx = (prompt_len - 1 - start).clamp(0, T - 1)[:, None]  # [b, 1] row of each last token
        logits = model(tokens[:, start:start + T], view, output_index=idx)[:, 0]  # [b, V]
        here = (prompt_len - 1 >= start) & (prompt_len - 1 < start + T)
        last = logits if last is None else torch.where(here[:, None], logits, last)
    return last
