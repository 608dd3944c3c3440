"""Validate the cost model on this machine: measured profile vs timed engine steps.

    python -m benchmarks.validate_cost_model          # from the repo root; CPU by default
    python -m benchmarks.validate_cost_model --device cuda --out benchmarks/cost_model_validation_gpu.md

The profile comes from `measure_hardware` alone (a copy, one square matmul, a mix of tiny ops; on
CPU also matmuls of 1-64 rows against a generic 64 MiB and 512 KiB weight and the eager attention's
passes over generic score tensors; on GPU graph replay): no model shape is used to measure it, and
nothing is fitted to the rows below, so every row is held out. Each row times `forward_step` (the
engine's one step, eager, with the engine's bucketed key range) for one shape — plain decode (T = 1)
and verification (T = gamma + 1 = 4) at several batch sizes and contexts — and compares the median
with `roofline_time(decode_step_cost(..., kv_bucket=KV_BUCKET), hw, graphs=False)`.
Target: within 25% on CPU, 10% on GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import HardwareProfile, decode_step_cost, measure_hardware, roofline_time
from gpt_fast_magicdec.engine import KV_BUCKET, StepSpec, bucketed_kv_limit, forward_step, random_model

# A mid-size shape whose weights (~390 MB fp32) and KV cache make memory traffic matter on CPU.
MID = ModelArgs(vocab_size=8192, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, intermediate_size=2816,
                max_position_embeddings=8192)
SWEEP = [  # (model, batches, contexts, query lengths)
    ("tiny", (1, 8), (256, 2048), (1, 4)),
    ("tiny-llama3", (2, 16), (512, 4096), (1, 4)),
    ("mid", (1, 4, 8), (512, 2048), (1, 4)),
]
TOLERANCE = {"cpu": 0.25, "cuda": 0.10}


def model_args(name: str) -> ModelArgs:
    return MID if name == "mid" else ModelArgs.from_preset(name)


def step_fn(model, batch: int, context: int, n_tokens: int, device: torch.device):
    """One eager forward of `n_tokens` per sequence over `context` cached keys, with the key range the
    engine's eager path uses (`bucketed_kv_limit`: context + n rounded up to KV_BUCKET)."""
    tokens = torch.randint(model.args.vocab_size, (batch, n_tokens), device=device)
    cache_len = torch.full((batch,), context, dtype=torch.long, device=device)
    kv_limit = bucketed_kv_limit(cache_len, n_tokens, model.max_seq_len, KV_BUCKET)
    spec = StepSpec("target", n_tokens, greedy=False)  # plain decoding / verification, full fp32 logits

    def step():
        forward_step(model, spec, tokens, cache_len, kv_limit=kv_limit)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def time_steps(steps: dict, device: torch.device, rounds: int = 5, budget_s: float = 0.1) -> dict:
    """(median seconds per step, minor page faults per step) of each shape, over `rounds` rounds that
    visit every shape in turn (interleaved, so a burst of load on the shared machine hits all shapes
    alike), each round timing a shape at least twice and for ~`budget_s`. On CPU the clock is this
    process's CPU time (one thread): time spent preempted by other processes is not the step's."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    samples: dict = {key: [] for key in steps}
    faults = dict.fromkeys(steps, 0)
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for key, step in steps.items():
            spent, n = 0.0, 0
            faults[key] -= resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            while n < 2 or (spent < budget_s and n < 20):
                t0 = clock()
                step()
                samples[key].append(clock() - t0)
                spent, n = spent + samples[key][-1], n + 1
            faults[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return {key: (statistics.median(times), faults[key] / len(times)) for key, times in samples.items()}


def sweep(hw: HardwareProfile, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, batches, contexts, lengths in SWEEP:
        args = model_args(name)
        model = random_model(args, device, dtype)
        with torch.inference_mode():
            for batch in batches:
                # The cache is [B, ...]; long enough that the bucketed key range is never capped.
                cache = -(-(max(contexts) + max(lengths)) // KV_BUCKET) * KV_BUCKET
                model.setup_caches(batch, cache, dtype, device)
                shapes = [(context, n) for context in contexts for n in lengths]
                measured = time_steps({s: step_fn(model, batch, *s, device) for s in shapes}, device)
                for context, n in shapes:
                    cost = decode_step_cost(args, batch, context, n, dtype.itemsize, kv_bucket=KV_BUCKET)
                    predicted = roofline_time(cost, hw, graphs=False)
                    seconds, faults = measured[(context, n)]
                    rows.append(dict(model=name, batch=batch, context=context, n_tokens=n,
                                     predicted_ms=predicted * 1e3, measured_ms=seconds * 1e3,
                                     error=predicted / seconds - 1, faults=faults,
                                     score_mb=4 * cost.score_elems / 2**20))
        del model
    return rows


def report(hw: HardwareProfile, rows: list[dict], device: torch.device, tolerance: float) -> str:
    within = sum(abs(r["error"]) <= tolerance for r in rows)
    fields = {f.name: getattr(hw, f.name) for f in dataclasses.fields(hw)}
    lines = [f"# Cost model validation on {device.type}", "",
             f"Generated by `python -m benchmarks.validate_cost_model` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Profile measured by `measure_hardware` (no model shape used): "
             + ", ".join(f"`{k}`={v:.4g}" if isinstance(v, float) else f"`{k}`={v}" for k, v in fields.items()), "",
             f"**{within} / {len(rows)} rows within {tolerance:.0%}** (eager steps, `graphs=False`).", "",
             "| model | batch | context | T | scores MiB / layer | page faults / step | predicted ms | measured ms | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        flag = "" if abs(r["error"]) <= tolerance else " **miss**"
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['n_tokens']} | {r['score_mb']:.2f} | "
                     f"{r['faults']:.0f} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {r['error']:+.0%}{flag} |")
    lines += ["", "Median error by model and query length:", "",
              "| model | T | median error | rows within |", "| --- | --- | --- | --- |"]
    for (name, n), group in _groups(rows).items():
        ok = sum(abs(r["error"]) <= tolerance for r in group)
        lines.append(f"| {name} | {n} | {statistics.median(r['error'] for r in group):+.0%} | {ok} / {len(group)} |")
    return "\n".join(lines) + "\n" + NOTES


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["n_tokens"]), []).append(r)
    return out


NOTES = """
## What the model counts on CPU

