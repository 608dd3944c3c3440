"""A generation job: many prompts through a fixed number of slots, completions as they finish.

The job is the one place that knows prompts, their order and their limits; the engine below it
sees slots (rows of the static caches) and lengths. A slot holds one prompt at a time. When its
sequence stops (EOS or its token limit), the slot takes the next waiting prompt: its cache
positions restart at 0, the new prompt is prefilled into that row alone (several freed rows in
one prefill), the drafter rebuilds that row's state, and every captured graph is reused, since
shapes depend only on the slot count and the job's cache length (its longest prompt + new tokens).

Running slots pause while a refill prefills. Prefill is compute-bound: a 16K-token prompt of an 8B
model is ~2.6e14 FLOPs, ~0.35 s on an H200, while a 64-slot decode round at 16K reads ~150 GB,
~35 ms; decoding the other slots meanwhile would need a mixed prefill + decode step of varying
shape (no captured graph), to save at most the ~10 rounds the prefill lasts, per refill. Pausing
costs each refill's prefill time and nothing else, the same as a static batch pays for its own
prefill; what refill removes is the idling of finished slots, which a static batch pays on every
round until its longest sequence ends.

Random numbers belong to sequences (sampling.py): a prompt's sampled completion does not depend
on its slot, the prompts beside it or when it was admitted.
"""
from __future__ import annotations

import collections
import time
from typing import Callable, Iterator, Optional, Union

import torch

from .drafting import DraftConfig
from .errors import ParameterError
from .prefill import prefill
from .sampling import GREEDY, TARGET_STREAM, SamplingParams, select_tokens, sequence_keys
from .speculative import DecodeState, speculative_round
from .stats import Completion, GenerationStats, peak_memory_bytes
from .steps import step_output
from .timing import NO_TIMER, PhaseTimer


def check_fits(prompts: list, max_new: list, max_seq_len: Optional[int], context: int,
               indices: Optional[list] = None) -> None:
    """Every prompt (token ids) with its new tokens within max_seq_len, or without one the model's
    context; else one ParameterError naming the first prompt that is too long (its index in the
    caller's input: `indices`) and its length, before any work."""
    limit = max_seq_len or context
    for i, (prompt, new) in enumerate(zip(prompts, max_new)):
        if len(prompt) + new > limit:
            where = (f"{{max_seq_len}} {limit}" if max_seq_len else
                     f"the model's context of {limit} tokens ({{max_seq_len}} can raise it, past the positions the model was trained on)")
            index = i if indices is None else indices[i]
            raise ParameterError(f"prompt {index} has {len(prompt)} tokens; with {new} new tokens it does not fit "
                                 f"{where}: shorten it, or lower {{max_new_tokens}}")


