"""One speculative round: draft gamma tokens, verify them in one target pass, accept, commit.

Plain decoding is the same round with gamma = 0 (no draft, a one-token "verification"), so the
baseline and speculative paths share every line of bookkeeping.

State between rounds (all on the device, fixed shapes, see DecodeState): each slot b holds one
sequence, `tokens[b]` = its prompt followed by what it emitted so far, and
  cache_len[b]  committed cache length: positions < cache_len[b] have their K/V in the cache
  x0[b]         tokens[b, cache_len[b]], the last emitted token, whose K/V are not cached yet
  prev[b]       tokens[b, cache_len[b] - 1] (a standalone draft re-reads it, see drafters/)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .drafters.base import Proposal
from .sampling import ACCEPT_STREAM, TARGET_STREAM, SamplingParams, logits_to_probs, sample_from_probs, uniform
from .timing import NO_TIMER

# verify(tokens [B, T], cache_len [B], greedy, scores) -> greedy: the target's argmax ids [B, T];
# sampling: its fp32 logits [B, T, V]. Tokens sit at cache_len .. cache_len + T - 1. scores: None,
# or per layer [B, H_kv, S_max] buffers the pass fills with the attention mass of every position.
VerifyFn = Callable[[torch.Tensor, torch.Tensor, bool, Optional[list]], torch.Tensor]


@dataclasses.dataclass
class DecodeState:
    """Every slot's sequence and counters, on the device. Counters are per slot and cumulative
    over the prompts a slot has served (the job reads them as differences)."""
    tokens: torch.Tensor  # [B, S] long: the prompt, then the emitted tokens; valid up to cache_len
    cache_len: torch.Tensor  # [B] long
    prompt_len: torch.Tensor  # [B] long
    n_out: torch.Tensor  # [B] long, tokens emitted: tokens[b, prompt_len : prompt_len + n_out]
    done: torch.Tensor  # [B] bool: the slot's sequence stopped (or the slot holds none)
    max_new: torch.Tensor  # [B] long, per-sequence token limit
    keys: torch.Tensor  # [B] int64, each sequence's random key (sampling.sequence_keys)
    eos: torch.Tensor  # [E] stop ids ([-1] when none)
    accepted: torch.Tensor  # [B] long, draft tokens accepted
    drafted: torch.Tensor  # [B] long, draft tokens proposed while running
    rounds: torch.Tensor  # [B] long, rounds in which the slot's sequence was running
    since: torch.Tensor  # [B, 3] long: accepted, drafted, rounds when the slot's sequence started

    @classmethod
    def empty(cls, batch: int, width: int, eos: torch.Tensor) -> "DecodeState":
        """B empty slots (all done) for sequences of up to `width` positions."""
        device = eos.device
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(tokens=torch.zeros(batch, width, dtype=torch.long, device=device), cache_len=zeros.clone(),
                   prompt_len=zeros.clone(), n_out=zeros.clone(), done=torch.ones(batch, dtype=torch.bool, device=device),
                   max_new=zeros.clone(), keys=zeros.clone(), eos=eos, accepted=zeros.clone(),
                   drafted=zeros.clone(), rounds=zeros.clone(),
                   since=torch.zeros(batch, 3, dtype=torch.long, device=device))

    @property
    def x0(self) -> torch.Tensor:
        return self.tokens.gather(1, self.cache_len[:, None]).squeeze(1)  # [B]

    @property
    def prev(self) -> torch.Tensor:
        return self.tokens.gather(1, (self.cache_len - 1).clamp(min=0)[:, None]).squeeze(1)  # [B]

    def start(self, rows: torch.Tensor, prompts: torch.Tensor, prompt_len: torch.Tensor, first: torch.Tensor,
              max_new: torch.Tensor, keys: torch.Tensor) -> None:
        """Slots `rows` [b] take new sequences: prompts [b, L] (prompt_len [b]) whose first token,
        from the prefill's logits, is `first` [b]."""
        L = prompts.shape[1]
        self.tokens[rows, :L] = prompts
        self.tokens[rows, prompt_len] = first
        self.cache_len[rows] = prompt_len
        self.prompt_len[rows] = prompt_len
        self.n_out[rows] = 1
        self.done[rows] = torch.isin(first, self.eos) | (max_new <= 1)
        self.max_new[rows] = max_new
        self.keys[rows] = keys
        self.since[rows] = torch.stack([self.accepted[rows], self.drafted[rows], self.rounds[rows]], dim=1)

    def counters(self, rows: torch.Tensor) -> torch.Tensor:
        """[b, 5]: n_out, prompt_len, and accepted, drafted, rounds of the sequences in `rows`."""
        own = torch.stack([self.accepted[rows], self.drafted[rows], self.rounds[rows]], dim=1) - self.since[rows]
        return torch.cat([self.n_out[rows, None], self.prompt_len[rows, None], own], dim=1)


