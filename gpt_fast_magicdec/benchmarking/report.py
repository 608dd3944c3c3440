"""Provenance and number formatting shared by every benchmark report and recorded measurement."""
from __future__ import annotations

import datetime
import math
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch


def git_commit() -> Optional[str]:
    """HEAD of this checkout, marked when the working tree has uncommitted changes; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" (with uncommitted changes)" if dirty else "")) or None


def device_name(device) -> str:
    """The GPU's name, or the CPU's architecture and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """x rounded to `digits` significant digits: JSON and markdown print the same value."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
