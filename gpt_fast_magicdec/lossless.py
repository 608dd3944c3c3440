"""What "lossless" means for greedy output, checked honestly.

Speculative verification runs the target over B*(gamma+1) rows while plain decoding runs B rows,
so matmuls take different reduction paths and low-precision results differ in their last bits.
Logits are fp32 (model.logits_fp32), but the hidden states feeding them are not: where the
target's top two logits are closer than that noise, the two runs may pick different tokens. So:
greedy speculative output equals plain greedy output token for token, except that it may diverge
at a position where the target's top-2 logit gap is below NEAR_TIE_GAP for the model's dtype. A
divergence at a larger gap is a bug.

compare_greedy() finds each sequence's first divergence and measures the target's top-2 gap
there, by re-running the target on the prompt plus the tokens both runs agree on.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

# Top-2 logit gap below which two correct greedy runs may pick different tokens, per model dtype.
# fp32 runs differ only by summation order (~1e-6 relative); bf16 hidden states carry ~3 significant
# digits, fp16 about one more.
NEAR_TIE_GAP = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Divergence:
    sequence: int  # index into the compared prompts
    position: int  # first new-token index where the outputs differ
    plain: Optional[int]  # plain decoding's token there (None: it had stopped)
    speculative: Optional[int]
    gap: float  # target's top-1 minus top-2 logit at that position
    threshold: float  # NEAR_TIE_GAP of the model's dtype

    @property
    def near_tie(self) -> bool:
        return self.gap < self.threshold


@dataclasses.dataclass(frozen=True)
class LosslessReport:
    n_sequences: int
    dtype: torch.dtype
    divergences: tuple  # of Divergence, one per diverging sequence

    @property
    def ok(self) -> bool:
        """Identical, or diverging only at near-ties."""
        return all(d.near_tie for d in self.divergences)

    @property
    def lines(self) -> list[str]:
        if not self.divergences:
            plural = "s" if self.n_sequences != 1 else ""
            return [f"greedy outputs identical: yes ({self.n_sequences} sequence{plural})"]
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"greedy outputs identical: no, {len(self.divergences)} of {self.n_sequences} sequences "
                 f"diverge ({'all at near-ties' if self.ok else 'NOT a near-tie: a bug'})"]
        for d in self.divergences:
            verdict = (f"< {d.threshold:.0e}, a {dtype} near-tie" if d.near_tie
                       else f">= {d.threshold:.0e}: a real divergence")
            lines.append(f"  sequence {d.sequence}: first divergence at new token {d.position} "
                         f"(plain {d.plain}, speculative {d.speculative}); target top-2 logit gap "
                         f"{d.gap:.3e} {verdict}")
        return lines


def first_divergence(a: list, b: list) -> Optional[int]:
    """The first index where token lists a and b differ (a strict prefix differs at its end); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(engine, tokens: list) -> float:
    """The target's top-1 minus top-2 logit for the token after `tokens` (under tensor parallelism
    every rank must call it)."""
    top = engine.next_token_logits(tokens).float().topk(2).values
    return float(top[0] - top[1])


def compare_greedy(engine, prompts: list, plain: list, speculative: list) -> LosslessReport:
    """Per sequence: prompts[i] (ids), and the new tokens of plain and speculative greedy runs."""
    dtype = engine.dtype
    threshold = NEAR_TIE_GAP.get(dtype, NEAR_TIE_GAP[torch.bfloat16])
    found = []
    for i, (prompt, a, b) in enumerate(zip(prompts, plain, speculative)):
        pos = first_divergence(a, b)
        if pos is None:
            continue
        gap = top2_gap(engine, list(prompt) + list(a[:pos]))
        found.append(Divergence(i, pos, a[pos] if pos < len(a) else None, b[pos] if pos < len(b) else None, gap,
                                threshold))
    return LosslessReport(len(prompts), dtype, tuple(found))
