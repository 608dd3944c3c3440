"""What the command-line scripts (generate.py, bench.py) share: the options that place and run the
model. Their defaults and checks are the library's (devices.py); the scripts name its errors' parameters
with their flags."""
from __future__ import annotations

from typing import Callable

import click

from ..devices import DTYPES


def model_options(command: Callable) -> Callable:
    """--device, --dtype, --attention, --compile/--no-compile and --prefill-chunk: one definition for
    every script that runs the engine, so their names, defaults and help never drift apart."""
    options = [
        click.option("--device", default=None, envvar="GPT_FAST_MAGICDEC_DEVICE",
                     help="cuda, cuda:1, cpu... Default: $GPT_FAST_MAGICDEC_DEVICE, else cuda if available."),
        click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
                     help="Weights and KV cache dtype. Default: bfloat16 on CUDA, float32 on CPU."),
        click.option("--attention", type=click.Choice(["auto", "torch", "triton"]), default="auto",
                     show_default=True,
                     help="Decode attention: Triton kernels (auto on CUDA) or the plain-torch reference."),
        click.option("--compile/--no-compile", default=None,
                     help="torch.compile the decode steps. Default: on for CUDA (with CUDA graphs), off on CPU."),
        # int, not IntRange: the scripts refuse a bad value with their own one-line error.
        click.option("--prefill-chunk", type=int, default=2048, show_default=True,
                     help="Prefill this many prompt tokens per forward pass (bounds activation memory)."),
    ]
    for option in reversed(options):  # decorators apply bottom-up: keep the listed order in --help
        command = option(command)
    return command
