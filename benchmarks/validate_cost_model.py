"""Validate the cost model on this machine: measured profile vs timed engine steps.

    python -m benchmarks.validate_cost_model          # from the repo root; CPU by default
    python -m benchmarks.validate_cost_model --device cuda --out benchmarks/cost_model_validation_gpu.md

The profile comes from `measure_hardware` alone (a copy, one square matmul, a mix of tiny ops;
on GPU also graph replay): no model shape is used to measure it, so every row below is held out.
Each row times `forward_step` (the engine's one step, eager) for one shape — plain decode (T = 1)
and verification (T = gamma + 1) at several batch sizes and contexts — and compares the median with
`roofline_time(decode_step_cost(...), hw)`. Target: within 25% on CPU, 10% on GPU.
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
from gpt_fast_magicdec.engine import KV_BUCKET, bucketed_kv_limit, forward_step, random_model

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

    def step():
        forward_step(model, tokens, cache_len, None, None, "torch", False, False, kv_limit=kv_limit)
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
## Why rows miss

- **Attention is not fused on this path.** The cost model counts attention as one fused kernel
  (the KV read and the QK/PV FLOPs). The eager `torch` path (`kernels/reference.py`) materialises
  fp32 scores `[B, H_kv, G * T, S]`, an expanded mask, and passes over them several times
  (masked_fill, softmax, nan_to_num, PV), which the model does not count. It is not one constant to
  measure either: timing `decode_attention_reference` alone on shapes outside this sweep gave
  3 to 20 ns per score element depending on the shape (cache residency, head_dim). Rows with many score elements (batch x heads x T x context, e.g. tiny-llama3 at
  batch 16 or context 4096, tiny at batch 8 x context 2048 x T 4) are under-predicted most. The
  GPU path uses the fused Triton kernel, which is what the model describes.
- **Skinny matmuls on CPU are neither at the memory roof nor at the square-matmul rate.**
  `matmul_flops` comes from one 512 x 512 x 512 fp32 product; the linear layers here multiply
  B x T = 1-32 rows. At 1 row (GEMV) the mid model runs near the measured copy bandwidth (rows
  within); at 4-8 rows CPU BLAS packs weight panels per call and is slower than either roof
  (under-predicted); at 16-32 rows the prediction is compute bound on the measured rate.
- **Shared machine.** The host has 2 cores shared with other jobs (load average 5-8 during these
  runs). The profile takes medians of wall time, the steps medians of CPU time with one thread, but
  memory-bandwidth contention still moves both: the measured matmul rate ranged from 40 to 110
  GFLOP/s and the copy bandwidth from 15 to 37 GB/s between runs of the same microbenchmarks.
- The overhead term (aten ops x measured per-op cost + module calls x measured per-call cost)
  dominates the tiny models' small-shape rows, and those are the rows the model gets within 25%.
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
