"""Predicted vs published MagicDec speedups on 8 x A100 (and 8 x H100), from presets only.

    python -m benchmarks.predict_published      # from the repo root; writes benchmarks/published_vs_predicted.md

Published figures: MagicDec (arXiv 2408.11049 v1-v3), Table "End-to-end Speculative Decoding
Speedups for Various Target-Draft pairs on 8xA100s", the same table as in the authors' blog
(github.com/Infini-AI-Lab/MagicDec, pages/index.html, Table 2). Every hardware number comes from
`cost_model.PROFILES` (vendor data sheets, published all-reduce measurements); nothing here is
fitted to the published speedups. The acceptance rate is not in that table, so each row shows the
prediction at one assumed alpha and the alpha the model would need to match the published figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Optional

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import (
    PROFILES, HardwareProfile, PredictedTimes, expected_tokens, predict_times, predicted_speedup,
)

ALPHA = 0.8  # assumed acceptance rate (the paper's table does not give one)
TP = 8
BUDGET = 256  # StreamingLLM budget: "budget=256 ... on 8xA100" (blog, Figure 3 caption)


@dataclasses.dataclass(frozen=True)
class Published:
    target: str
    draft: Optional[str]  # None: self-speculation (StreamingLLM view of the target)
    prefill: int
    batch: int
    gamma: int
    speedup: Optional[float]  # None: not found


A100_TABLE = [  # (target, draft, prefill, batch, optimal gamma, speedup) as printed
    Published("llama-2-7b-32k", "tinyllama-1.1b", 8000, 32, 3, 1.29),
    Published("llama-2-7b-32k", "tinyllama-1.1b", 8000, 64, 3, 1.57),
    Published("llama-2-7b-32k", "tinyllama-1.1b", 8000, 128, 4, 1.66),
    Published("llama-2-7b-32k", "tinyllama-1.1b", 32000, 32, 4, 1.91),
    Published("llama-2-7b-32k", None, 8000, 32, 3, 1.18),
    Published("llama-2-7b-32k", None, 8000, 64, 3, 1.48),
    Published("llama-2-7b-32k", None, 8000, 128, 4, 1.63),
    Published("llama-2-7b-32k", None, 32000, 32, 4, 2.00),
    Published("llama-3.1-8b", None, 32000, 32, 3, 1.22),
    Published("llama-3.1-8b", None, 32000, 64, 3, 1.38),
    Published("llama-3.1-8b", None, 32000, 128, 4, 1.47),
    Published("llama-3.1-8b", None, 100000, 32, 5, 1.84),
]


def roofline_only(hw: HardwareProfile) -> HardwareProfile:
    """The profile without the issue-14 terms: no launch overhead, no all-reduce cost."""
    return dataclasses.replace(hw, kernel_overhead_s=0.0, link_bandwidth=math.inf, allreduce_latency_s=0.0,
                               allreduce_hop_latency_s=0.0)


def old_speedup(t: PredictedTimes, hw: HardwareProfile, gamma: int, alpha: float) -> float:
    """The model before issue 14: one max(bytes / bandwidth, flops / rate) per step + step overhead."""
    def step(cost):
        return max(cost.bytes / hw.mem_bandwidth, cost.flops / hw.matmul_flops) + hw.step_overhead_s
    return expected_tokens(gamma, alpha) * step(t.target) / (gamma * step(t.draft) + step(t.verify))


def implied_alpha(speedup_at, target: float) -> Optional[float]:
    """The alpha at which `speedup_at(alpha)` equals `target` (increasing in alpha), or None."""
    lo, hi = 0.0, 0.999999
    if speedup_at(hi) < target:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup_at(mid) < target else (lo, mid)
    return (lo + hi) / 2


def row(p: Published, hw: HardwareProfile) -> dict:
    args = ModelArgs.from_preset(p.target)
    draft = ModelArgs.from_preset(p.draft) if p.draft else None
    times = predict_times(args, hw, p.batch, p.prefill, p.gamma, BUDGET, tp=TP, draft_args=draft)
    bare = predict_times(args, roofline_only(hw), p.batch, p.prefill, p.gamma, BUDGET, tp=TP, draft_args=draft)
    fixed = times.T_T - bare.T_T  # all-reduces + launches in one decode step
    out = dict(old=old_speedup(times, hw, p.gamma, ALPHA), split=predicted_speedup(bare, p.gamma, ALPHA),
               new=predicted_speedup(times, p.gamma, ALPHA), T_T=times.T_T, fixed_share=fixed / times.T_T,
               verify_ratio=times.verify_ratio, draft_ratio=times.draft_ratio)
    if p.speedup is not None:
        out["alpha_old"] = implied_alpha(lambda a: old_speedup(times, hw, p.gamma, a), p.speedup)
        out["alpha_new"] = implied_alpha(lambda a: predicted_speedup(times, p.gamma, a), p.speedup)
    return out


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(hw_name: str, rows: list[Published], out: list) -> list[str]:
    """Markdown rows for `rows` on 8 x `hw_name`; appends each row's numbers to `out`."""
    hw = PROFILES[hw_name]
    lines = [f"### 8 x {hw_name}, TP {TP}", "",
             "| target | draft | prefill | batch | gamma | published | old model | + split roofline | "
             "+ all-reduce & launches | residual | T_T ms | fixed share of T_T | T_V/T_T | T_D/T_T | "
             "alpha needed (old) | alpha needed (new) |",
             "|" + " --- |" * 16]
    for p in rows:
        r = row(p, hw)
        residual = r["residual"] = None if p.speedup is None else p.speedup / r["new"] - 1
        lines.append(
            f"| {p.target} | {p.draft or 'self (StreamingLLM)'} | {p.prefill} | {p.batch} | {p.gamma} | "
            f"{_fmt(p.speedup)} | {r['old']:.2f} | {r['split']:.2f} | {r['new']:.2f} | {_fmt(residual, '+.0%')} | "
            f"{r['T_T'] * 1e3:.2f} | {r['fixed_share']:.0%} | {r['verify_ratio']:.3f} | {r['draft_ratio']:.3f} | "
            f"{_fmt(r.get('alpha_old'))} | {_fmt(r.get('alpha_new'))} |")
        out.append(r)
    return lines


