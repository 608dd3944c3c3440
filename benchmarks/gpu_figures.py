"""The second lease's stage set (`python -m benchmarks.gpu_first_light --stages figures`): the figures
that come after first light, sized to fit next to it.

  env               the ceilings again (every figure of the lease is divided by them)
  speedup-16k       random llama-3.1-8b bf16, 16K prompts, batch 1 up to the largest that fits, gamma 4,
  speedup-32k       ... 32K prompts, gamma 5
  speedup-4k        ... 4K prompts, gamma 2 (self streaming budget 512, sink 16, simulated acceptance 0.82)
  speedup-plot      bench.py --merge of the three: speedup_vs_batch.png, the cost model dashed beside the measured line
  kernels-sweep     bench.py --kernels at batch 8 / 32 / 64 and context 4K-128K
  where-loses       batch 1-4 at a 512-token context: bench per gamma, and what --gamma auto chooses there
  drafts            the bundled draft and prompt lookup beside self-speculation on the bundled model, lossless, tokens/s
  cost-model        benchmarks.validate_cost_model --device cuda on Llama-3.2-1B shapes (compiled steps)

Gammas: one per context, the one `--gamma auto`'s cost model (H200 preset, alpha 0.82, budget 512)
picks at the largest batch: 4 at 16K (batch 48), 5 at 32K (batch 24), 2 at 4K (batch 32-128). Each
more gamma costs bench two more runs per point, each with its own prefill, and prefill is most of a
point's time (2 x 8e9 FLOPs per token plus attention): with 2-4 everywhere the three sweeps would take
~20 minutes; with one gamma they fill one 10-minute command. Smaller gammas at small batches are
`where-loses`' subject. The rest runs as later commands with --only (benchmarks/README.md).
"""
from __future__ import annotations

import functools
import json
import re

from benchmarks.gpu_first_light import (
    ALPHA, PY, SINK, START_S, Shapes, bench_command, bench_estimate_s, env_stage, generate_command,
    judge_kernels, largest_batch, lossless_runs, parse_generate,
)
from benchmarks.lease import Outcome, Stage, StageRun
from gpt_fast_magicdec.config import ModelArgs

# context -> (gammas, batch sizes besides the largest that fits); dry run: tiny stand-ins
SPEEDUP = {16384: ((4,), (1, 8, 32)), 32768: ((5,), (1, 8)), 4096: ((2,), (1, 8, 32))}
DRY_SPEEDUP = {256: ((2, 3), (1, 2)), 512: ((2,), (1,)), 128: ((1, 2), (1,))}
PLANNED_LARGEST = {16384: 48, 32768: 24, 4096: 184}  # what largest_batch gives on an H200 (planning only)
KERNEL_BATCHES, KERNEL_CONTEXTS = (8, 32, 64), (4096, 16384, 32768, 131072)
SPARSE_FLAT = 1.10  # sparse-view time within 10% from 4K to 128K at a fixed budget
LOSES_CONTEXT, LOSES_BATCHES, LOSES_BUDGET = 512, (1, 2, 4), 128


def label(context: int) -> str:
    return f"{context // 1024}k" if context >= 1024 else str(context)


def speedup_stage(run: StageRun, s: Shapes, context: int, gammas: tuple, batches: tuple) -> Outcome:
    batches = list(batches)
    memory = run.earlier.get("env", {}).get("total_memory_bytes")
    if memory:
        batches.append(largest_batch(memory, ModelArgs.from_preset(s.model), context + s.headline_new))
    out = run.path("bench")
    run.sh(bench_command(s, out, "--random-weights", s.model, "--batch-sizes", ",".join(map(str, sorted(set(batches)))),
                         "--prompt-lengths", context, "--drafts", "self-streaming", "--budgets", s.budget,
                         "--sink", SINK, "--gammas", ",".join(map(str, gammas)), "--simulate-acceptance", ALPHA,
                         "--max-new-tokens", s.headline_new, "--warmup", 0, "--repeats", 1, "--no-compile"))
    results = json.loads((out / "results.json").read_text())
    return judge_speedup(results["rows"], results.get("skipped", []), judge=not s.dry and context >= 16384)


def judge_speedup(rows: list, skipped: list, judge: bool) -> Outcome:
    """Best gamma per batch; at the largest batch (16K+): >= 1.8x and within 10% of the speedup its
    measured step times predict."""
    best = {}
    for r in rows:
        if r["gamma"] is not None and r["speedup"] > best.get(r["batch"], {"speedup": -1})["speedup"]:
            best[r["batch"]] = r
    parts = [f"B{b}: {r['speedup']}x (gamma {r['gamma']}, pred. {r['speedup_pred_measured_T']} meas. T, "
             f"{r['speedup_pred_cost_model']} model)" for b, r in sorted(best.items())]
    parts += [f"B{x['batch']} skipped ({x['reason']})" for x in skipped]
    ok = None
    if judge and best:
        top = best[max(best)]
        ok = top["speedup"] >= 1.8 and abs(top["speedup"] / top["speedup_pred_measured_T"] - 1) <= 0.10
        parts.insert(0, "targets met" if ok else
                     "missed: speedup >= 1.8x within 10% of prediction at the largest batch")
    return Outcome(ok, "; ".join(parts), dict(rows=rows, skipped=skipped))


