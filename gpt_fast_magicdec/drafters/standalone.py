"""A standalone draft model: its own weights and cache, prefilled on the same prompts, read
through the config's view (or its whole cache with the `full` policy: classic speculative decoding).

Under tensor parallelism the draft may live on a subset of ranks (--draft-ranks): those run it and
broadcast each step's output (tp.TensorParallel.share_draft_output); the other ranks hold a
RemoteDrafter that runs no model and receives it, so every rank runs the same rounds."""
from __future__ import annotations

from ..errors import ParameterError
from ..prefill import prefill
from .base import DraftContext, ModelDrafter


class StandaloneDrafter(ModelDrafter):
    first_tokens = 2  # it lags one token after a round that accepted every draft: re-read `prev`

    def __init__(self, config, ctx: DraftContext):
        super().__init__(config, ctx, ctx.draft_model)
        self.tp = ctx.tp

    @classmethod
    def create(cls, config, ctx: DraftContext) -> ModelDrafter:
        if ctx.draft_model is not None:
            return cls(config, ctx)
        if ctx.tp is not None and not ctx.tp.holds_draft:
            return RemoteDrafter(config, ctx)
        raise ParameterError("{kind} 'model' needs a standalone draft model: load_engine(..., "
                             "draft_checkpoint=DIR) or Engine(..., draft_model=...)")

    def prefill(self, rows, tokens, prompt_len, chunk, progress=False) -> None:
        prefill(self.model, tokens, prompt_len, self.runner.backend, chunk, rows=rows, progress=progress)
        self.select(rows, tokens, prompt_len)

    def run_step(self, tokens, cache_len, greedy):
        out = super().run_step(tokens, cache_len, greedy)
        if self.tp is not None:  # ranks outside --draft-ranks get its proposals
            out = self.tp.share_draft_output(out, greedy, tokens.shape[0], self.model.args.vocab_size, tokens.device)
        return out


class RemoteDrafter(ModelDrafter):
    """A tensor-parallel rank outside --draft-ranks: the draft runs elsewhere; each step's output
    arrives by broadcast. It mirrors the standalone drafter's steps, so all ranks stay in step."""

    first_tokens = StandaloneDrafter.first_tokens

    def __init__(self, config, ctx: DraftContext):
        super().__init__(config, ctx, None)
        self.tp, self.vocab = ctx.tp, ctx.target.args.vocab_size

    def run_step(self, tokens, cache_len, greedy):
        return self.tp.share_draft_output(None, greedy, tokens.shape[0], self.vocab, tokens.device)
