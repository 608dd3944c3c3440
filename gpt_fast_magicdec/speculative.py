"""One speculative round: draft gamma tokens, verify them in one target pass, accept, commit.

Plain decoding is the same round with gamma = 0 (no draft, a one-token "verification"), so the
baseline and speculative paths share every line of bookkeeping.

State between rounds (all on the device, fixed shapes, see DecodeState):
  x0[b]         last emitted token; its K/V are not in the cache yet
  cache_len[b]  committed cache length; x0 goes at position cache_len[b]
  prev[b]       the token at cache_len[b] - 1 (a standalone draft re-reads it, see propose())
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch

from .sampling import SamplingParams, logits_to_probs, sample_from_probs, select_tokens

# step(tokens [B, T], cache_len [B]) -> greedy: argmax ids [B, T]; sampling: logits [B, T, V].
# Tokens sit at cache_len .. cache_len+T-1. (Greedy steps return ids so the argmax runs inside the
# captured step, and under tensor parallelism without gathering the vocabulary; engine.step_output.)
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class DecodeState:
    x0: torch.Tensor  # [B] long
    prev: torch.Tensor  # [B] long
    cache_len: torch.Tensor  # [B] long
    out: torch.Tensor  # [B, max_new + gamma_max + 1] emitted tokens; valid up to n_out
    n_out: torch.Tensor  # [B] long
    done: torch.Tensor  # [B] bool
    max_new: torch.Tensor  # [B] long, per-sequence token limit
    accepted: torch.Tensor  # [B] long, draft tokens accepted so far
    rounds: torch.Tensor  # [B] long, rounds in which the sequence was still running

    @classmethod
    def start(cls, first_token: torch.Tensor, last_prompt_token: torch.Tensor, prompt_len: torch.Tensor,
              max_new: torch.Tensor, eos: torch.Tensor, width: int) -> "DecodeState":
        """After prefill: the first token (sampled from the prefill logits) is already emitted."""
        B = first_token.shape[0]
        out = torch.zeros(B, width, dtype=torch.long, device=first_token.device)
        out[:, 0] = first_token
        zeros = torch.zeros(B, dtype=torch.long, device=first_token.device)
        done = torch.isin(first_token, eos) | (max_new <= 1)
        return cls(x0=first_token.clone(), prev=last_prompt_token.clone(), cache_len=prompt_len.clone(),
                   out=out, n_out=zeros + 1, done=done, max_new=max_new, accepted=zeros.clone(),
                   rounds=zeros.clone())


def propose(draft_step: StepFn, state: DecodeState, gamma: int, params: SamplingParams,
            reread_prev: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draft gamma tokens -> (drafts [B, gamma], draft probs [B, gamma, V] or None if greedy).

    A standalone draft model lags its target by one token after a round where every draft was
    accepted (it never ran its own last draft). Its first step therefore always feeds two tokens,
    [prev, x0] at [cache_len - 1, cache_len]: a fixed shape that re-writes prev's K/V (identical
    values when it was already there). Self-speculation shares the target's cache, which the
    verification pass filled, so it needs no re-read."""
    tokens, start = state.x0[:, None], state.cache_len  # [B, 1], [B]
    if reread_prev:
        tokens, start = torch.stack([state.prev, state.x0], dim=1), state.cache_len - 1
    drafts, probs = [], []
    for _ in range(gamma):
        out = draft_step(tokens, start)[:, -1]  # greedy: ids [B]; sampling: logits [B, V]
        token, p = (out, None) if params.greedy else select_tokens(out, params)
        drafts.append(token)
        probs.append(p)
        start = start + tokens.shape[1]
        tokens = token[:, None]
    return torch.stack(drafts, dim=1), (None if params.greedy else torch.stack(probs, dim=1))


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, g], target argmax ids [B, g+1] -> (n accepted [B], emitted [B, g+1]).

    Accept the longest prefix where the draft equals the target's argmax. The emitted tokens are
    then exactly the target's argmaxes t_1..t_{n+1}: equal to d_1..d_n, plus the bonus t_{n+1}."""
    matches = drafts == target[:, :-1]  # [B, g]
    n = matches.long().cumprod(dim=1).sum(dim=1)  # [B] length of the all-match prefix
    return n, target