def plot_stage(run: StageRun, s: Shapes) -> Outcome:
    """bench.py --merge of the speedup stages that ran: one table and speedup_vs_batch.png."""
    dirs = [run.path("bench", stage=name) for name in run.earlier if name.startswith("speedup-")]
    dirs = [d for d in dirs if (d / "results.json").is_file()]
    if not dirs:
        return Outcome(False, "no speedup stage produced results")
    out = run.path("merged")
    run.sh([PY, "bench.py", *[x for d in dirs for x in ("--merge", d)], "--out-dir", out])
    run.keep(out / "speedup_vs_batch.png", "speedup_vs_batch.png")
    run.keep(out / "results.json", "speedup_results.json")  # `bench.py --merge` reads it back (as DIR/results.json)
    rows = json.loads((out / "results.json").read_text())["rows"]
    return Outcome(None, f"merged {len(dirs)} sweeps, {len(rows)} rows: speedup_vs_batch.png", dict(rows=len(rows)))


def kernels_sweep_stage(run: StageRun, s: Shapes) -> Outcome:
    out = run.path("kernels")
    batches, contexts = (KERNEL_BATCHES, KERNEL_CONTEXTS) if not s.dry else (s.kernel_batches, s.kernel_contexts)
    run.sh(bench_command(s, out, "--kernels", "--batch-sizes", ",".join(map(str, batches)),
                         "--prompt-lengths", ",".join(map(str, contexts)), "--gammas", 3, "--budgets", s.budget,
                         "--sink", SINK))
    report = json.loads((out / "kernels.json").read_text())
    run.keep(out / "kernels.png", "kernels.png")
    outcome = judge_kernels(report, judge=not s.dry)
    flat = [f for f in report["summary"]["sparse_flat"] if f["flat"] is not None]
    within = [f["spread"] <= SPARSE_FLAT for f in flat]
    if flat:  # the figures' flatness target is tighter than the kernel report's own
        outcome.result += (f"; sparse time within 10% from {min(contexts)} to {max(contexts)}: "
                           f"{sum(within)} of {len(flat)}")
        if outcome.ok is not None:
            outcome.ok = outcome.ok and all(within)
    return outcome


AUTO = re.compile(r"== gamma auto, prompts .*")
VALIDATION = re.compile(r"\*\*(\d+) / (\d+) rows within (\d+)%\*\*")


def where_loses_stage(run: StageRun, s: Shapes) -> Outcome:
    """At a short context speculation should lose: bench's measured speedup per gamma, and what
    --gamma auto chose (plain decoding, or a gamma whose measured speedup is >= 1)."""
    context = LOSES_CONTEXT if not s.dry else 128
    budget = LOSES_BUDGET if not s.dry else 32
    out = run.path("bench")
    batches = LOSES_BATCHES if not s.dry else (1, 2)
    run.sh(bench_command(s, out, "--random-weights", s.model, "--batch-sizes", ",".join(map(str, batches)),
                         "--prompt-lengths", context, "--drafts", "self-streaming", "--budgets", budget, "--sink", SINK,
                         "--gammas", "1,2,3", "--simulate-acceptance", ALPHA, "--max-new-tokens", s.headline_new,
                         "--warmup", 0, "--repeats", 1, "--no-compile"))
    rows = json.loads((out / "results.json").read_text())["rows"]
    best = {}
    for r in rows:
        if r["gamma"] is not None and r["speedup"] > best.get(r["batch"], {"speedup": -1})["speedup"]:
            best[r["batch"]] = r
    choices = {}
    for b in (min(batches), max(batches)):
        cmd = run.sh(generate_command(s, "--random-weights", s.model, "--bsz", b, "--prompt-length", context,
                                      "--max-new-tokens", s.headline_new, "--ignore-eos", "--gamma", "auto",
                                      "--draft-budget", budget, "--compare", "--no-compile"))
        line = AUTO.search(cmd.output)
        choices[b] = dict(auto=line.group(0) if line else None, **parse_generate(cmd.output))
    parts = [f"B{b}: best measured {r['speedup']}x at gamma {r['gamma']}" for b, r in sorted(best.items())]
    parts += [f"B{b} --gamma auto: {(c['auto'] or 'no choice printed').split(': ', 1)[-1]}" for b, c in choices.items()]
    # Right where auto chose plain decoding, or where speculation it kept measured >= 1x.
    ok = None if s.dry else all(c["auto"] and ("plain decoding" in c["auto"] or (c["speedup"] or 0) >= 1.0)
                                for c in choices.values())
    return Outcome(ok, "; ".join(parts), dict(rows=rows, gamma_auto=choices))


