"""Where the re-selecting draft view (pillar) pays on an H200: the cost model's prediction for
Llama-3.1-8B at 16K-32K context, from acceptance measured on the bundled tiny model.

    python -m benchmarks.pillar_pays      # from the repo root; writes benchmarks/pillar_pays.md

The acceptance comes from benchmarks/pillar_acceptance.json (tools/tiny_model/measure_acceptance):
the per-token alpha of each self-draft view at its longest prompt and the budget that is the
largest share of it (256 keys of 8K: 3%). The prediction applies the same share of the context
(512 keys at 16K, 1024 at 32K) to Llama-3.1-8B shapes on the H200 preset (cost_model.PROFILES):
step times from the roofline model, the re-selection priced by cost_model.reselect_cost (its key
re-read and score passes, every `reselect` rounds). These are predictions, not GPU measurements:
the acceptance is a 6M-parameter model's, and no GPU has run this yet.

For each point it also gives the break-even alpha: the acceptance the re-selecting view needs to
match the streaming view's predicted speedup, given what its re-selection costs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpt_fast_magicdec.benchmarking.report import git_commit
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import (
    PROFILES, RESELECT_SCORE_PASSES, alpha_from_tokens_per_round, param_count, predict_times, predicted_speedup,
)
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.memory import kv_cache_bytes

MODEL = "llama-3.1-8b"
HARDWARE = "H200"
CONTEXTS = (16384, 32768)
BATCHES = (1, 8, 32, 64)
GAMMA = 3
VIEWS = ("streaming", "snapkv", "pillar")
H200_BYTES = 141e9  # HBM3e; weights + KV past 92% of it are marked as not fitting, as the engine would


def measured_alphas(results: list[dict], gamma: int) -> tuple[dict, int, int]:
    """{view: alpha} of the self-drafts at the longest prompt, at the budget with the largest share
    of it; and that prompt length and budget."""
    selfs = [r for r in results if not r.get("draft_model") and r["gamma"] == gamma and r["draft"] in VIEWS]
    longest = max(r["prompt_len"] for r in selfs)
    budget = max(r["budget"] for r in selfs if r["prompt_len"] == longest)
    alphas = {r["draft"]: alpha_from_tokens_per_round(gamma, r["mean_accepted_per_round"])
              for r in selfs if r["prompt_len"] == longest and r["budget"] == budget}
    return alphas, longest, budget


def break_even_alpha(times, target_speedup: float, gamma: int) -> float:
    """The alpha at which `times` (a re-selecting view's) reaches `target_speedup` (bisection; 1.0
    when even full acceptance does not)."""
    if predicted_speedup(times, gamma, 1.0) < target_speedup:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_speedup(times, gamma, mid) < target_speedup else (lo, mid)
    return (lo + hi) / 2


def fits(args: ModelArgs, batch: int, context: int) -> bool:
    weights = 2 * param_count(args)  # bf16
    return weights + kv_cache_bytes(args, batch, context + 256, torch.bfloat16) <= 0.92 * H200_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--acceptance", type=Path, default=Path("benchmarks/pillar_acceptance.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/pillar_pays.md"))
    a = parser.parse_args()
    report = json.loads(a.acceptance.read_text())
    alphas, longest, budget = measured_alphas(report["results"], GAMMA)
    share = budget / longest
    args, hw = ModelArgs.from_preset(MODEL), PROFILES[HARDWARE]
    every = DraftConfig(kind="self", kv="pillar", budget=512, gamma=GAMMA).reselect_every
    lines = [
        "# Where the re-selecting draft (pillar) pays: predicted, H200, Llama-3.1-8B",
        "",
        f"Cost-model predictions (`python -m benchmarks.pillar_pays`), not GPU measurements. Acceptance: the "
        f"bundled tiny model's self-drafts at a {longest}-token held-out prompt, budget {budget} "
        f"({share:.1%} of the context), gamma {GAMMA} ([pillar_acceptance.md](pillar_acceptance.md)), as "
        "per-token alpha: " + ", ".join(f"{v} {alphas[v]:.3f}" for v in VIEWS if v in alphas) + ". "
        f"Applied to {MODEL} shapes on the {HARDWARE} preset ({hw.mem_bandwidth / 1e12:.1f} TB/s) with the "
        f"same budget share of the context; pillar re-selects every {every} rounds (its default at gamma "
        f"{GAMMA}), priced as a re-read of the keys plus {RESELECT_SCORE_PASSES} fp32 passes over the score buffer.",
        "",
        "Each cell: predicted speedup over plain decoding at gamma 3. `T_R/T_V`: the re-selection's cost "
        "per round against one verification. Break-even: the alpha pillar needs to match streaming.",
        "",
        "| context | batch | budget | streaming | snapkv | pillar | T_R/T_V per round | break-even alpha (pillar) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for context in CONTEXTS:
        point_budget = int(round(share * context))
        for batch in BATCHES:
            if not fits(args, batch, context):
                lines.append(f"| {context} | {batch} | {point_budget} | KV cache does not fit | | | | |")
                continue
            fixed = predict_times(args, hw, batch, context, GAMMA, point_budget)
            dynamic = predict_times(args, hw, batch, context, GAMMA, point_budget, reselect_every=every)
            speed = {v: predicted_speedup(dynamic if v == "pillar" else fixed, GAMMA, alphas[v])
                     for v in VIEWS if v in alphas}
            even = break_even_alpha(dynamic, speed["streaming"], GAMMA) if "streaming" in speed else float("nan")
            cells = " | ".join(f"{speed[v]:.2f}x" if v in speed else "" for v in VIEWS)
            lines.append(f"| {context} | {batch} | {point_budget} | {cells} | "
                         f"{dynamic.T_R_per_round / dynamic.T_V:.3f} | {even:.3f} |")
    lines += [
        "",
        "Reading it: the re-selection re-reads half of the keys verification reads, once every few rounds, so its "
        "price grows with batch and context as verification's KV read does: small at batch 1 (the weights dominate "
        "a round), largest where MagicDec pays most (large batch, long context). There pillar needs a clearly higher "
        "acceptance than streaming (the break-even column) to pay for it. On the tiny model the views are within a "
        "few points of each other (a 6M-parameter model at 8K has little long-range retrieval to re-select for); the "
        "published gains (SparseSpec, Vegas) come from 8B+ models on reasoning traces, which this CPU cannot run. "
        "The GPU first-light drafts stage runs pillar beside streaming when a device is lent.",
        "",
        "- command: `python -m benchmarks.pillar_pays`",
        f"- git commit: `{git_commit() or 'unknown'}`; acceptance measured at `{report['meta']['git_commit']}` "
        f"on {report['meta']['date']}",
        "",
    ]
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