def accept_greedy(proposal: Proposal, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, g], target argmax ids [B, g+1] -> (n accepted [B], emitted [B, g+1]).

    Accept the longest prefix where the draft equals the target's argmax (and was really
    proposed). The emitted tokens are then exactly the target's argmaxes t_1..t_{n+1}: equal to
    d_1..d_n, plus the bonus t_{n+1}."""
    matches = proposal.tokens == target[:, :-1]  # [B, g]
    n = matches.long().cumprod(dim=1).sum(dim=1)  # [B] length of the all-match prefix
    return proposal.cap(n), target


def accept_sampling(proposal: Proposal, target_logits: torch.Tensor, params: SamplingParams,
                    state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Drafts [B, g] drawn from q = proposal.probs [B, g, V] (None: a deterministic proposal, q
    one-hot at the drafted token); the target's p from target_logits [B, g+1, V]. Returns
    (n accepted [B], emitted [B, g+1]) where emitted[:, :n] = drafts[:, :n] and emitted[:, n] is
    the correction / bonus token; later slots are don't-care. Every draw uses the sequence's own
    numbers at the position it decides (sampling.uniform)."""
    drafts = proposal.tokens
    B, g = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    positions = state.cache_len[:, None] + 1 + torch.arange(g + 1, device=drafts.device)  # [B, g+1] of t_1..
    p = logits_to_probs(target_logits, params)  # [B, g+1, V], same warps as q
    count = proposal.counts()  # [B] drafts really proposed
    n = torch.zeros(B, dtype=torch.long, device=drafts.device)
    q_n = torch.zeros_like(p[:, 0])  # [B, V] q at the first rejected draft (0: no draft there)
    if g > 0:
        p_d = p[:, :g].gather(-1, drafts[..., None]).squeeze(-1)  # p_i(d_i)   [B, g]
        q_d = (torch.ones_like(p_d) if proposal.probs is None  # q_i(d_i) [B, g], > 0 since d_i ~ q_i
               else proposal.probs.gather(-1, drafts[..., None]).squeeze(-1))
        # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); written without the division.
        u = uniform(state.keys, positions[:, :g], ACCEPT_STREAM)  # [B, g]
        proposed = torch.arange(g, device=drafts.device) < count[:, None]
        accept = (u * q_d < p_d) & proposed  # [B, g]
        n = accept.long().cumprod(dim=1).sum(dim=1)  # [B] stop at the first rejection
        at = n.clamp(max=g - 1)
        q_at = (torch.nn.functional.one_hot(drafts[rows, at], p.shape[-1]).float() if proposal.probs is None
                else proposal.probs[rows, at])  # [B, V]
        q_n = torch.where((n < count)[:, None], q_at, q_n)  # a rejected draft at n, or none (bonus)
    p_n = p[rows, n]  # [B, V]
    # On rejection resample from norm(max(p - q, 0)); where no draft was rejected, q_n = 0: from p.
    residual = (p_n - q_n).clamp(min=0)
    # p == q leaves no residual mass, but then rejection had probability 0; keep p as a safe guard.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    correction = sample_from_probs(residual, state.keys, positions[rows, n], TARGET_STREAM)  # [B]
    emitted = torch.cat([drafts, correction[:, None]], dim=1)  # [B, g+1]
    emitted[rows, n] = correction
    return n, emitted


