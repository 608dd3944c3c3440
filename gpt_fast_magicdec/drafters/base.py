"""What every drafter provides, and the base of the drafters that run a model.

A drafter answers one question per round: `propose(state, gamma, sampling) -> Proposal`. It owns
everything that lives as long as its view: its model (or none), its selection buffers, the steps
it runs (captured as CUDA graphs on a GPU). The engine builds one drafter per DraftConfig and
batch shape and keeps it, so its buffers and captured steps stay valid between calls.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..model import Transformer
from ..sampling import DRAFT_STREAM, SamplingParams, select_tokens
from ..steps import Step, StepRunner, StepSpec


@dataclasses.dataclass
class Proposal:
    """A round's draft: tokens [B, g]; probs [B, g, V], the distribution q each token was drawn
    from (None: a deterministic proposal, q one-hot at the token); count [B], how many leading
    tokens are real proposals (None: all g). Tokens past count are never accepted."""
    tokens: torch.Tensor
    probs: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None

    def counts(self) -> torch.Tensor:
        """[B] proposed tokens per sequence."""
        if self.count is not None:
            return self.count
        B, g = self.tokens.shape
        return torch.full((B,), g, dtype=torch.long, device=self.tokens.device)

    def cap(self, n: torch.Tensor) -> torch.Tensor:
        """Accepted counts n [B], never past what was proposed (a no-op when every row proposed all)."""
        return n if self.count is None else torch.minimum(n, self.count)

    @property
    def proposed(self):
        """What each row proposed, for the statistics: count [B], or the int g when all did."""
        return self.tokens.shape[1] if self.count is None else self.count


@dataclasses.dataclass(frozen=True)
class DraftContext:
    """What a drafter is built from: the engine's models and step runner, and its slot count."""
    target: Transformer
    draft_model: Optional[Transformer]  # the standalone draft on this rank, if any
    runner: StepRunner
    batch: int  # slots: the rows of every cache and of every proposal
    tp: object = None  # tp.TensorParallel under torchrun, else None


class Drafter:
    """The interface. The defaults are a drafter with no model and nothing to prepare."""

    reads_cache = False  # proposes by reading a KV cache through the config's selection policy view

    def __init__(self, config):
        self.config = config

    @classmethod
    def create(cls, config, ctx: DraftContext) -> "Drafter":
        """The drafter for `config` on this rank, built from what `ctx` holds (a drafter with no model
        needs none of it; a subclass may return another class here)."""
        return cls(config)

    @classmethod
    def check(cls, config) -> None:
        """Raise ParameterError for a DraftConfig this drafter cannot run (at DraftConfig())."""

    def steps(self, greedy: bool) -> list[Step]:
        """The fixed-shape steps it runs, for the engine to capture before decoding."""
        return []

    def prefill(self, rows: torch.Tensor, tokens: torch.Tensor, prompt_len: torch.Tensor, chunk: int,
                progress: bool = False) -> None:
        """After the target prefilled prompts tokens [b, L] (prompt_len [b]) into slots rows [b]:
        whatever the drafter needs for those slots (its own cache, its view's selected keys)."""

    def propose(self, state, gamma: int, sampling: SamplingParams) -> Proposal:
        """gamma draft tokens for every slot of `state` (speculative.DecodeState)."""
        raise NotImplementedError

    # A re-selecting drafter learns from verification: for the rounds it wants, it hands the
    # verification pass buffers to fill with attention mass, and re-selects once the round committed.
    def score_buffers(self) -> Optional[list]:
        """The per-target-layer buffers it may ask a verification to fill (None: it never asks)."""
        return None

    def round_scores(self, gamma: int) -> Optional[list]:
        """Called once per round before verification: score_buffers() if this round's verification
        must emit attention mass, else None."""
        return None

    def reselect(self, state) -> None:
        """After a round whose verification filled round_scores(): re-select from them."""


