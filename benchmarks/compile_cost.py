"""What `torch.compile` of one decode step costs, per step shape, with the engine's inductor settings.

    python -m benchmarks.compile_cost                                   # CPU: tiny shapes, 2 to 32 layers
    python -m benchmarks.compile_cost --device cuda --models llama-3.1-8b --batch 32

For each model it compiles `forward_step` (as the engine's StepRunner does, after
`set_compiler_flags()`: coordinate-descent tuning, the FX graph cache) and times the first call of
each step shape a self-speculation run captures: plain decoding (target, T = 1), verification
(target, T = gamma + 1) and the sparse-view draft step (T = 1), then a second call of each (the
steady state). The first call is tracing + lowering + code generation (+ tuning on a GPU); a new
StepSpec is a recompile of the same function. The inductor cache starts empty (a fresh directory),
as on a fresh device machine. Prints a markdown table with the command, commit, device and date.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import tempfile
import time

import click

# A fresh cache, as a freshly started device machine has: before torch._inductor is imported.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cold-"))

import torch  # noqa: E402

from gpt_fast_magicdec.benchmarking.report import device_name, git_commit, utc_now  # noqa: E402
from gpt_fast_magicdec.devices import resolve_device, resolve_dtype  # noqa: E402
from gpt_fast_magicdec.config import PRESETS, ModelArgs  # noqa: E402
from gpt_fast_magicdec.checkpoint import random_model  # noqa: E402
from gpt_fast_magicdec.engine import set_compiler_flags  # noqa: E402
from gpt_fast_magicdec.steps import StepSpec, forward_step  # noqa: E402
from gpt_fast_magicdec.errors import ParameterError, UserError  # noqa: E402

# name -> (preset, n_layers or None for the preset's own): width stays tiny, depth grows, so the
# table separates what grows with the graph (tracing, lowering, one kernel set per layer) from width.
CPU_MODELS = {"tiny-2L": ("tiny-llama3", None), "tiny-8L": ("tiny-llama3", 8), "tiny-32L": ("tiny-llama3", 32)}


def model_args(name: str) -> ModelArgs:
    preset, layers = CPU_MODELS.get(name, (name, None))
    args = ModelArgs.from_preset(preset)
    return args if layers is None else dataclasses.replace(args, name=name, n_layers=layers)


def step_specs(gamma: int, window: int, sink: int) -> list[tuple[str, StepSpec]]:
    """The step shapes of one greedy self-speculation run (streaming view, `sink` selected keys)."""
    return [("plain decode, T=1", StepSpec("target", 1)),
            (f"verify, T={gamma + 1}", StepSpec("target", gamma + 1)),
            ("draft (sparse view), T=1", StepSpec("draft", 1, window, sink, last_only=True))]


def time_call(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure(name: str, device: torch.device, dtype: torch.dtype, batch: int, context: int, gamma: int,
            budget: int, sink: int) -> list[dict]:
    """One fresh compiled forward_step per model; the first and second call of each step shape."""
    args = model_args(name)
    model = random_model(args, device, dtype)
    model.setup_caches(batch, context + 32, dtype, device)
    step = torch.compile(forward_step, fullgraph=True)  # as StepRunner compiles it
    backend = "triton" if device.type == "cuda" else "torch"
    cache_len = torch.full((batch,), context, device=device)
    selected = [torch.arange(sink, device=device).expand(batch, args.n_kv_heads, sink).contiguous()
                for _ in range(args.n_layers)]
    rows = []
    for label, spec in step_specs(gamma, budget - sink, sink):
        tokens = torch.randint(args.vocab_size, (batch, spec.n_tokens), device=device)
        sel = selected if spec.window is not None else None

        def call():
            step(model, spec, tokens, cache_len, sel, backend)

        first, second = time_call(call, device), time_call(call, device)
        rows.append(dict(model=name, layers=args.n_layers, dim=args.dim, step=label, first_s=first,
                         second_ms=1e3 * second))
        print(f"{name:>14} {label:<26} first call {first:7.1f} s   second {1e3 * second:8.2f} ms", flush=True)
    return rows


def markdown(rows: list[dict], device: torch.device, command: str, batch: int, context: int) -> str:
    lines = [f"- command: `{command}`", f"- commit: `{git_commit()}`", f"- device: {device_name(device)}",
             f"- date: {utc_now()}", f"- torch {torch.__version__}; batch {batch}, context {context}; "
             "inductor cache empty at start", "",
             "| model | layers | dim | step | first call (compile) s | second call ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['layers']} | {r['dim']} | {r['step']} | {r['first_s']:.1f} | "
              f"{r['second_ms']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def check_options(device: str, models: str, budget: int, sink: int) -> tuple[list, torch.device]:
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in CPU_MODELS and m not in PRESETS]
    if unknown or not names:
        raise UserError(f"unknown model(s) {unknown}: choose from {', '.join([*CPU_MODELS, *sorted(PRESETS)])}")
    if sink >= budget:
        raise UserError(f"--sink {sink} must be below --budget {budget}")
    return names, resolve_device(device)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--models", default=",".join(CPU_MODELS), show_default=True,
              help=f"Comma-separated models: {', '.join(CPU_MODELS)} (tiny widths, growing depth) or presets "
                   f"({', '.join(sorted(PRESETS))}).")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Batch size of every step.")
@click.option("--context", type=click.IntRange(1), default=1024, show_default=True,
              help="Committed cache length the steps read.")
@click.option("--gamma", type=click.IntRange(1, 15), default=3, show_default=True,
              help="Verification is T = gamma + 1.")
@click.option("--budget", type=click.IntRange(2), default=512, show_default=True,
              help="Draft view: keys per query (sink + window).")
@click.option("--sink", type=click.IntRange(1), default=16, show_default=True, help="Draft view: sink positions.")
def main(device, models, batch, context, gamma, budget, sink):
    """Time the first (compiling) and second call of each decode step shape under torch.compile."""
    try:
        names, dev = check_options(device, models, budget, sink)
    except ParameterError as err:
        click.echo(f"error: {err.named({'device': '--device'})}", err=True)
        sys.exit(1)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    set_compiler_flags()
    dtype = resolve_dtype(None, dev)
    rows = [r for name in names for r in measure(name, dev, dtype, batch, context, gamma, budget, sink)]
    command = shlex.join(["python", "-m", "benchmarks.compile_cost", *sys.argv[1:]])
    print(markdown(rows, dev, command, batch, context))


if __name__ == "__main__":
    main()
