"""Where a run computes and in which precision: the one place the defaults and checks live.

  resolve_device(None)            cuda when there is a GPU, else cpu
  resolve_dtype(None, device)     bfloat16 on CUDA, float32 on CPU
  check_model_source(ckpt, rw)    a checkpoint or random weights, never both (and for the draft)

load_engine, the CLIs and the benchmark tools all call these, so a default or a message cannot
drift between them. Errors name the parameter (`{device}`); the CLIs rename it to their flag.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import ParameterError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: Union[str, torch.device, None]) -> torch.device:
    """A device name (None: cuda when available) as a torch.device. A name torch cannot parse, or a
    GPU this machine does not have, is one ParameterError here instead of a traceback at first use."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ParameterError(f"{{device}} {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ParameterError(f"{{device}} {name}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise ParameterError(f"{{device}} {name}: no CUDA GPU is available on this machine; use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ParameterError(f"{{device}} {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """A dtype or its name (None: bf16 on GPUs, what the kernels and the roofline numbers assume;
    fp32 on CPU, where the exact checks run)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ParameterError(f"{{dtype}} must be one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
    return DTYPES[dtype]


def check_model_source(checkpoint, random_weights: Optional[str], draft_checkpoint=None,
                       draft_random_weights: Optional[str] = None) -> None:
    """A run loads a checkpoint or builds random weights of a preset, not both; its draft likewise."""
    if checkpoint is not None and random_weights is not None:
        raise ParameterError("give either {checkpoint} or {random_weights}, not both")
    if draft_checkpoint is not None and draft_random_weights is not None:
        raise ParameterError("give at most one of {draft_checkpoint} and {draft_random_weights}")
