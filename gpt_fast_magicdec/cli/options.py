"""What the command-line scripts (generate.py, bench.py) share: the options that place and run the
model, and the checks of them that run before any real work."""
from __future__ import annotations

from typing import Callable, Optional

import click
import torch

from ..errors import UserError


def resolve_device(name: Optional[str]) -> torch.device:
    """--device as a torch.device: cuda when available and none is given. A name torch cannot
    parse, or a GPU this machine does not have, is one line instead of a traceback at first use."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """--dtype as a torch.dtype: bfloat16 on CUDA and float32 on CPU when none is given."""
    if name is not None:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
