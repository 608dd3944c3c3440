"""gpt-fast-magicdec: Llama-family inference with MagicDec sparse-KV speculative decoding.

The public surface, used by `generate.py`, `bench.py` and the README's Python example:

    import gpt_fast_magicdec as gfm

    engine, tokenizer = gfm.load_engine("checkpoints/llama-3.1-8b")        # None: the bundled tiny model
    ids = [tokenizer.encode("It was a dark and stormy night")]
    result = engine.generate(ids, 64, draft=gfm.DraftConfig(kind="self", kv="streaming", budget=512))
    print(tokenizer.decode(result.tokens[0]), result.stats.acceptance_rate)

`Engine.generate` takes token-id lists (ragged) and returns per-sequence token ids plus statistics;
`DraftConfig` picks the drafter (`none`, `self`, `model`) and the KV selection policy (`POLICIES`).
Everything else in the package is an implementation module with its own docstring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .config import PRESETS, ModelArgs
from .drafting import DraftConfig
from .engine import Engine, GenerationResult, GenerationStats, load_model, random_model
from .errors import UserError
from .policies import POLICIES
from .sampling import SamplingParams
from .tokenizer import Tokenizer, check_same_tokenizer, check_tokenizer_fits, load_tokenizer

__all__ = ["DraftConfig", "Engine", "GenerationResult", "GenerationStats", "ModelArgs", "POLICIES", "PRESETS",
           "SamplingParams", "Tokenizer", "UserError", "load_engine", "load_model", "load_tokenizer",
           "random_model"]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what the kernels and the roofline numbers assume), fp32 on CPU (exact checks)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_engine(checkpoint: Union[str, Path, None] = None, *, draft_checkpoint: Union[str, Path, None] = None,
                device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                attention: str = "auto", compile: Optional[bool] = None) -> tuple[Engine, Tokenizer]:
    """A converted checkpoint (None: the bundled tiny model) as (Engine, Tokenizer), on one device.

    A standalone draft must share the target's tokenizer (checked). For tensor parallelism use
    `generate.py` under torchrun, which shards the weights over the ranks."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if checkpoint is None:
        from .tiny import bundled_checkpoint

        checkpoint = bundled_checkpoint()
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(Path(checkpoint), device, dtype)
    check_tokenizer_fits(tokenizer, model.args.vocab_size, str(checkpoint))
    draft_model = None
    if draft_checkpoint is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(draft_checkpoint), str(draft_checkpoint))
        draft_model = load_model(Path(draft_checkpoint), device, dtype)
    return Engine(model, draft_model=draft_model, attention=attention, compile=compile), tokenizer
