"""Memory a run needs against memory there is, estimated before anything is allocated, so that a model
or KV cache that cannot fit is one line with the numbers, not an allocator traceback or the OOM killer.

  available(device)                          what can still be allocated now, and where that figure comes from
  model_bytes(args, dtype)                   the weights of a ModelArgs, without building the model
  kv_bytes_per_token(args, dtype_bytes, tp)  K and V of one token on one rank
  kv_cache_bytes(args, batch, slots, dtype)  one model's static K and V caches
  fits_reason(what, need, device)            None, or why `need` bytes do not fit (one line)
  check_fits(what, need, device)             the same as a UserError

On the CPU "available" is the kernel's MemAvailable (free memory plus the page cache it can drop),
bounded by the limit of the process's cgroup when one is set (a container's `--memory`), since the
OOM killer enforces that one first. On CUDA it is the device's free memory (torch.cuda.mem_get_info).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

from .config import ModelArgs
from .errors import UserError

MEMINFO = Path("/proc/meminfo")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# What the checks leave for everything they do not count: activations, logits, allocator slack.
DEFAULT_HEADROOM = 0.9
_NO_LIMIT = 2**60  # cgroup v1 spells "no limit" as a number near 2**63


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---- what there is -----------------------------------------------------------------------------
def available(device) -> tuple[Optional[int], str]:
    """(bytes that can still be allocated on `device`, where the figure comes from). The bytes are
    None when they cannot be told (an unknown device type, no /proc): every check treats that as "fits"."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "free"
    if device.type != "cpu":
        return None, ""
    system, room = _meminfo_available(), _cgroup_room()
    if room is not None and (system is None or room < system):
        return room, "left under the cgroup memory limit"
    return system, "available (MemAvailable)"


def _meminfo_available() -> Optional[int]:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (not Linux): free pages, which undercounts what the page cache would give back
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_field(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_dirs() -> list[tuple[Path, int]]:
    """(directory, cgroup version) of this process's memory cgroup and of each of its ancestors that
    is visible here. Inside a container the cgroup root itself is the container's."""
    dirs = []
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2; a hybrid host mounts it at unified/
            root, version = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT, 2
        elif "memory" in controllers.split(","):
            root, version = CGROUP_ROOT / "memory", 1
        else:
            continue
        d = root / path.lstrip("/")
        while True:
            dirs.append((d, version))
            if d == root:
                break
            d = d.parent
    if not dirs:
        dirs = [(CGROUP_ROOT, 2), (CGROUP_ROOT / "memory", 1)]
    return [(d, v) for d, v in dirs if d.is_dir()]


def _cgroup_room() -> Optional[int]:
    """Bytes the tightest memory limit among this process's cgroups still allows: limit - usage,
    plus the inactive file cache the kernel reclaims before it kills anything. None: no limit."""
    rooms = []
    for d, version in _cgroup_dirs():
        if version == 2:
            limit, usage = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            reclaimable = _stat_field(d / "memory.stat", "inactive_file")
        else:
            limit, usage = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            reclaimable = _stat_field(d / "memory.stat", "total_inactive_file")
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            rooms.append(max(limit - usage + reclaimable, 0))
    return min(rooms) if rooms else None


# ---- what a run needs ---------------------------------------------------------------------------
def model_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of the weights of `args` in `dtype` (a tied output head counted once)."""
    from .checkpoint import expected_shapes

    return sum(math.prod(shape) for shape in expected_shapes(args).values()) * dtype.itemsize


def kv_heads_per_rank(args: ModelArgs, tp: int = 1) -> int:
    """KV heads one of `tp` tensor-parallel ranks holds: ceil, since with tp > n_kv_heads each rank
    keeps one (replicated) KV head."""
    return -(-args.n_kv_heads // tp)


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2, tp: int = 1) -> int:
    """K and V of one token, all layers, one rank: 2 * n_layers * H_kv_local * D * dtype_bytes. The one
    definition: the engine's allocation, the memory checks and the cost model all use it."""
    return 2 * args.n_layers * kv_heads_per_rank(args, tp) * args.head_dim * dtype_bytes


def kv_cache_bytes(args: ModelArgs, batch: int, slots: int, dtype: torch.dtype) -> int:
    """Bytes of one model's K and V caches for `batch` rows of `slots` positions each (`args` as the
    model was built: under tensor parallelism, its rank's shard)."""
    return kv_bytes_per_token(args, dtype.itemsize) * batch * slots


# ---- the checks -----------------------------------------------------------------------------------
def fits_reason(what: str, need_bytes: int, device, headroom: float = DEFAULT_HEADROOM,
                freed_bytes: int = 0) -> Optional[str]:
    """None when `need_bytes` fit in `headroom` of what `device` has available (plus `freed_bytes`
    that will be released first, e.g. the caches a new allocation replaces); else one line:
    "<what> needs 131.2 GiB but 21.3 GiB are available (MemAvailable) on cpu"."""
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    have, source = available(device)
    if have is None:
        return None
    have += freed_bytes
    if need_bytes <= headroom * have:
        return None
    return (f"{what} needs {gib(need_bytes)} but {gib(have)} are {source} on {torch.device(device)}"
            f"{f' (and {1 - headroom:.0%} of it is kept for activations)' if need_bytes <= have else ''}")


def check_fits(what: str, need_bytes: int, device, headroom: float = DEFAULT_HEADROOM, freed_bytes: int = 0,
               advice: str = "use a smaller model, batch or context") -> None:
    """Raise UserError (one line: the numbers, then `advice`) unless `need_bytes` fit; see `fits_reason`."""
    reason = fits_reason(what, need_bytes, device, headroom, freed_bytes)
    if reason is not None:
        raise UserError(f"{reason}; {advice}")