def commit(state: DecodeState, n: torch.Tensor, emitted: torch.Tensor, drafted) -> None:
    """Emit emitted[:, :n+1], advance the cache by n + 1, stop sequences at EOS / their limit.

    n [B] drafts accepted; drafted [B] (or an int for every row) drafts proposed this round."""
    B, width = emitted.shape
    slots = torch.arange(width, device=emitted.device)[None, :]  # [1, g+1]
    count = n + 1  # tokens this round produces
    is_eos = torch.isin(emitted, state.eos) & (slots < count[:, None])  # [B, g+1]
    hit_eos = is_eos.any(dim=1)
    count = torch.where(hit_eos, is_eos.long().argmax(dim=1) + 1, count)  # keep the EOS, drop after
    count = torch.minimum(count, state.max_new - state.n_out)
    running = ~state.done
    count = torch.where(running, count, 0)
    # Every emitted slot goes after x0 (slots past count are overwritten next round); a stopped
    # sequence keeps its tokens.
    at = (state.cache_len[:, None] + 1 + slots).clamp(max=state.tokens.shape[1] - 1)  # [B, g+1]
    state.tokens.scatter_(1, at, torch.where(running[:, None], emitted, state.tokens.gather(1, at)))
    state.n_out += count
    state.accepted += torch.where(running, n, 0)
    state.drafted += torch.where(running, drafted, 0)
    state.rounds += running.long()
    state.done |= running & (hit_eos | (state.n_out >= state.max_new))
    # A stopped sequence keeps its cache_len, so its (ignored) writes stay in bounds.
    state.cache_len += torch.where(state.done, 0, n + 1)


def speculative_round(state: DecodeState, verify: VerifyFn, drafter, gamma: int, params: SamplingParams,
                      accept_override: Optional[Callable] = None, timer=NO_TIMER) -> None:
    """One round for the whole batch. gamma = 0 (or no drafter) is one step of plain decoding.

    accept_override(n) -> n replaces the accepted counts (bench's --simulate-acceptance, random
    weights only): the emitted tokens are then the accepted drafts plus the target's token at the
    first rejected slot, so the cache still holds exactly the emitted sequence.
    timer(name) is a context manager that times the draft / verify / accept phases."""
    speculating = gamma > 0 and drafter is not None
    with timer("draft"):
        if speculating:
            proposal = drafter.propose(state, gamma, params)
        else:
            proposal = Proposal(state.tokens.new_zeros(state.tokens.shape[0], 0))
    with timer("verify"):
        scores = drafter.round_scores(gamma) if speculating else None  # a re-selecting draft's round
        verified = torch.cat([state.x0[:, None], proposal.tokens], dim=1)  # [B, g+1]
        target_out = verify(verified, state.cache_len, params.greedy, scores)  # ids [B, g+1] / logits [B, g+1, V]
    with timer("accept"):
        if params.greedy:
            n, emitted = accept_greedy(proposal, target_out)
        else:
            n, emitted = accept_sampling(proposal, target_out, params, state)
        if accept_override is not None:
            n = proposal.cap(accept_override(n))
            rows = torch.arange(n.shape[0], device=n.device)
            bonus = emitted[rows, n]
            emitted = torch.cat([proposal.tokens, bonus[:, None]], dim=1)
            emitted[rows, n] = bonus
        commit(state, n, emitted, proposal.proposed)
    if scores is not None:
        with timer("reselect"):
            drafter.reselect(state)
