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
    """What the engine asks of a drafter. The defaults are a drafter that runs no model here."""

    reread_prev = False  # the first draft step also feeds `prev` (speculative.propose)
    model: Optional[Transformer] = None  # the model it runs on this rank
    selection: Optional[list] = None  # per layer [B, H_kv, K] positions its view reads; None: full view

    def __init__(self, config: DraftConfig):
        self.config = config

    @property
    def view_key(self) -> tuple:
        """What a captured draft step bakes in besides its StepSpec: which model, which view. The
        engine re-captures draft steps, and allocates new selection buffers, when it changes."""
        return (type(self).__name__,)

    def new_selection(self, batch: int, device) -> Optional[list]:
        """Empty selection buffers for this view (the engine keeps them while view_key holds)."""
        return None

    def prefill(self, prefill: Callable, tokens: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """Fill the drafter's own cache with the prompts tokens [B, L_max] (prompt_len [B])."""

    def prepare(self, tokens: torch.Tensor, prompt_len: torch.Tensor, backend: str) -> None:
        """After prefill: choose what the draft view reads."""

    def step_specs(self, greedy: bool) -> list[StepSpec]:
        """The steps it runs, for the engine to capture before decoding."""
        return []

    def step(self, runner: StepRunner, tokens: torch.Tensor, cache_len: torch.Tensor, greedy: bool) -> torch.Tensor:
        """tokens [B, T] at cache_len [B] -> the proposal: ids [B, 1] (greedy) or logits [B, 1, V]."""
        raise NotImplementedError


class LocalDrafter(Drafter):
    """A draft model on this rank, read through its selection policy's view."""

    step_tokens: tuple = (1,)  # the step shapes it runs, hence captures

    def __init__(self, model: Transformer, config: DraftConfig):
        super().__init__(config)
        self.model = model

    @property
    def view_key(self) -> tuple:
        return type(self).__name__, self.config.kv, self.config.n_selected, self.config.window

    def new_selection(self, batch: int, device) -> Optional[list]:
        """Per layer [B, H_kv, n_selected] positions, -1 = unused; None for the full view."""
        if self.config.full:
            return None
        shape = (batch, self.model.args.n_kv_heads, self.config.n_selected)
        return [torch.full(shape, -1, dtype=torch.long, device=device) for _ in range(self.model.args.n_layers)]

    def prepare(self, tokens, prompt_len, backend) -> None:
        picked = self.config.policy.select(self.model, self.config, tokens, prompt_len, backend)
        if picked is not None:
            for buf, sel in zip(self.selection, picked):
                buf.copy_(sel)  # in place: captured draft steps read these buffers

    def spec(self, n_tokens: int, greedy: bool) -> StepSpec:
        return StepSpec("draft", n_tokens, self.config.window, self.config.n_selected, last_only=True,
                        greedy=greedy)

    def step_specs(self, greedy):
        return [self.spec(T, greedy) for T in self.step_tokens]

    def step(self, runner, tokens, cache_len, greedy):
        return runner.run(self.spec(tokens.shape[1], greedy), self.model, tokens, cache_len, self.selection)


class SelfDrafter(LocalDrafter):
    """The target reads its own cache through the sparse view; verification wrote every K/V it
    needs, so nothing is re-read and nothing is prefilled twice."""


class ModelDrafter(LocalDrafter):
    """A standalone draft model: its own cache, prefilled on the same prompts. It lags one token
    after a round that accepted every draft, hence the re-read of prev in a fixed 2-token step."""

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
            vocab = self.model.args.vocab_size
            out = self.tp.share_draft_output(out, greedy, tokens.shape[0], vocab, tokens.device)
        return out


class RemoteDrafter(Drafter):
    """A tensor-parallel rank outside --draft-ranks: the draft runs elsewhere, and each step's
    output arrives by broadcast (tp.TensorParallel.share_draft_output)."""

    reread_prev = True  # as the ModelDrafter it mirrors, so every rank runs the same rounds

    def __init__(self, config: DraftConfig, tp, vocab: int):
        super().__init__(config)
        self.tp, self.vocab = tp, vocab

    def step(self, runner, tokens, cache_len, greedy):
        return self.tp.share_draft_output(None, greedy, tokens.shape[0], self.vocab, tokens.device)


def make_drafter(target: Transformer, draft_model: Optional[Transformer], config: DraftConfig,
                 tp=None) -> Optional[Drafter]:
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