class Job:
    """prompts (token-id lists, ragged) through `slots` rows of `engine`; iterate it for the
    Completions in the order they finish, then read `stats`.

    max_new_tokens: an int, or one per prompt. indices: each prompt's index in the caller's input
    (default 0..n-1): completions carry it, and it keys the prompt's random numbers with `seed`.
    refill False runs static batches instead (a slot waits until every slot is free): the
    baseline refill is measured against. gamma_controller(state, round) -> gamma (--gamma auto)
    must return only gammas in its `choices`; accept_override(n) -> n is bench's simulated acceptance.
    Everything is checked here, before any work."""

    def __init__(self, engine, prompts: list, max_new_tokens: Union[int, list], *, slots: Optional[int] = None,
                 sampling: SamplingParams = GREEDY, draft: DraftConfig = DraftConfig(), eos_ids=(),
                 prefill_chunk: int = 512, max_seq_len: Optional[int] = None, progress: bool = False,
                 accept_override: Optional[Callable] = None, gamma_controller: Optional[Callable] = None,
                 seed: int = 0, indices: Optional[list] = None, refill: bool = True):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ParameterError("every prompt must have at least one token ({prompts})")
        n = len(prompts)
        max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(max_new) != n or min(max_new) < 1:
            raise ParameterError("{max_new_tokens} must be >= 1 (one value per prompt when given as a list)")
        if slots is not None and slots < 1:
            raise ParameterError(f"{{slots}} must be >= 1, got {slots}")
        if prefill_chunk < 1:
            raise ParameterError(f"{{prefill_chunk}} must be >= 1, got {prefill_chunk}")
        if indices is not None and len(indices) != n:
            raise ParameterError(f"{{indices}} must give one index per prompt: {len(indices)} for {n} prompts")
        check_fits(prompts, max_new, max_seq_len, engine.args.max_position_embeddings, indices)
        worst = max(range(n), key=lambda i: len(prompts[i]) + max_new[i])
        self.engine, self.prompts, self.max_new = engine, prompts, max_new
        self.slots = min(slots or n, n)
        # A budget left to the job is decided by its shortest prompt (a caller serving part of a
        # larger input, as a batch run's replica does, passes the whole input's decision).
        draft = draft.for_context(min(map(len, prompts)))
        self.sampling, self.draft, self.seed = sampling, draft, seed
        self.indices = list(range(n)) if indices is None else list(indices)
        self.eos_ids = set(eos_ids)  # on the host too: a finished sequence's reason needs no device read
        self.eos = torch.tensor(sorted(self.eos_ids) or [-1], device=engine.device)
        self.chunk, self.progress, self.refill = prefill_chunk, progress, refill
        self.accept_override, self.controller = accept_override, gamma_controller
        self.gamma = draft.gamma if draft.enabled else 0
        self.gammas = set(gamma_controller.choices) if gamma_controller is not None else {self.gamma}
        self.longest = len(prompts[worst]) + max_new[worst]
        draft.warn_if_budget_covers(self.longest)
        self.stats: Optional[GenerationStats] = None

    @torch.no_grad()
    def __iter__(self) -> Iterator[Completion]:
        engine, B = self.engine, self.slots
        engine.setup(B, self.longest + max(self.gammas) + 1)  # room for the largest round's writes
        drafter = engine.drafter(self.draft) if self.draft.enabled else None
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        t0 = engine.sync_time()
        capture_s = 0.0
        if engine.use_graphs:  # compile + capture every step shape now, outside the decode timing
            engine.capture(B, self.gammas, drafter, self.sampling.greedy)
            capture_s = engine.sync_time() - t0
        timer = PhaseTimer(engine.device) if self.gamma else NO_TIMER
        state = DecodeState.empty(B, engine.model.max_seq_len, self.eos)
        occupant: list = [None] * B  # the prompt (its position in self.prompts) each slot serves
        admitted_at = [0.0] * B
        pending = collections.deque(range(len(self.prompts)))
        done = [True] * B
        prefill_s = decode_s = 0.0
        rounds, refills = 0, -1
        results: dict[int, Completion] = {}
        while True:
            finished = [b for b in range(B) if done[b] and occupant[b] is not None]
            if finished:
                for completion in self._collect(state, finished, occupant, admitted_at):
                    results[completion.index] = completion
                    yield completion
                for b in finished:
                    occupant[b] = None
            free = [b for b in range(B) if occupant[b] is None]
            if pending and free and (self.refill or len(free) == B):
                rows = free[:len(pending)]
                items = [pending.popleft() for _ in rows]
                t = engine.sync_time()
                self._admit(state, drafter, rows, items)
                for b, i in zip(rows, items):
                    occupant[b], admitted_at[b] = i, t
                done = state.done.tolist()  # a first token may already end a sequence
                prefill_s += engine.sync_time() - t
                refills += 1
                continue
            if all(done):
                break
            t = time.perf_counter()
            gamma = self.gamma if self.controller is None or drafter is None else self.controller(state, rounds)
            speculative_round(state, engine.verify, drafter, gamma, self.sampling, self.accept_override, timer)
            rounds += 1
            done = state.done.tolist()  # the round's one host synchronisation
            decode_s += time.perf_counter() - t
        order = [results[i] for i in sorted(results)]
        totals = torch.stack([state.accepted.sum(), state.drafted.sum(), state.rounds.sum()]).tolist()
        self.stats = GenerationStats(
            batch_size=B, prompt_tokens=[c.prompt_tokens for c in order], new_tokens=[len(c.tokens) for c in order],
            prefill_s=prefill_s, decode_s=decode_s, capture_s=capture_s,
            latency_s=[c.latency_s for c in order], rounds=rounds, gamma=self.gamma, accepted=totals[0],
            drafted=totals[1], seq_rounds=totals[2], phase_s=timer.totals() if self.gamma else {},
            peak_memory_bytes=peak_memory_bytes(engine.device), refills=max(refills, 0))

    def _admit(self, state: DecodeState, drafter, rows: list, items: list) -> None:
        """Prefill prompts `items` into slots `rows`, emit each one's first token, and let the
        drafter rebuild those rows."""
        engine = self.engine
        device = engine.device
        ids = [self.prompts[i] for i in items]
        tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long, device=device)  # [b, L]
        for k, p in enumerate(ids):
            tokens[k, :len(p)] = torch.tensor(p, dtype=torch.long)
        prompt_len = torch.tensor([len(p) for p in ids], device=device)  # [b]
        rows_t = torch.tensor(rows, device=device)
        keys = sequence_keys(self.seed, torch.tensor([self.indices[i] for i in items], device=device))
        logits = prefill(engine.model, tokens, prompt_len, engine.backend, self.chunk, rows=rows_t,
                         progress=self.progress)
        first = step_output(engine.model, logits, self.sampling.greedy)  # [b] ids, or [b, V] logits
        if not self.sampling.greedy:
            first, _ = select_tokens(first, self.sampling, keys, prompt_len, TARGET_STREAM)
        if drafter is not None:
            drafter.prefill(rows_t, tokens, prompt_len, self.chunk, self.progress)
        state.start(rows_t, tokens, prompt_len, first, torch.tensor([self.max_new[i] for i in items], device=device),
                    keys)

    def _collect(self, state: DecodeState, rows: list, occupant: list, admitted_at: list) -> list[Completion]:
        """The completions of the finished slots `rows`: two host reads (their counters, then
        their tokens), only in rounds where something finished."""
        r = torch.tensor(rows, device=state.tokens.device)
        counters = state.counters(r).tolist()
        width = max(c[0] for c in counters)
        at = (state.prompt_len[r][:, None] + torch.arange(width, device=r.device)).clamp(max=state.tokens.shape[1] - 1)
        outputs = state.tokens[r].gather(1, at).tolist()
        now = time.perf_counter()
        completions = []
        for b, (n_out, prompt_len, accepted, drafted, slot_rounds), out in zip(rows, counters, outputs):
            tokens = out[:n_out]
            completions.append(Completion(
                index=self.indices[occupant[b]], tokens=tokens, prompt_tokens=prompt_len,
                finish_reason="eos" if tokens[-1] in self.eos_ids else "length", latency_s=now - admitted_at[b],
                accepted=accepted, drafted=drafted, rounds=slot_rounds))
        return completions