HEADER = f"""# MagicDec: published vs predicted speedups

Generated by `python -m benchmarks.predict_published` from the presets in `cost_model.PROFILES`
(vendor data sheets; all-reduce latency from published nccl-tests runs; see the comments there).
No parameter is fitted to the published numbers.

**Published**: MagicDec (arXiv 2408.11049, v1-v3), table of end-to-end speedups on 8 x A100, the same
table as Table 2 of the authors' blog (github.com/Infini-AI-Lab/MagicDec, `pages/index.html`).
**8 x H100**: no per-configuration table was found in the sources available here (the v5 abstract
reports "up to 2.51x for Llama-3.1-8B ... on various types of hardware" without the configurations);
the H100 rows are predictions only, for a later comparison.

**Assumptions** (not in the published table): acceptance alpha = {ALPHA} for every row (the table gives
none, so the last two columns give the alpha each model needs to reproduce the published figure);
StreamingLLM budget {BUDGET} for self-speculation (the blog's Figure 3 caption) and for the TinyLlama
draft (assumed); target and draft both on all {TP} ranks; context = the prefill length; bf16;
CUDA graphs (MagicDec compiles its steps).

Columns: **old model** = one max(bytes/bandwidth, flops/rate) per step + 20 us (before issue 14);
**+ split roofline** = linear layers and attention as separate rooflines, summed; **+ all-reduce &
launches** = the full model (64 all-reduces per step at TP 8, ~1 us per graphed kernel);
**residual** = published / full model - 1; **fixed share** = all-reduce + launch time as a share of
one decode step.
"""

def discussion(rows: list[dict]) -> str:
    """The residual, with this run's ranges."""
    res = [r["residual"] for r in rows]
    new_a = [r["alpha_new"] for r in rows if r["alpha_new"] is not None]
    old_a = [r["alpha_old"] for r in rows if r["alpha_old"] is not None]
    return f"""
## Reading the residual

- The old model over-predicts every published A100 row; the full model still does, by
  {-max(res):.0%} to {-min(res):.0%} at alpha = {ALPHA}. To reproduce the published figures the old model
  needs alpha {min(old_a):.2f}-{max(old_a):.2f}, the full model {min(new_a):.2f}-{max(new_a):.2f}: the new terms
  account for a large part of the gap that the old model could only blame on acceptance.
- Per rank at TP {TP} a step is small (1/8 of the weights and of the KV heads), so the 64
  all-reduces and ~320 graphed launches per step are a *fixed* cost of every step ("fixed share"):
  they add the same time to T_T, T_V and each of the gamma draft steps, which raises T_D/T_T most
  where the draft's own work is small (self-speculation at batch 32). That is the main reason the
  full model predicts less than the old one at TP 8; the share falls as batch and context grow.
- The split roofline matters at large batch x (gamma + 1): the verify step's linear layers leave the
  memory roof (128 x 5 rows is above the A100's ~150 FLOP/byte ridge) while the KV read does not, so
  T_V/T_T > 1 there (batch 128 rows).
- What remains: the table gives no acceptance rate, so part of the residual is the assumed alpha.
  Costs still not modelled, each of which lowers the real speedup further: achieved instead of peak
  bandwidth (a copy reaches ~80-90% of peak), the draft's cache bookkeeping (StreamingLLM window
  updates), sampling and acceptance kernels and the host synchronisation per round, attention
  kernels below tensor-core peak at small query tiles, and the context growing during generation.
  One term may err the other way: MagicDec enables PyTorch's intra-node one-shot all-reduce
  (`ENABLE_INTRA_NODE_COMM=1`), likely faster for these small messages than the NCCL ring figures
  the presets use; `--hardware measure` under torchrun measures what the engine's all-reduce does.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("published_vs_predicted.md"))
    out = parser.parse_args().out
    h100_rows = [dataclasses.replace(p, speedup=None) for p in A100_TABLE]
    a100: list[dict] = []
    lines = [HEADER, *table("A100-80G", A100_TABLE, a100), "", *table("H100-SXM", h100_rows, []), discussion(a100)]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
