"""Validate the cost model on this machine: measured profile vs timed engine steps.

    python -m benchmarks.validate_cost_model          # from the repo root; CPU by default
    python -m benchmarks.validate_cost_model --device cuda     # writes benchmarks/cost_model_validation_gpu.md

The profile comes from `measure_hardware` alone (a copy, one square matmul, a mix of tiny ops; on
CPU also matmuls of 1-64 rows against a generic 64 MiB and 512 KiB weight and the eager attention's
passes over generic score tensors; on GPU graph replay): no model shape is used to measure it, and
nothing is fitted to the rows below, so every row is held out. Each row times one engine step for
one shape (plain decode, T = 1, and verification, T = gamma + 1 = 4, at several batch sizes and
contexts) and compares the median with `roofline_time(decode_step_cost(...), hw)`. The steps are the
ones the engine runs on that device: on CPU `forward_step` eager over the bucketed key range
(`kv_bucket=KV_BUCKET`, `graphs=False`); on CUDA the compiled step replayed from its CUDA graph
(`StepRunner`, Triton attention over the live keys, `graphs=True`; `--eager` times eager steps
instead). Target: within 25% on CPU, 10% on GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from gpt_fast_magicdec.attention import resolve_backend
from gpt_fast_magicdec.benchmarking.report import device_name, git_commit
from gpt_fast_magicdec.checkpoint import random_model
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import HardwareProfile, decode_step_cost, measure_hardware, roofline_time
from gpt_fast_magicdec.steps import CAPTURE_SCRATCH, KV_BUCKET, Step, StepRunner, StepSpec, bucketed_kv_limit, forward_step

# A mid-size shape whose weights (~390 MB fp32) and KV cache make memory traffic matter on CPU.
MID = ModelArgs(vocab_size=8192, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, intermediate_size=2816,
                max_position_embeddings=8192)
SWEEPS = {  # (model, batches, contexts, query lengths) by device type
    "cpu": [
        ("tiny", (1, 8), (256, 2048), (1, 4)),
        ("tiny-llama3", (2, 16), (512, 4096), (1, 4)),
        ("mid", (1, 4, 8), (512, 2048), (1, 4)),
    ],
    # Public shapes with random bf16 weights: a step reads 2.5-16 GB of weights and up to 16 GiB of
    # KV, so it is bound by memory traffic as the engine's real workloads are.
    "cuda": [
        ("llama-3.2-1b", (1, 8, 32), (4096, 16384), (1, 4)),
        ("llama-3.1-8b", (1, 8), (4096, 16384), (1, 4)),
    ],
}
TOLERANCE = {"cpu": 0.25, "cuda": 0.10}


def model_args(name: str) -> ModelArgs:
    return MID if name == "mid" else ModelArgs.from_preset(name)


def step_fn(model, batch: int, context: int, n_tokens: int, device: torch.device,
            runner: Optional[StepRunner] = None):
    """One forward of `n_tokens` per sequence over `context` cached keys. Without a runner: eager,
    with the key range the engine's eager path uses (`bucketed_kv_limit`: context + n rounded up to
    KV_BUCKET), full fp32 logits. With one: the runner's step (compiled and replayed from a CUDA
    graph), greedy as the engine's greedy decoding, its argmax inside the graph."""
    tokens = torch.randint(model.args.vocab_size, (batch, n_tokens), device=device)
    cache_len = torch.full((batch,), context, dtype=torch.long, device=device)
    if runner is not None:
        graphed = Step(StepSpec("target", n_tokens, greedy=True), model)

        def step():
            runner.run(graphed, tokens, cache_len)
            torch.cuda.synchronize(device)
        return step
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