- **Linear layers** at the measured rate of a matmul with B x T rows (`matmul_rate_by_rows`, 1-64
  rows, interpolated in log(rows)): skinny CPU matmuls run below both the copy-bandwidth and the
  square-matmul roof (packing weight panels per call). The rate is the streamed one (64 MiB weight,
  twice the L3) or the cached one (512 KiB weight), interpolated in log(bytes) by the step's whole
  working set (`cost.bytes`): a step reads every weight and its KV once, so that decides what is
  still in cache at the next step. The mid model (~390 MB) streams. The tiny ones sit between
  the two, from under 1 MB up to ~36 MB of KV at batch 16 x context 4096.
- **Attention** (`eager_attention_time`) over the engine's bucketed key range S (context + T rounded
  up to 256, `bucketed_kv_limit`): QK^T and PV at the matmul rate of G x T rows, plus the passes
  `kernels/reference.py` makes over its fp32 scores [B, H_kv, G*T, S] (`masked_softmax_`: scale
  and mask in place, softmax, nan_to_num in place) at a cost per score element measured by running
  `masked_softmax_` itself on generic score tensors of 256 KiB, 2 MiB and 16 MiB (in L2, beyond
  it, half the L3), interpolated by size.
- **Overheads**: aten ops x per-op cost + module calls x per-call cost. `EAGER_OPS` (90 per layer,
  18 per step) is counted as the engine runs a step (inference mode, top-level dispatch; a unit
  test checks it), and the per-op cost is measured over a mix of tiny ops in the proportions of
  that count. This term dominates the tiny models.

## Why rows miss

- **Page faults of score temporaries: fixed in the engine, still not modelled.** The eager
  attention used to allocate five score-sized fp32 temporaries per layer (scaled scores, masked
  scores, the mask expanded to every query head and its negation, probabilities, and a
  nan_to_num copy). Above glibc's mmap threshold, or when glibc trims the heap top it just freed,
  an allocation gets fresh pages from the kernel and every 4 KiB page faults on first write; the
  threshold is dynamic (it rises to the largest mmapped block freed so far, up to 32 MiB, and the
  trim threshold to twice that), so whether a shape faulted depended on the process's history.
  At 8.5 MiB of scores per layer (tiny-llama3, batch 16, context 4096, T 4) the step took ~17k
  faults and 44 ms against 12 ms predicted: the one row of 28 that missed. `masked_softmax_` now
  scales and masks the scores in place, broadcasts the mask over the group's query heads instead
  of copying it, and cleans NaN in place, so the probabilities are the only score-sized tensor
  it allocates. The same step takes 10.6-14.2 ms with no faults (3-4x faster for a user of the CPU
  path at that shape). The model has no fault term; the "page faults / step" column shows whether
  any happened.
- **Borderline rows move between runs.** The host has 2 cores shared with other jobs, and both
  the profile (medians of CPU time, one thread) and the steps (medians of CPU time, one thread,
  5 interleaved rounds per shape) move by ~5-15% between runs. Memory-bandwidth contention is still
  counted as CPU time. In 10 runs of this version (the last one is the table above) the count
  was 28 of 28 nine times and 27 once (tiny-llama3 at batch 16 x context 4096 x T 4 at -25.3%).
  That row ranged from -25% to
  +16%; the +16% came in a run whose profile measured the 16 MiB score passes at twice the usual
  cost from a median of 3 repeats. The profile now takes the median of 10, and the last 5 runs
  were all 28 of 28, that row at -4% to -18%.
- **Systematic residual: mid at batch 1, T 1 is under-predicted by 16-23%.** The profile's 1-row
  rate comes from one generic weight (8192 x 2048). Measured separately, streamed 1-row matmuls
  run at 8.7-10.6 GFLOP/s depending on the weight's shape (1536 x 1024 and 2816 x 1024, the mid
  model's fused QKV and gate/up weights, run 13-15% below the generic one; 1024 x 2816 runs at
  its rate). Keying the rate on shape would take a microbenchmark per model shape, which is no
  longer a generic profile, so the model does not.
- **Development note.** The model's structure (which terms, what they are keyed on) was chosen
  while looking at this sweep's errors. Every parameter comes from `measure_hardware`'s generic
  microbenchmarks, and none is fitted to the rows.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("cost_model_validation_cpu.md"))
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time = step time only with one thread; profile and steps alike
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hw = measure_hardware(device)
    rows = sweep(hw, device, dtype)
    text = report(hw, rows, device, TOLERANCE.get(device.type, 0.25))
    opts.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
