"""The machine a measurement ran on, and its two ceilings: copy bandwidth and matmul rate.

    python -m gpt_fast_magicdec.benchmarking.environment --device cuda --out env.json

Every later figure of a GPU run is divided by these (achieved bandwidth / measured copy bandwidth),
so they are measured on the same machine in the same lease, with `cost_model.measure_hardware`
(a 1 GiB device-to-device copy counting bytes read + written, an 8192^3 bf16 matmul on random
data, and the launch gaps of eager ops and of kernels inside a replayed CUDA graph).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import click
import torch

from ..devices import resolve_device
from ..cost_model import measure_hardware
from ..errors import ParameterError
from .report import device_name, sig

NVIDIA_SMI_FIELDS = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"


def nvidia_smi() -> Optional[dict]:
    """nvidia-smi's view of GPU 0 (driver version, clocks, power limit), or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")] if out.strip() else []
    return dict(zip(NVIDIA_SMI_FIELDS.split(","), values))


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(python=platform.python_version(), torch=torch.__version__, cuda_runtime=torch.version.cuda,
                triton=triton_version, cpus=os.cpu_count())


def gpu_properties(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return dict(total_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}",
                l2_cache_bytes=getattr(props, "L2_cache_size", None))


def describe(device: torch.device) -> dict:
    """Versions, the device, and its measured ceilings and launch gaps."""
    env = dict(device=str(device), device_name=device_name(device), **versions())
    if device.type == "cuda":
        env.update(gpu_properties(device), nvidia_smi=nvidia_smi())
    hw = measure_hardware(device)
    env.update(copy_bandwidth_Bps=sig(hw.mem_bandwidth), matmul_flops=sig(hw.matmul_flops),
               matmul_dtype="bfloat16" if device.type == "cuda" else "float32",
               eager_op_overhead_s=sig(hw.eager_op_overhead_s), graph_kernel_overhead_s=sig(hw.kernel_overhead_s),
               graph_step_overhead_s=sig(hw.step_overhead_s))
    return env


def summary(env: dict) -> str:
    """One line: device, driver, versions and the two ceilings."""
    smi = env.get("nvidia_smi") or {}
    memory = env.get("total_memory_bytes")
    parts = [env["device_name"] + (f", {memory / 2**30:.0f} GiB" if memory else ""),
             f"driver {smi['driver_version']}" if smi.get("driver_version") else None,
             f"torch {env['torch']}" + (f" (CUDA {env['cuda_runtime']})" if env.get("cuda_runtime") else ""),
             f"triton {env['triton']}" if env.get("triton") else "no triton",
             f"copy {env['copy_bandwidth_Bps'] / 1e9:.0f} GB/s",
             f"{env['matmul_dtype']} matmul {sig(env['matmul_flops'] / 1e12, 3)} TFLOP/s"]
    return ", ".join(p for p in parts if p)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the description as JSON here.")
def main(device: str, out: Optional[Path]) -> None:
    """Print the machine's versions and measured ceilings (one line), optionally as JSON too."""
    try:
        dev = resolve_device(device)
    except ParameterError as err:
        click.echo(f"error: {err.named({'device': '--device'})}", err=True)
        sys.exit(1)
    env = describe(dev)
    if out is not None:
        out.write_text(json.dumps(env, indent=1) + "\n")
    click.echo(summary(env))


if __name__ == "__main__":
    main()
