"""What a generation job reports: per-prompt completions and the job's statistics, summarised.

Per-prompt figures (latency, tokens) are reported as percentiles over the job, never one number
per slot: a 64-slot job over thousands of prompts has thousands of latencies.
"""
from __future__ import annotations

import dataclasses
import resource
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class Completion:
    """One prompt's result, yielded by a job as soon as the prompt finishes."""
    index: int  # the prompt's index in the job's input
    tokens: list  # the generated token ids (EOS included when it stopped there)
    prompt_tokens: int
    finish_reason: str  # "eos" or "length"
    latency_s: float  # from the start of its prefill to its last token
    accepted: int  # draft tokens accepted for it
    drafted: int  # draft tokens proposed for it
    rounds: int  # decode rounds it took


def percentiles(values: list, qs=(50, 90, 99)) -> dict:
    """{q: the q-th percentile of values} by linear interpolation between order statistics."""
    xs = sorted(values)
    out = {}
    for q in qs:
        pos = (len(xs) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[q] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


@dataclasses.dataclass
class GenerationStats:
    batch_size: int  # slots: sequences decoded side by side
    prompt_tokens: list  # per prompt, in input order
    new_tokens: list  # per prompt, in input order
    prefill_s: float  # every prefill of the job (the first batch and each refill)
    decode_s: float  # every decode round
    capture_s: float  # CUDA-graph compile + capture before decoding (0 where nothing is captured)
    latency_s: list  # per prompt, from the start of its prefill to its last token
    rounds: int  # decode rounds of the whole batch
    gamma: int  # the draft length asked for (0: plain decoding)
    accepted: int  # draft tokens accepted, summed over prompts
    drafted: int  # draft tokens proposed to running sequences
    seq_rounds: int  # rounds summed over slots, counting a slot while its sequence runs
    phase_s: dict  # draft / verify / accept seconds (speculative jobs)
    peak_memory_bytes: int
    refills: int = 0  # prefills after the first one, each admitting prompts into freed slots
    simulated_acceptance: Optional[float] = None

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / max(self.decode_s, 1e-9)

    @property
    def throughput(self) -> float:
        """Every row's tokens over the job's prefill + decode time: what a batch job delivers."""
        return sum(self.new_tokens) / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def sequence_tokens_per_s(self) -> list:
        """Per prompt, its tokens over its latency (admission to last token): what one user sees."""
        return [n / max(t, 1e-9) for n, t in zip(self.new_tokens, self.latency_s)]

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_per_round(self) -> Optional[float]:
        """Tokens emitted per sequence per round (accepted drafts + the bonus token)."""
        if not self.drafted:
            return None
        return (self.accepted + self.seq_rounds) / self.seq_rounds

    @property
    def slot_utilisation(self) -> float:
        """The share of slot-rounds that ran a sequence (1.0: no slot ever idled). With plain
        decoding it is generated tokens / (slots x rounds), not counting each first token."""
        return self.seq_rounds / max(self.batch_size * self.rounds, 1)

    def summary_lines(self) -> list[str]:
        n = len(self.new_tokens)
        lines = [
            f"prefill: {sum(self.prompt_tokens)} tokens in {self.prefill_s:.3f} s"
            + (f" ({self.refills} refills)" if self.refills else "")
            + (f" (+ {self.capture_s:.1f} s compiling and capturing CUDA graphs)" if self.capture_s > 0.01 else ""),
            f"decode:  {sum(self.new_tokens)} tokens in {self.decode_s:.3f} s = {self.tokens_per_s:.1f} tokens/s "
            f"(batch {self.batch_size}, {self.rounds} rounds, slots busy {self.slot_utilisation:.0%})" if self.rounds
            else f"decode:  none (batch {self.batch_size}): every completion's {sum(self.new_tokens)} tokens came "
                 "from the prefill",
        ]
        rates = self.sequence_tokens_per_s
        if n > 1:  # one sequence's rate is the whole job's; with many, the aggregate and the spread differ
            r = percentiles(rates, (10, 50, 90))
            lines.append(f"throughput: {self.throughput:.1f} tokens/s over all {n} rows (prefill + decode); per "
                         f"sequence p10 {r[10]:.1f}, p50 {r[50]:.1f}, p90 {r[90]:.1f} tokens/s")
        if n == 1:
            lines.append(f"latency: {self.latency_s[0]:.2f} s")
        else:
            p = percentiles(self.latency_s)
            lines.append(f"latency per prompt (s): p50 {p[50]:.2f}, p90 {p[90]:.2f}, p99 {p[99]:.2f}, "
                         f"max {max(self.latency_s):.2f} ({n} prompts)")
        if self.gamma and not self.drafted:
            lines.append("speculation: no draft tokens proposed")
        elif self.gamma:
            tag = f" [SIMULATED acceptance {self.simulated_acceptance}]" if self.simulated_acceptance is not None else ""
            lines.append(f"speculation: gamma {self.gamma}, acceptance rate {self.acceptance_rate:.3f}, "
                         f"mean tokens per round {self.mean_accepted_per_round:.2f}, "
                         f"{self.drafted} draft tokens{tag}")
        if self.phase_s:
            lines.append("time split (s): " + ", ".join(f"{k} {v:.3f}" for k, v in self.phase_s.items()))
        lines.append(f"peak memory: {self.peak_memory_bytes / 2**30:.2f} GiB")
        return lines


@dataclasses.dataclass
class GenerationResult:
    tokens: list  # per prompt, in input order: the generated token ids
    stats: GenerationStats


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
