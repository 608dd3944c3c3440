"""gpt-fast-magicdec: Llama-family inference with MagicDec sparse-KV speculative decoding.

The public surface, used by the CLIs (gfm-generate, gfm-bench) and the README's Python example:

    import gpt_fast_magicdec as gfm

    engine, tokenizer = gfm.load_engine("checkpoints/llama-3.1-8b")        # None: the bundled tiny model
    ids = [tokenizer.encode("It was a dark and stormy night")]
    result = engine.generate(ids, 64, draft=gfm.DraftConfig(kind="self", kv="streaming", budget=512))
    print(tokenizer.decode(result.tokens[0]), result.stats.acceptance_rate)

    for completion in engine.stream(many_prompts, 256, slots=32, draft=...):   # a job
        print(completion.index, tokenizer.decode(completion.tokens))

    engine.run_batch(texts, 256, out="completions.jsonl", resume=True, slots=32)  # a resumable batch run

`Engine.generate` takes token-id lists (ragged) and returns per-prompt token ids plus statistics;
`Engine.stream` runs a job over many prompts through a fixed number of slots and yields each
completion as it finishes; `Engine.run_batch` (a `BatchRun`) is what gfm-generate runs: texts or ids
in, one JSON line per completion out as it finishes, resumable, across data-parallel replicas. `DraftConfig` picks the drafter (`DRAFT_KINDS`: none, self, model,
lookup, lookup+self, ...) and a model drafter's KV selection policy (`POLICIES`). Everything else
in the package is an implementation module with its own docstring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .batch import BatchResult, BatchRun
from .checkpoint import load_model, random_model
from .config import PRESETS, ModelArgs
from .drafters import DRAFT_KINDS
from .drafting import DraftConfig
from .devices import check_model_source, resolve_device, resolve_dtype
from .engine import Engine
from .errors import ParameterError, UserError
from .memory import check_fits, model_bytes
from .policies import POLICIES
from .sampling import SamplingParams
from .stats import Completion, GenerationResult, GenerationStats
from .tokenizer import Tokenizer, check_same_tokenizer, check_tokenizer_fits, load_tokenizer

__all__ = ["BatchResult", "BatchRun", "Completion", "DRAFT_KINDS", "DraftConfig", "Engine", "GenerationResult",
           "GenerationStats", "ModelArgs", "POLICIES", "PRESETS", "ParameterError", "SamplingParams", "Tokenizer",
           "UserError", "load_engine", "load_model", "load_tokenizer", "random_model"]

PathLike = Union[str, Path]


def load_engine(checkpoint: Optional[PathLike] = None, *, draft_checkpoint: Optional[PathLike] = None,
                random_weights: Optional[str] = None, draft_random_weights: Optional[str] = None,
                device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                attention: str = "auto", compile: Optional[bool] = None, tp=None, seed: int = 0
                ) -> tuple[Engine, Optional[Tokenizer]]:
    """The one way to build an engine -> (Engine, its Tokenizer; None for random weights).

    checkpoint: a converted checkpoint directory (None: the bundled tiny model), or instead
    random_weights, a PRESETS name (random weights of that shape, seeded: for speed only).
    draft_checkpoint (or draft_random_weights): a standalone draft sharing the target's tokenizer
    (checked); "bundled-draft" names the bundled tiny draft. tp: a tp.TensorParallel under
    torchrun (generate.py starts it): each rank loads its shard, the draft only where its ranks are."""
    from .tiny import bundled_checkpoint, resolve_draft_checkpoint

    check_model_source(checkpoint, random_weights, draft_checkpoint, draft_random_weights)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = None
    if random_weights is not None:
        args = ModelArgs.from_preset(random_weights)
        source = f"random weights {random_weights} (seed {seed})"
    else:
        source = "bundled" if checkpoint is None else str(Path(checkpoint).resolve())
        checkpoint = Path(checkpoint) if checkpoint is not None else bundled_checkpoint()
        args = ModelArgs.load(checkpoint)  # the whole shape (under TP, model.args is this rank's shard)
        tokenizer = load_tokenizer(checkpoint)
        check_tokenizer_fits(tokenizer, args.vocab_size, checkpoint)
    draft_checkpoint = resolve_draft_checkpoint(None if draft_checkpoint is None else Path(draft_checkpoint))
    draft_args = (ModelArgs.load(draft_checkpoint) if draft_checkpoint is not None
                  else ModelArgs.from_preset(draft_random_weights) if draft_random_weights is not None else None)
    draft_source = (str(draft_checkpoint.resolve()) if draft_checkpoint is not None else
                    f"random weights {draft_random_weights} (seed {seed + 1})" if draft_random_weights else None)
    # Before any weight is read: a model that cannot fit is one line with the numbers, not the OOM killer.
    ranks = tp.world_size if tp else 1
    check_fits(f"loading {random_weights or checkpoint}" + (" and its draft" if draft_args else "")
               + (f" (one of {ranks} tensor-parallel shards)" if ranks > 1 else ""),
               sum(model_bytes(a, dtype) for a in (args, draft_args) if a is not None) // ranks, device,
               advice="use a smaller model or dtype, more tensor-parallel ranks, or a device with more memory")
    if random_weights is not None:
        model = tp.random_model(args, device, dtype, seed) if tp else random_model(args, device, dtype, seed)
    else:
        model = tp.load_model(checkpoint, device, dtype) if tp else load_model(checkpoint, device, dtype)
    draft_model = None
    if draft_checkpoint is not None:
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(draft_checkpoint), draft_checkpoint)
        if tp is None:
            draft_model = load_model(draft_checkpoint, device, dtype)
        elif tp.holds_draft:
            draft_model = tp.load_model(draft_checkpoint, device, dtype, draft=True)
    elif draft_random_weights is not None:
        if tp is not None:
            raise ParameterError("{draft_random_weights} runs on one device only (no tensor parallelism)")
        draft_model = random_model(draft_args, device, dtype, seed + 1)
    engine = Engine(model, draft_model=draft_model, attention=attention, compile=compile, tp=tp, args=args,
                    draft_args=draft_args, tokenizer=tokenizer, source=source, draft_source=draft_source)
    return engine, tokenizer