class ModelDrafter(Drafter):
    """A drafter that runs gamma steps of a model through the config's view, one token each.

    It owns the model's selection buffers (per layer [B, H_kv, n_selected] positions, -1 = unused;
    none for a full view), filled per slot after each prefill, and one Step per shape it runs."""

    reads_cache = True
    first_tokens = 1  # tokens its first step feeds each round (2 when it re-reads `prev`)

    def __init__(self, config, ctx: DraftContext, model: Optional[Transformer]):
        super().__init__(config)
        self.model, self.runner = model, ctx.runner
        self.selection = None
        device = ctx.target.output.weight.device
        if model is not None and not config.full:
            # One tensor for all layers (each layer's buffer a view of it), so a re-selection is one
            # top-k over every layer rather than a loop of small launches.
            self._selected = torch.full((model.args.n_layers, ctx.batch, model.args.n_kv_heads, config.n_selected),
                                        -1, dtype=torch.long, device=device)
            self.selection = list(self._selected.unbind(0))
        self.scores = None  # re-selecting: [L_target, B, H_kv, S_max] fp32, verification's attention mass
        if config.reselects:
            target = ctx.target
            self.scores = torch.zeros(target.args.n_layers, ctx.batch, target.args.n_kv_heads, target.max_seq_len,
                                      dtype=torch.float32, device=device)
            self._score_layers = list(self.scores.unbind(0))
            # A self-draft is the target: each of its layers and KV heads takes its own picks. A
            # standalone draft has other layers and heads: it takes the mass pooled over all of them,
            # summed over the ranks under tensor parallelism (each holds some heads), so every rank,
            # one outside --draft-ranks included, takes part in the sum.
            self.per_head = model is ctx.target
            self.tp, self.rounds = ctx.tp, 0
        self._steps: dict[tuple[int, bool], Step] = {}

    @classmethod
    def create(cls, config, ctx: DraftContext) -> "ModelDrafter":
        return cls(config, ctx)

    @classmethod
    def check(cls, config) -> None:
        config.policy.validate(config)

    def step(self, n_tokens: int, greedy: bool) -> Step:
        """Its step of n_tokens tokens: the logits (or argmax) of the last one, through its view."""
        key = (n_tokens, greedy)
        if key not in self._steps:
            spec = StepSpec("draft", n_tokens, self.config.view_window, self.config.n_selected, last_only=True,
                            greedy=greedy)
            self._steps[key] = Step(spec, self.model, self.selection)
        return self._steps[key]

    def steps(self, greedy: bool) -> list[Step]:
        if self.model is None:
            return []
        return [self.step(n, greedy) for n in sorted({1, self.first_tokens})]

    def select(self, rows: torch.Tensor, tokens: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """Fill the selection rows of the new sequences from the policy (after their prefill)."""
        if self.selection is None:
            return
        picked = self.config.policy.select(self.model, self.config, tokens, prompt_len, self.runner.backend, rows)
        for buf, sel in zip(self.selection, picked):
            buf.index_copy_(0, rows, sel)  # in place: captured draft steps read these buffers

    def prefill(self, rows, tokens, prompt_len, chunk, progress=False) -> None:
        self.select(rows, tokens, prompt_len)

    def score_buffers(self) -> Optional[list]:
        return None if self.scores is None else self._score_layers

    def round_scores(self, gamma: int) -> Optional[list]:
        if self.scores is None:
            return None
        self.rounds += 1
        return self._score_layers if self.rounds % self.config.reselect_every_at(gamma) == 0 else None

    def reselect(self, state) -> None:
        """New selections for every slot from the mass verification just wrote. Slots whose sequence
        stopped re-select too (harmlessly: a refill re-selects from its prompt)."""
        if self.per_head:
            mass = self.scores
        else:
            mass = self.scores.sum(dim=(0, 2))[:, None]  # [B, 1, S]
            if self.tp is not None:
                self.tp.sum_over_ranks(mass)
        if self.selection is None:
            return  # a rank outside --draft-ranks: its share of the sum is all it gives
        picks = self.config.policy.reselect(mass, self.config, state.cache_len)
        self._selected.copy_(picks.expand_as(self._selected))  # in place: captured draft steps read it

    def run_step(self, tokens: torch.Tensor, cache_len: torch.Tensor, greedy: bool) -> torch.Tensor:
        """tokens [B, T] at cache_len [B] -> the last token's ids [B, 1] (greedy) or logits [B, 1, V]."""
        return self.runner.run(self.step(tokens.shape[1], greedy), tokens, cache_len)

    def propose(self, state, gamma: int, sampling: SamplingParams) -> Proposal:
        """gamma steps, each feeding the previous draft token. With first_tokens 2 the first step
        feeds [prev, x0] at [cache_len - 1, cache_len]: a standalone draft lags its target by one
        token after a round that accepted every draft (it never ran its own last draft), and a
        fixed 2-token step re-writes prev's K/V (identical values when they were there already)."""
        tokens, start = state.x0[:, None], state.cache_len  # [B, 1], [B]
        if self.first_tokens == 2:
            tokens, start = torch.stack([state.prev, state.x0], dim=1), state.cache_len - 1
        drafts, probs = [], []
        for i in range(gamma):
            out = self.run_step(tokens, start, sampling.greedy)[:, -1]  # greedy: ids [B]; sampling: logits [B, V]
            # A captured step's output is its graph's static buffer, rewritten by the next replay: keep
            # a copy of the ids (sampling draws new tensors from the logits before the next step runs).
            # Draft i takes position cache_len + 1 + i; its draw belongs to that position.
            token, p = (out.clone(), None) if sampling.greedy else select_tokens(
                out, sampling, state.keys, state.cache_len + 1 + i, DRAFT_STREAM)
            drafts.append(token)
            probs.append(p)
            start = start + tokens.shape[1]
            tokens = token[:, None]
        return Proposal(torch.stack(drafts, dim=1), None if sampling.greedy else torch.stack(probs, dim=1))