def drafts_stage(run: StageRun, s: Shapes) -> Outcome:
    """The bundled draft, prompt lookup and the re-selecting pillar view beside streaming
    self-speculation: lossless and tokens/s, three alternating repeats each."""
    base = ["--prompt-file", s.bundled_prompt, "--max-new-tokens", s.bundled_new, "--ignore-eos", "--compare",
            "--repeats", 3, "--no-compile"]
    # pillar beside streaming: the re-selecting view's scoring verification and re-selection, under
    # CUDA graphs and the Triton mass kernel, self-draft and bundled draft.
    variants = {"self streaming": [], "self pillar": ["--draft-kv", "pillar"],
                "bundled draft": ["--draft-checkpoint", "bundled-draft"],
                "bundled draft pillar": ["--draft-checkpoint", "bundled-draft", "--draft-kv", "pillar"],
                "lookup": ["--draft", "lookup"], "lookup+self": ["--draft", "lookup+self"]}
    outcome = lossless_runs(run, {n: generate_command(s, *base, *extra) for n, extra in variants.items()})
    tps = {n: d["runs"][-1]["tokens_per_s"] for n, d in outcome.data.items() if d["runs"]}
    outcome.result += "; tokens/s: " + ", ".join(f"{n} {v}" for n, v in tps.items())
    return outcome


def cost_model_stage(run: StageRun, s: Shapes) -> Outcome:
    out = run.path("validation.md")
    args = ["--device", s.device, "--out", out] + (["--models", "llama-3.2-1b"] if not s.dry else ["--models", "tiny"])
    cmd = run.sh([PY, "-m", "benchmarks.validate_cost_model", *args])
    run.keep(out, "cost_model_validation_gpu.md" if not s.dry else "cost_model_validation_dry.md")
    within = VALIDATION.search(cmd.output)
    ok = None if s.dry or within is None else within.group(1) == within.group(2)
    line = f"{within.group(1)} of {within.group(2)} step times within {within.group(3)}%" if within else "no summary"
    return Outcome(ok, line, dict(within=within.groups() if within else None))


def figures_stages(s: Shapes) -> list[Stage]:
    model = ModelArgs.from_preset(s.model)
    speedup = SPEEDUP if not s.dry else DRY_SPEEDUP
    stages = [Stage("env", "the ceilings (copy bandwidth, bf16 matmul) on this lease's machine", 25, 90,
                    functools.partial(env_stage, s=s))]
    for context, (gammas, batches) in speedup.items():
        planned = [*batches, PLANNED_LARGEST.get(context, batches[-1])]
        est = bench_estimate_s(model, planned, context, s.headline_new, runs=1 + 2 * len(gammas))
        stages.append(Stage(f"speedup-{label(context)}", f"random {s.model} bf16, {context}-token prompts, batch "
                            f"{', '.join(map(str, batches))} and the largest that fits, gamma "
                            f"{'/'.join(map(str, gammas))}, "
                            f"self streaming budget {s.budget}, simulated acceptance {ALPHA}. Target at 16K+: >= 1.8x "
                            "at the largest batch, within 10% of the prediction from measured step times",
                            round(est), round(1.3 * est),
                            functools.partial(speedup_stage, s=s, context=context, gammas=gammas, batches=batches)))
    stages += [
        Stage("speedup-plot", "bench.py --merge of the speedup sweeps: speedup_vs_batch.png, one line per context, "
              "the cost model's prediction dashed", 15, 60, functools.partial(plot_stage, s=s)),
        Stage("kernels-sweep", "bench.py --kernels, batch 8/32/64 x context 4K-128K, against SDPA and the reference. "
              "Targets: full view >= 80% of copy BW at batch >= 8 and context >= 16K; sparse time within 10% from "
              "4K to 128K", 150, 300, functools.partial(kernels_sweep_stage, s=s)),
        Stage("where-loses", f"batch {'/'.join(map(str, LOSES_BATCHES))} at a {LOSES_CONTEXT}-token context, "
              f"gamma 1-3, and --gamma auto's choice. Target: auto chooses plain decoding, or a measured speedup "
              ">= 1.0", round(START_S * 3 + 40), 240, functools.partial(where_loses_stage, s=s)),
        Stage("drafts", "the bundled draft, prompt lookup and pillar (self and bundled draft) beside streaming "
              "self-speculation, bundled model bf16 in CUDA graphs, 3 alternating repeats: lossless, tokens/s", 165,
              330, functools.partial(drafts_stage, s=s)),
        Stage("cost-model", "benchmarks.validate_cost_model --device cuda, Llama-3.2-1B shapes, compiled graph "
              "steps. Target: predicted step times within 10% of measured", 300, 420,
              functools.partial(cost_model_stage, s=s)),
    ]
    if s.dry:
        return [Stage(st.name, st.checks, 10, 120, st.run) for st in stages]
    return stages

