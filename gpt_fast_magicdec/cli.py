"""Checks shared by the command-line scripts (generate.py, bench.py), run before any real work."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import UserError


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