def accept_sampling(drafts: torch.Tensor, draft_probs: Optional[torch.Tensor], target_logits: torch.Tensor,
                    params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    drafts [B, g] drawn from q = draft_probs [B, g, V]; target p from target_logits [B, g+1, V].
    Returns (n accepted [B], emitted [B, g+1]) where emitted[:, :n] = drafts[:, :n] and
    emitted[:, n] is the correction / bonus token; later slots are don't-care."""
    B, g = drafts.shape
    p = logits_to_probs(target_logits, params)  # [B, g+1, V], same warps as q
    if g > 0:
        p_d = p[:, :g].gather(-1, drafts[..., None]).squeeze(-1)  # p_i(d_i)   [B, g]
        q_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)  # q_i(d_i)  [B, g], > 0: d_i ~ q_i
        # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); written without the division.
        accept = torch.rand_like(p_d) * q_d < p_d  # [B, g]
        n = accept.long().cumprod(dim=1).sum(dim=1)  # [B] stop at the first rejection
        q_ext = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)  # [B, g+1, V]; row g: q = 0
    else:
        n = torch.zeros(B, dtype=torch.long, device=drafts.device)
        q_ext = torch.zeros_like(p)
    rows = torch.arange(B, device=drafts.device)
    p_n, q_n = p[rows, n], q_ext[rows, n]  # [B, V] the first rejected position (or the bonus row)
    # On rejection resample from norm(max(p - q, 0)); after g acceptances q_ext = 0, so this is p.
    residual = (p_n - q_n).clamp(min=0)
    # p == q leaves no residual mass, but then rejection had probability 0; keep p as a safe guard.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    correction = sample_from_probs(residual)  # [B]
    emitted = torch.cat([drafts, correction[:, None]], dim=1)  # [B, g+1]
    emitted[rows, n] = correction
    return n, emitted


def commit(state: DecodeState, verified: torch.Tensor, n: torch.Tensor, emitted: torch.Tensor,
           eos: torch.Tensor) -> None:
    """Emit emitted[:, :n+1], advance the cache by n + 1, stop sequences at EOS / their limit.

    verified [B, g+1] are the tokens the target just processed ([x0, d_1..d_g]); n [B] accepted."""
    B, width = emitted.shape
    slots = torch.arange(width, device=emitted.device)[None, :]  # [1, g+1]
    count = n + 1  # tokens this round produces
    is_eos = torch.isin(emitted, eos) & (slots < count[:, None])  # [B, g+1]
    hit_eos = is_eos.any(dim=1)
    count = torch.where(hit_eos, is_eos.long().argmax(dim=1) + 1, count)  # keep the EOS, drop after
    room = state.max_new - state.n_out
    count = torch.minimum(count, room)
    running = ~state.done
    count = torch.where(running, count, 0)
    # Write all g+1 slots after the valid prefix; slots >= count are overwritten next round.
    state.out.scatter_(1, (state.n_out[:, None] + slots).clamp(max=state.out.shape[1] - 1), emitted)
    state.n_out += count
    state.accepted += torch.where(running, n, 0)
    state.rounds += running.long()
    state.done |= running & (hit_eos | (state.n_out >= state.max_new))
    # A finished sequence keeps its cache_len, so its (ignored) writes stay in bounds.
    advance = torch.where(state.done, 0, n + 1)
    rows = torch.arange(B, device=emitted.device)
    state.prev = torch.where(state.done, state.prev, verified[rows, n])
    state.x0 = torch.where(state.done, state.x0, emitted[rows, n])
    state.cache_len += advance


def speculative_round(state: DecodeState, target_step: StepFn, draft_step: Optional[StepFn], gamma: int,
                      params: SamplingParams, eos: torch.Tensor, reread_prev: bool = False,
                      accept_override: Optional[Callable] = None, timer=None) -> None:
    """One round for the whole batch. gamma = 0 (draft_step None) is one step of plain decoding.

    accept_override(n) -> n replaces the accepted counts (bench's --simulate-acceptance, random
    weights only): the emitted tokens are then the accepted drafts plus the target's token at the
    first rejected slot, so the cache still holds exactly the emitted sequence.
    timer(name) is a context manager that times the draft / verify / accept phases."""
    timer = timer or (lambda name: contextlib.nullcontext())
    with timer("draft"):
        if gamma > 0:
            drafts, draft_probs = propose(draft_step, state, gamma, params, reread_prev)
        else:
            drafts, draft_probs = state.x0.new_zeros(state.x0.shape[0], 0), None
    with timer("verify"):
        verified = torch.cat([state.x0[:, None], drafts], dim=1)  # [B, g+1]
        target_out = target_step(verified, state.cache_len)  # greedy: ids [B, g+1]; else logits [B, g+1, V]
    with timer("accept"):
        if params.greedy:
            n, emitted = accept_greedy(drafts, target_out)
        else:
            n, emitted = accept_sampling(drafts, draft_probs, target_out, params)
        if accept_override is not None:
            n = accept_override(n)
            rows = torch.arange(n.shape[0], device=n.device)
            bonus = emitted[rows, n]
            emitted = torch.cat([drafts, bonus[:, None]], dim=1)
            emitted[rows, n] = bonus
        commit(state, verified, n, emitted, eos)