def sweep(hw: HardwareProfile, device: torch.device, dtype: torch.dtype, graphs: bool,
          models: Optional[list] = None) -> list[dict]:
    rows = []
    for name, batches, contexts, lengths in SWEEPS[device.type]:
        if models and name not in models:
            continue
        args = model_args(name)
        model = random_model(args, device, dtype)
        runner = None
        if graphs:
            backend = resolve_backend("auto", device)
            runner = StepRunner(backend, device, compile=True, use_graphs=True)
        with torch.inference_mode():
            for batch in tqdm(batches, desc=f"{name}: batch sizes", leave=False):
                # The cache is [B, ...]; long enough that the bucketed key range is never capped and
                # that graph warm-ups have their scratch slots past the last real position.
                cache = -(-(max(contexts) + max(lengths) + CAPTURE_SCRATCH) // KV_BUCKET) * KV_BUCKET
                model.setup_caches(batch, cache, dtype, device)
                if runner is not None:
                    runner.graphs.clear()  # captured graphs bake in the old cache tensors
                shapes = [(context, n) for context in contexts for n in lengths]
                measured = time_steps({s: step_fn(model, batch, *s, device, runner) for s in shapes}, device)
                for context, n in shapes:
                    # Graph steps read the live keys (Triton) or the whole cache (torch reference).
                    kv = dict(kv_tokens=cache if runner and runner.backend == "torch" else None,
                              kv_bucket=None if graphs else KV_BUCKET)
                    cost = decode_step_cost(args, batch, context, n, dtype.itemsize, **kv)
                    predicted = roofline_time(cost, hw, graphs=graphs)
                    seconds, faults = measured[(context, n)]
                    rows.append(dict(model=name, batch=batch, context=context, n_tokens=n,
                                     predicted_ms=predicted * 1e3, measured_ms=seconds * 1e3,
                                     error=predicted / seconds - 1, faults=faults,
                                     score_mb=4 * cost.score_elems / 2**20))
        del model, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(hw: HardwareProfile, rows: list[dict], device: torch.device, tolerance: float, graphs: bool,
           command: str) -> str:
    within = sum(abs(r["error"]) <= tolerance for r in rows)
    fields = {f.name: getattr(hw, f.name) for f in dataclasses.fields(hw)}
    steps = "graph-replayed compiled steps, `graphs=True`" if graphs else "eager steps, `graphs=False`"
    lines = [f"# Cost model validation on {device.type}", "",
             f"Generated by `{command}` on {device_name(device)}, "
             f"torch {torch.__version__}, commit `{git_commit()}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Profile measured by `measure_hardware` (no model shape used): "
             + ", ".join(f"`{k}`={v:.4g}" if isinstance(v, float) else f"`{k}`={v}" for k, v in fields.items()), "",
             f"**{within} / {len(rows)} rows within {tolerance:.0%}** ({steps}).", "",
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
    return "\n".join(lines) + "\n" + (NOTES if device.type == "cpu" else GPU_NOTES)


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
  counted as CPU time. In 11 runs of this version (the last one is the table above) the count
  was 28 of 28 ten times and 27 once (tiny-llama3 at batch 16 x context 4096 x T 4 at -25.3%).
  That row ranged from -25% to
  +16%; the +16% came in a run whose profile measured the 16 MiB score passes at twice the usual
  cost from a median of 3 repeats. The profile now takes the median of 10, and the last 6 runs
  were all 28 of 28, that row at -4% to -18%.
- **Systematic residual: mid at batch 1, T 1 is under-predicted by 15-23%.** The profile's 1-row
  rate comes from one generic weight (8192 x 2048). Measured separately, streamed 1-row matmuls
  run at 8.7-10.6 GFLOP/s depending on the weight's shape (1536 x 1024 and 2816 x 1024, the mid
  model's fused QKV and gate/up weights, run 13-15% below the generic one; 1024 x 2816 runs at
  its rate). Keying the rate on shape would take a microbenchmark per model shape, which is no
  longer a generic profile, so the model does not.
- **Development note.** The model's structure (which terms, what they are keyed on) was chosen
  while looking at this sweep's errors. Every parameter comes from `measure_hardware`'s generic
  microbenchmarks, and none is fitted to the rows.
"""


GPU_NOTES = """
## What the model counts on GPU

- **Graph steps** (the default on CUDA): linear layers and attention each at max(bytes / copy
  bandwidth, FLOPs / bf16 matmul rate), both measured on generic tensors, attention over the live
  keys the Triton kernel reads; plus `step_overhead_s` (replay and sync of a one-kernel graph) and
  `GRAPH_KERNELS` per layer and per step times `kernel_overhead_s` (the gap between kernels of a
  replayed graph). The in-graph argmax of greedy steps and the copies of tokens and lengths into
  the graph's buffers are not counted.
- **Eager steps** (`--eager`): the same rooflines plus `EAGER_OPS` per layer and per step times the
  measured per-op cost, as if the host's launches and the GPU's work did not overlap.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report to write (default: benchmarks/cost_model_validation_cpu.md, "
                             "_gpu.md on CUDA, _gpu_eager.md with --eager)")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of the device's sweep (CPU: tiny, tiny-llama3, mid; "
                             "CUDA: llama-3.2-1b, llama-3.1-8b), e.g. to split a GPU run into shorter ones")
    parser.add_argument("--eager", action="store_true",
                        help="on CUDA, time eager steps instead of the engine's compiled CUDA-graph steps")
    opts = parser.parse_args()
    device_type = opts.device.split(":")[0]
    if device_type not in SWEEPS or (device_type == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"error: --device must be cpu or an available cuda device, got {opts.device}")
    device = torch.device(opts.device)
    models = opts.models.split(",") if opts.models else None
    known = [name for name, *_ in SWEEPS[device.type]]
    if models and not set(models) <= set(known):
        raise SystemExit(f"error: --models takes names from the {device.type} sweep ({', '.join(known)}), "
                         f"got {opts.models}")
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time = step time only with one thread; profile and steps alike
    graphs = device.type == "cuda" and not opts.eager
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hw = measure_hardware(device)
    rows = sweep(hw, device, dtype, graphs, models)
    command = " ".join(["python -m benchmarks.validate_cost_model", *sys.argv[1:]])
    text = report(hw, rows, device, TOLERANCE[device.type], graphs, command)
    suffix = "cpu" if device.type == "cpu" else ("gpu" if graphs else "gpu_eager")
    out = opts.out or Path(__file__).with_name(f"cost_model_validation_{suffix}.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
