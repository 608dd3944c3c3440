"""Who proposes the draft tokens, one class per kind; the engine asks, never branches on the kind.

  SelfDrafter    the target itself through the policy's sparse view of its own cache: zero-copy,
                 no second prefill, no re-read (DESIGN.md, decision 3)
  ModelDrafter   a standalone draft model with its own cache and prefill; it re-reads `prev`
                 with a fixed 2-token first step (decision 4); under tensor parallelism with
                 --draft-ranks it shares each step's output with the ranks that hold no draft
  RemoteDrafter  a rank outside --draft-ranks: runs no model, receives every step's output

Plain decoding has no drafter (make_drafter returns None).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .drafting import DraftConfig
from .errors import UserError
from .model import Transformer
from .steps import StepRunner, StepSpec


class Drafter:
    """A local draft model read through a selection policy's view (the self and standalone kinds)."""

    reread_prev = False  # the first draft step also feeds `prev` (speculative.propose)
    step_tokens: tuple = (1,)  # the step shapes it runs, hence captures

    def __init__(self, model: Transformer, config: DraftConfig):
        self.model, self.config = model, config
        # Per layer [B, H_kv, K] selected positions that its steps read; None for a full view. The
        # engine hands the same buffers to every drafter with the same view_key, as captured draft
        # graphs read them by address.
        self.selection: Optional[list] = None

    @property
    def view_key(self) -> tuple:
        """What a captured draft step bakes in besides its StepSpec: which model, which view."""
        return type(self).__name__, self.config.kv, self.config.n_selected, self.config.window

    def new_selection(self, batch: int, device) -> Optional[list]:
        """Empty selection buffers for this view: per layer [B, H_kv, n_selected], -1 = unused."""
        if self.config.full:
            return None
        shape = (batch, self.model.args.n_kv_heads, self.config.n_selected)
        return [torch.full(shape, -1, dtype=torch.long, device=device) for _ in range(self.model.args.n_layers)]

    def prefill(self, prefill: Callable, tokens: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """Fill this drafter's own cache with the prompts tokens [B, L_max] (none by default)."""

    def prepare(self, tokens: torch.Tensor, prompt_len: torch.Tensor, backend: str) -> None:
        """After prefill: the policy picks the positions the draft view reads."""
        picked = self.config.policy.select(self.model, self.config, tokens, prompt_len, backend)
        if picked is not None:
            for buf, sel in zip(self.selection, picked):
                buf.copy_(sel)

    def spec(self, n_tokens: int, greedy: bool) -> StepSpec:
        return StepSpec("draft", n_tokens, self.config.window, self.config.n_selected, last_only=True,
                        greedy=greedy)

    def step_specs(self, greedy: bool) -> list[StepSpec]:
        return [self.spec(T, greedy) for T in self.step_tokens]

    def step(self, runner: StepRunner, tokens: torch.Tensor, cache_len: torch.Tensor, greedy: bool) -> torch.Tensor:
        """tokens [B, T] at cache_len [B] -> ids [B, 1] (greedy) or logits [B, 1, V]."""
        return runner.run(self.spec(tokens.shape[1], greedy), self.model, tokens, cache_len, self.selection)


class SelfDrafter(Drafter):
    """The target reads its own cache through the sparse view; verification wrote every K/V it
    needs, so nothing is re-read and nothing is prefilled twice."""


class ModelDrafter(Drafter):
    reread_prev = True
    step_tokens = (1, 2)  # 2: the first step of a round, [prev, x0]

    def __init__(self, model: Transformer, config: DraftConfig, tp=None):
        super().__init__(model, config)
        self.tp = tp

    def prefill(self, prefill, tokens, prompt_len):
        prefill(self.model, tokens, prompt_len)

    def step(self, runner, tokens, cache_len, greedy):
        out = super().step(runner, tokens, cache_len, greedy)
        if self.tp is not None:  # ranks outside --draft-ranks get its proposals
            out = self.tp.share_draft_output(out, greedy, tokens.shape[0], self.model.args.vocab_size, tokens.device)
        return out


class RemoteDrafter:
    """A tensor-parallel rank outside --draft-ranks: the draft runs elsewhere, and each step's
    output arrives by broadcast (tp.TensorParallel.share_draft_output)."""

    reread_prev = True  # as the ModelDrafter it mirrors: the rounds' shapes agree on every rank
    selection = None

    def __init__(self, config: DraftConfig, tp, vocab: int):
        self.config, self.tp, self.vocab = config, tp, vocab

    @property
    def view_key(self) -> tuple:
        return (type(self).__name__,)

    def new_selection(self, batch: int, device) -> None:
        return None

    def prefill(self, prefill, tokens, prompt_len) -> None:
        pass

    def prepare(self, tokens, prompt_len, backend) -> None:
        pass

    def step_specs(self, greedy: bool) -> list[StepSpec]:
        return []

    def step(self, runner, tokens, cache_len, greedy):
        return self.tp.share_draft_output(None, greedy, tokens.shape[0], self.vocab, tokens.device)


def make_drafter(target: Transformer, draft_model: Optional[Transformer], config: DraftConfig, tp=None):
    """The drafter for `config` on this rank, or None for plain decoding."""
    if not config.enabled:
        return None
    if config.kind == "self":
        return SelfDrafter(target, config)
    if draft_model is not None:
        return ModelDrafter(draft_model, config, tp)
    if tp is not None and not tp.holds_draft:
        return RemoteDrafter(config, tp, target.args.vocab_size)
    raise UserError("a standalone draft needs --draft-checkpoint")
