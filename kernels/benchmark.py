"""Decode-attention micro-benchmark (issue 5): the Triton kernels against the torch paths, in bytes/s.

For every (batch B, context L, new tokens T) it allocates K and V caches [B, H_kv, L + 16, D] holding
L committed tokens plus the T new ones (cache_len = L for every sequence) and times

  triton_full            the Triton kernel, full view (what verification / plain decode run on GPU);
  torch_reference        `decode_attention_reference`, the engine's torch path for decode (its ops as
                         they are, not torch.compiled), kv_limit = L + T as the eager engine passes it;
  torch_sdpa             plain `F.scaled_dot_product_attention(enable_gqa=True)` over the L + T live
                         keys with a [B, 1, T, L + T] bool mask (mask built inside the timed call);
  triton_sparse          the Triton kernel, sparse view of a streaming draft: sel_pos = arange(sink),
                         window = budget - sink (budget + T - 1 keys for the T tokens, whatever L);
  triton_sparse_compact  the same view with the selected keys in compact sel_k / sel_v buffers;
  torch_reference_sparse (not by default) the reference on the sparse view: masks the whole cache.

Bytes are what the *view* must move: K and V of every key the Triton kernel loads for it (`keys_read`)
plus q read and the output written (`bytes_moved`); the torch paths are charged the same bytes, so their
GB/s is an effective bandwidth (they really move more: fp32 copies, masks, score matrices). Achieved
bandwidth = bytes / median time, and `frac_copy_bw` its fraction of the measured copy bandwidth
(`measure_hardware(device).mem_bandwidth`, bytes read + written per second by a 1 GiB copy on GPU).

Timing on CUDA: warm-up calls (Triton compiles there), then the call is captured in a CUDA graph (the
engine replays graphs on GPU; eager if capture fails, `graphed` says which), then each timed replay
is preceded by a 256 MiB read that evicts the L2 cache (a decode step's other layers do that too) and
hides the CPU launch cost; per-rep CUDA events, median. Reps adapt so a method takes ~time_budget_s
at a point (3..max_reps). On CPU: perf_counter per call, no graphs (the Triton rows need
TRITON_INTERPRET=1 there and time the interpreter: only a smoke test).

Memory: a (batch, context) point whose caches would not fit in 80% of the free GPU memory is skipped,
as is a method whose working memory is estimated not to fit, or that runs out of memory; every
skipped (point, method) stays in the rows with `skipped` = the reason.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .reference import decode_attention_reference, full_view_mask

DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32, 64)
DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072)
SLACK = 16  # cache slots past the context: room for up to 16 new tokens
TARGET_FRAC, TARGET_MIN_BATCH, TARGET_MIN_CONTEXT = 0.8, 8, 16384  # issue 5: full view >= 80% of copy BW
SPARSE_FLAT_TOL = 1.25  # sparse view "independent of context": max / min time over contexts <= this
MEMORY_FRACTION = 0.8  # of the free GPU memory, for the caches of one point
FLUSH_BYTES = 256 << 20  # read before every timed rep: 5x the L2 of an H100 / H200

# name -> (view, description)
METHODS = {
    "triton_full": ("full", "Triton kernel, full view"),
    "torch_reference": ("full", "decode_attention_reference: the engine's torch decode path (uncompiled ops)"),
    "torch_sdpa": ("full", "F.scaled_dot_product_attention, enable_gqa, bool mask over the live keys"),
    "triton_sparse": ("sparse", "Triton kernel, sparse view (sink positions + sliding window)"),
    "triton_sparse_compact": ("sparse", "Triton kernel, sparse view, selected keys from compact sel_k/sel_v"),
    "torch_reference_sparse": ("sparse", "decode_attention_reference on the sparse view (masks the whole cache)"),
}
DEFAULT_METHODS = ("triton_full", "torch_reference", "torch_sdpa", "triton_sparse", "triton_sparse_compact")


# ---- bytes ------------------------------------------------------------------------------------------
def keys_read(cache_len: int, n_queries: int, window: Optional[int] = None, selected: Sequence[int] = ()) -> int:
    """Keys the Triton kernel loads for one (sequence, KV head), as its loading rule says.

    Full view (window None): every live key, cache_len + T. Sparse view: the window keys of all T
    tokens, max(cache_len - window + 1, 0) .. cache_len + T - 1, plus each selected position that
    some token sees (0 <= s <= cache_len + T - 1 - window); -1 padding and selected keys inside the
    window are never loaded."""
    n_live = cache_len + n_queries
    if window is None:
        return n_live
    win_lo = max(cache_len - window + 1, 0)
    return (n_live - win_lo) + sum(1 for s in selected if 0 <= s <= n_live - 1 - window)


def bytes_moved(batch: int, keys_per_seq: int, n_queries: int, n_heads: int, n_kv_heads: int, head_dim: int,
                dtype_bytes: int) -> int:
    """K + V of the keys read, every sequence and KV head, plus q read and the output written:
    B * keys * H_kv * D * 2 * dtype_bytes + 2 * B * H * T * D * dtype_bytes.
    (cache_len and the int64 sel_pos are not counted: a few hundred bytes per sequence.)"""
    kv = batch * keys_per_seq * n_kv_heads * head_dim * 2 * dtype_bytes
    return kv + 2 * batch * n_heads * n_queries * head_dim * dtype_bytes


def _sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """x rounded to `digits` significant digits: JSON and markdown show the same value."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def meets_target(row: dict) -> Optional[bool]:
    """Issue 5's bar for a measured triton_full row at batch >= 8 and context >= 16K: >= 80% of the
    copy bandwidth. None for every other row."""
    if (row["method"] != "triton_full" or row.get("skipped") or row["batch"] < TARGET_MIN_BATCH
            or row["context"] < TARGET_MIN_CONTEXT or row.get("frac_copy_bw") is None):
        return None
    return row["frac_copy_bw"] >= TARGET_FRAC


# ---- timing -----------------------------------------------------------------------------------------
def _n_reps(one_s: float, reps: Optional[int], time_budget_s: float, max_reps: int) -> int:
    if reps is not None:
        return reps
    lo = 3 if 3 * one_s <= 1.0 else 1
    return max(lo, min(max_reps, int(time_budget_s / max(one_s, 1e-9))))


def _time_cpu(fn: Callable[[], torch.Tensor], warmup: int, reps: Optional[int], time_budget_s: float,
              max_reps: int) -> tuple[float, int, bool, torch.Tensor]:
    out = None
    for _ in range(warmup):
        out = fn()
    if reps is None:  # one call to size the reps
        t0 = time.perf_counter()
        probe = fn()
        reps = _n_reps(time.perf_counter() - t0, None, time_budget_s, max_reps)
        out = probe if out is None else out
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        out = result if out is None else out
    return statistics.median(times), len(times), False, out


def _time_cuda(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, reps: Optional[int],
               time_budget_s: float, max_reps: int, flush: torch.Tensor,
               use_graphs: bool) -> tuple[float, int, bool, torch.Tensor]:
    out = None
    for _ in range(max(warmup, 1)):  # the first call compiles the Triton kernel
        out = fn()
    out = out.clone()
    torch.cuda.synchronize(device)
    run, graph = fn, None
    if use_graphs:
        try:
            side = torch.cuda.Stream(device)  # warm up on a side stream before capture (torch docs)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # the warm-ups' cached blocks cannot serve the graph's private pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # not capturable: time it eagerly
            graph = None
            torch.cuda.synchronize(device)
            print(f"warning: CUDA graph capture failed ({type(err).__name__}: {err}); timing eagerly",
                  file=sys.stderr)
    run()
    torch.cuda.synchronize(device)

    def timed(n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends):
            flush.sum()  # evict L2; also lets the CPU run ahead of the GPU
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]

    one = timed(1)[0]
    times = timed(_n_reps(one, reps, time_budget_s, max_reps))
    return statistics.median(times), len(times), graph is not None, out


# ---- memory estimates ---------------------------------------------------------------------------------
def _working_bytes(method: str, B: int, H: int, H_kv: int, T: int, S: int, D: int, dtype_bytes: int) -> int:
    """Rough peak of the temporaries of one call (beyond the caches), to skip hopeless ones up front."""
    scores = B * H * T * S
    if method.startswith("torch_reference"):  # one fp32 copy of K or V at a time, fp32 scores x3, masks
        return int(1.2 * (B * H_kv * S * D * 4 + 3 * scores * 4 + 2 * scores + B * H_kv * (S + 1)))
    if method == "torch_sdpa":  # the bool mask; the backend's own temporaries are left to OOM handling
        return B * T * S
    return 4 * B * H * T * (D + 2) * 64  # Triton: fp32 split-K partials (<= 64 splits) and the output


# ---- the sweep ------------------------------------------------------------------------------------------
def _launch_splits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: torch.Tensor,
                   view: dict, num_splits: Optional[int]) -> Optional[int]:
    """The split count decode_attention_triton launches with (None if it cannot plan this call)."""
    try:
        from .decode_attention import launch_plan
        return launch_plan(q, k, v, cache_len, scale=1.0, num_splits=num_splits, **view).num_splits
    except Exception:
        return None


def run_kernel_benchmark(device, dtype: torch.dtype, batch_sizes: Sequence[int], contexts: Sequence[int],
                         n_queries: Sequence[int] = (1, 4), head_dim: int = 128, n_heads: int = 32,
                         n_kv_heads: int = 8, budget: int = 512, sink: int = 16, reps: Optional[int] = None,
                         progress: bool = True, *, methods: Optional[Sequence[str]] = None,
                         num_splits: Optional[int] = None, copy_bandwidth: Optional[float] = None,
                         warmup: int = 2, time_budget_s: float = 0.15, max_reps: int = 50,
                         use_graphs: bool = True, deadline_s: Optional[float] = None,
                         checkpoint_path: Optional[Path] = None, seed: int = 0) -> list[dict]:
    """Time every method at every (batch, context, T); one row per (batch, context, T, method).

    reps: timed reps per method (None: adaptive, ~time_budget_s per method, 3..max_reps);
    num_splits: force the Triton split-K factor (None: the kernel's default, as the engine runs it);
    copy_bandwidth: bytes/s the fractions refer to (None: `measure_hardware(device)`);
    deadline_s: start no new (batch, context) point after this many seconds (they are listed skipped);
    checkpoint_path: rows so far are written there as JSON after every point (survives a kill).
    Rows: batch, context, n_queries, method, view, keys_per_seq, bytes, MB, time_us, bandwidth_GBps,
    frac_copy_bw, reps, graphed, num_splits, max_abs_err, meets_target, skipped (None or why)."""
    from tqdm.auto import tqdm

    from . import triton_available

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    methods = tuple(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if n_heads % n_kv_heads or not 0 <= sink < budget or max(n_queries) > SLACK or min(n_queries) < 1:
        raise ValueError(f"need n_heads % n_kv_heads == 0, 0 <= sink < budget, 1 <= T <= {SLACK}")
    H, H_kv, D = n_heads, n_kv_heads, head_dim
    window, scale = budget - sink, head_dim ** -0.5
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    if copy_bandwidth is None:
        from gpt_fast_magicdec.cost_model import measure_hardware
        copy_bandwidth = measure_hardware(device).mem_bandwidth
    has_triton = triton_available(device)
    triton_fn = None
    if has_triton and any(m.startswith("triton") for m in methods):
        from . import decode_attention_triton as triton_fn
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if on_gpu else None
    gen = torch.Generator(device=device).manual_seed(seed)
    t_start = time.monotonic()

    def base_row(B: int, L: int, T: int, method: str) -> dict:
        view = METHODS[method][0]
        keys = keys_read(L, T, window, range(sink)) if view == "sparse" else keys_read(L, T)
        nbytes = bytes_moved(B, keys, T, H, H_kv, D, dtype_bytes)
        return dict(batch=B, context=L, n_queries=T, method=method, view=view, keys_per_seq=keys, bytes=nbytes,
                    MB=_sig(nbytes / 1e6), time_us=None, bandwidth_GBps=None, frac_copy_bw=None, reps=None,
                    graphed=None, num_splits=None, max_abs_err=None, meets_target=None, skipped=None)

    def skipped_point(B: int, L: int, reason: str) -> list[dict]:
        bar.write(f"skipped batch {B}, context {L}: {reason}", file=sys.stderr)
        return [dict(base_row(B, L, T, m), skipped=reason) for T in n_queries for m in methods]

    def measure(fn: Callable[[], torch.Tensor]) -> tuple[float, int, bool, torch.Tensor]:
        if on_gpu:
            return _time_cuda(fn, device, warmup, reps, time_budget_s, max_reps, flush, use_graphs)
        return _time_cpu(fn, warmup, reps, time_budget_s, max_reps)

    def point(B: int, L: int) -> list[dict]:
        """Every (T, method) row of one (batch, context): the caches are allocated once for all."""
        S_max = L + SLACK
        if deadline_s is not None and time.monotonic() - t_start > deadline_s:
            return skipped_point(B, L, f"time limit: {deadline_s:.0f} s had passed before this point")
        cache_bytes = 2 * B * H_kv * S_max * D * dtype_bytes
        if on_gpu:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0]
            if cache_bytes > MEMORY_FRACTION * free:
                return skipped_point(B, L, f"K+V caches {cache_bytes / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of "
                                           f"{free / 2**30:.1f} GiB free")
        try:
            k = torch.randn(B, H_kv, S_max, D, generator=gen, device=device, dtype=dtype)
            v = torch.randn(B, H_kv, S_max, D, generator=gen, device=device, dtype=dtype)
        except torch.cuda.OutOfMemoryError:
            return skipped_point(B, L, "out of memory allocating the K+V caches")
        cache_len = torch.full((B,), L, dtype=torch.long, device=device)
        sel_pos = torch.arange(sink, device=device).expand(B, H_kv, sink).contiguous()  # as cache.py
        sparse = dict(sel_pos=sel_pos, window=window)
        # Compact buffers: the selected (sink) keys, gathered once after prefill in the engine.
        compact = dict(sparse, sel_k=k[:, :, :sink].contiguous(), sel_v=v[:, :, :sink].contiguous())
        free_after = torch.cuda.mem_get_info(device)[0] if on_gpu else None
        out_rows = []
        for T in n_queries:
            bar.set_postfix_str(f"B={B} L={L} T={T}")
            q = torch.randn(B, H, T, D, generator=gen, device=device, dtype=dtype)
            live = L + T  # keys 0 .. L + T - 1 hold data
            calls = {
                "triton_full": lambda: triton_fn(q, k, v, cache_len, scale=scale, num_splits=num_splits),
                "torch_reference": lambda: decode_attention_reference(q, k, v, cache_len, scale=scale,
                                                                      kv_limit=live),
                "torch_sdpa": lambda: F.scaled_dot_product_attention(
                    q, k[:, :, :live], v[:, :, :live], attn_mask=full_view_mask(cache_len, T, live)[:, None],
                    scale=scale, enable_gqa=True),
                "triton_sparse": lambda: triton_fn(q, k, v, cache_len, scale=scale, num_splits=num_splits, **sparse),
                "triton_sparse_compact": lambda: triton_fn(q, k, v, cache_len, scale=scale, num_splits=num_splits,
                                                           **compact),
                "torch_reference_sparse": lambda: decode_attention_reference(q, k, v, cache_len, scale=scale,
                                                                             kv_limit=live, **sparse),
            }
            outs, t_rows = {}, []
            for method in methods:
                row = base_row(B, L, T, method)
                t_rows.append(row)
                is_sparse = row["view"] == "sparse"
                if method.startswith("triton"):
                    if not has_triton:
                        row["skipped"] = f"triton unavailable on {device.type} (needs CUDA, or TRITON_INTERPRET=1)"
                        continue
                    view = compact if method.endswith("compact") else sparse if is_sparse else {}
                    row["num_splits"] = _launch_splits(q, k, v, cache_len, view, num_splits)
                need = _working_bytes(method, B, H, H_kv, T, live, D, dtype_bytes)
                if on_gpu and need > MEMORY_FRACTION * free_after:
                    row["skipped"] = (f"working memory ~{need / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of "
                                      f"{free_after / 2**30:.1f} GiB free")
                    continue
                try:
                    t, n, graphed, outs[method] = measure(calls[method])
                except torch.cuda.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                    torch.cuda.empty_cache()
                    continue
                except Exception as err:  # e.g. no SDPA kernel for these inputs: note it, go on
                    row["skipped"] = f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                    bar.write(f"batch {B}, context {L}, T {T}, {method}: {row['skipped']}", file=sys.stderr)
                    continue
                bw = row["bytes"] / t
                row.update(time_us=_sig(t * 1e6), bandwidth_GBps=_sig(bw / 1e9),
                           frac_copy_bw=_sig(bw / copy_bandwidth, 3), reps=n, graphed=graphed)
                row["meets_target"] = meets_target(row)
            # Sanity check: full view against torch_sdpa (else the reference); the sparse kernel against
            # the sparse reference when it ran; the compact form against the cache-reading kernel.
            full_base = outs.get("torch_sdpa", outs.get("torch_reference"))
            bases = {"triton_full": full_base, "torch_reference": outs.get("torch_sdpa"),
                     "triton_sparse": outs.get("torch_reference_sparse"),
                     "triton_sparse_compact": outs.get("triton_sparse", outs.get("torch_reference_sparse"))}
            for row in t_rows:
                out, base = outs.get(row["method"]), bases.get(row["method"])
                if out is not None and base is not None:
                    row["max_abs_err"] = _sig((out.float() - base.float()).abs().max().item(), 3)
            out_rows += t_rows
        return out_rows

    rows: list[dict] = []
    bar = tqdm(total=len(batch_sizes) * len(contexts) * len(n_queries), desc="kernels", unit="point",
               disable=not progress)
    for L in contexts:
        for B in batch_sizes:
            rows += point(B, L)
            bar.update(len(n_queries))
            if checkpoint_path is not None:
                Path(checkpoint_path).write_text(json.dumps(rows, indent=1) + "\n")
    bar.close()
    return rows


# ---- report -------------------------------------------------------------------------------------------------
def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def kernel_meta(device, dtype: torch.dtype, *, command: Optional[str] = None, copy_bandwidth: float,
                bandwidth_source: str = "measured copy", **params) -> dict:
    """meta for `write_kernel_report`: command line, git commit, device, versions, date, parameters."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    device = torch.device(device)
    return dict(command=command or " ".join(sys.argv), git_commit=_git_commit(), device=str(device),
                device_name=_device_name(device), torch_version=torch.__version__, triton_version=triton_version,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                dtype=str(dtype).removeprefix("torch."), copy_bandwidth_GBps=_sig(copy_bandwidth / 1e9),
                timing=("CUDA graph replays (eager if capture fails), CUDA events, L2 evicted before each rep, "
                        "median" if device.type == "cuda" else "perf_counter per call, median"),
                bandwidth_source=bandwidth_source, **params)


def summarize(rows: list) -> dict:
    """Issue 5's two checks: the full-view bandwidth target, and sparse time flat in context."""
    region = [r for r in rows if r["meets_target"] is not None]
    target = dict(rows=len(region), meeting=sum(r["meets_target"] for r in region),
                  lowest_frac=min((r["frac_copy_bw"] for r in region), default=None))
    series = {}  # Triton sparse rows at contexts where the view reads the same keys (context >= budget)
    for r in rows:
        if r["view"] == "sparse" and r["method"].startswith("triton") and r["time_us"] is not None:
            series.setdefault((r["batch"], r["n_queries"], r["method"], r["keys_per_seq"]), []).append(r)
    flat = []
    for (B, T, method, keys), rs in series.items():
        times = [r["time_us"] for r in rs]
        spread = _sig(max(times) / min(times), 3)
        flat.append(dict(batch=B, n_queries=T, method=method, keys_per_seq=keys, contexts=[r["context"] for r in rs],
                         time_us=times, spread=spread, flat=spread <= SPARSE_FLAT_TOL if len(rs) > 1 else None))
    return dict(target=target, sparse_flat=flat)


# (row key, markdown header); a cell is str() of the JSON value, except the marks below
COLUMNS = [("batch", "batch"), ("context", "context"), ("n_queries", "T"), ("method", "method"),
           ("keys_per_seq", "keys/seq"), ("MB", "MB"), ("time_us", "µs"), ("bandwidth_GBps", "GB/s"),
           ("frac_copy_bw", "of copy BW"), ("meets_target", "≥80% target"), ("max_abs_err", "max |Δ|"),
           ("reps", "reps"), ("graphed", "graph"), ("num_splits", "splits")]
MARKS = {True: "✅", False: "❌", None: "–"}


def _cell(key: str, value) -> str:
    if key == "meets_target" or value is None:
        return MARKS[value]
    if key == "graphed":
        return "yes" if value else "no"
    return str(value)


def kernels_markdown(rows: list, meta: dict, summary: dict) -> str:
    lines = [f"# Decode-attention kernels on {meta['device_name']}", ""]
    lines += [f"- {key}: `{meta[key]}`" for key in meta]
    lines += ["", "Bytes: K+V of the keys the view reads (`keys/seq` per sequence and KV head) + q + output; the "
              "torch paths are charged the same bytes (effective bandwidth). `of copy BW`: achieved bytes/s over "
              f"the {meta.get('bandwidth_source', 'measured copy')} bandwidth ({meta['copy_bandwidth_GBps']} GB/s). "
              "Timing: see `timing` above. `max |Δ|`: full view vs torch_sdpa (else the reference), "
              "compact vs triton_sparse.", "", "Methods:"]
    lines += [f"- `{m}`: {desc}" for m, (_, desc) in METHODS.items() if any(r["method"] == m for r in rows)]
    t = summary["target"]
    lines += ["", "## Issue 5 targets", ""]
    if t["rows"]:
        ok = "✅" if t["meeting"] == t["rows"] else "❌"
        lines.append(f"- {ok} full view (triton_full) ≥ {TARGET_FRAC:.0%} of copy bandwidth at batch ≥ "
                     f"{TARGET_MIN_BATCH} and context ≥ {TARGET_MIN_CONTEXT}: {t['meeting']} of {t['rows']} rows "
                     f"(lowest {t['lowest_frac']})")
    else:
        lines.append(f"- full view target (batch ≥ {TARGET_MIN_BATCH}, context ≥ {TARGET_MIN_CONTEXT}): "
                     "no measured row in that region")
    flat = [s for s in summary["sparse_flat"] if s["flat"] is not None]
    if flat:
        n_flat = sum(s["flat"] for s in flat)
        lines.append(f"- {'✅' if n_flat == len(flat) else '❌'} sparse view time independent of context "
                     f"(max/min ≤ {SPARSE_FLAT_TOL} over the contexts where it reads the same keys): "
                     f"{n_flat} of {len(flat)} series")
        contexts = sorted({c for s in flat for c in s["contexts"]})
        lines += ["", "### Sparse view time (µs) vs context", "",
                  "| batch | T | method | " + " | ".join(map(str, contexts)) + " | max/min |",
                  "|" + "---|" * (len(contexts) + 4)]
        for s in sorted(flat, key=lambda s: (s["method"], s["batch"], s["n_queries"])):
            by_ctx = dict(zip(s["contexts"], s["time_us"]))
            cells = [str(by_ctx.get(c, "–")) for c in contexts]
            lines.append(f"| {s['batch']} | {s['n_queries']} | {s['method']} | " + " | ".join(cells)
                         + f" | {s['spread']} {MARKS[s['flat']]} |")
    measured = [r for r in rows if not r["skipped"]]
    lines += ["", "## All measured rows", "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(key, r[key]) for key, _ in COLUMNS) + " |" for r in measured]
    skipped = [r for r in rows if r["skipped"]]
    if skipped:  # grouped by (method, reason); points as batch/context/T
        groups: dict = {}
        for r in skipped:
            groups.setdefault((r["method"], r["skipped"]), []).append(f"{r['batch']}/{r['context']}/{r['n_queries']}")
        lines += ["", "## Skipped (batch/context/T)", ""]
        lines += [f"- {method}: {reason}: {', '.join(points)}" for (method, reason), points in groups.items()]
    return "\n".join(lines) + "\n"


def plot_kernels(rows: list, meta: dict, path: Path) -> None:
    """2 x 2: fraction of copy bandwidth vs context (full | sparse, Triton), time vs context (full:
    Triton vs torch paths at the smallest T | sparse kernels: flat). One colour per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["time_us"] is not None]
    batches = sorted({r["batch"] for r in measured})
    ts = sorted({r["n_queries"] for r in measured})
    styles = ["-", "--", ":", "-."]
    colour = {b: f"C{i % 10}" for i, b in enumerate(batches)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)

    def lines(ax, method, key, t_list, style=None, label_fmt="B={b}{t}", alpha=1.0):
        for b in batches:
            for j, T in enumerate(t_list):
                pts = sorted((r["context"], r[key]) for r in measured
                             if r["method"] == method and r["batch"] == b and r["n_queries"] == T)
                if pts:
                    tl = f", T={T}" if len(t_list) > 1 else ""
                    ax.plot(*zip(*pts), style or styles[j % len(styles)], color=colour[b], marker="o", ms=3,
                            alpha=alpha, label=label_fmt.format(b=b, t=tl))

    for ax, method, title in ((axes[0][0], "triton_full", "Triton full view"),
                              (axes[0][1], "triton_sparse", "Triton sparse view")):
        lines(ax, method, "frac_copy_bw", ts)
        ax.axhline(TARGET_FRAC, color="grey", ls="--", lw=0.8)
        ax.set_ylabel(f"achieved / copy bandwidth ({meta['copy_bandwidth_GBps']} GB/s)")
        ax.set_title(f"{title}: fraction of copy bandwidth" + (f" (solid T={ts[0]}, dashed T={ts[1]})"
                                                               if len(ts) > 1 else ""), fontsize=9)
    contexts = sorted({r["context"] for r in measured})
    if contexts and contexts[-1] >= TARGET_MIN_CONTEXT:
        axes[0][0].axvspan(TARGET_MIN_CONTEXT, contexts[-1] * 1.2, color="green", alpha=0.05,
                           label=f"target region (batch ≥ {TARGET_MIN_BATCH})")
    for ax in axes[0]:
        top = max([r["frac_copy_bw"] for r in measured if r["method"].startswith("triton")] + [1.0])
        ax.set_ylim(0, 1.05 * top)
    t0 = ts[:1]
    lines(axes[1][0], "triton_full", "time_us", t0, "-", "B={b} triton")
    lines(axes[1][0], "torch_sdpa", "time_us", t0, "--", "B={b} sdpa", alpha=0.6)
    lines(axes[1][0], "torch_reference", "time_us", t0, ":", "B={b} reference", alpha=0.6)
    axes[1][0].set_title(f"Full view time, T={t0[0] if t0 else '?'} (solid Triton, dashed SDPA, dotted reference)",
                         fontsize=9)
    lines(axes[1][1], "triton_sparse", "time_us", t0, "-", "B={b}")
    lines(axes[1][1], "triton_sparse_compact", "time_us", t0, "--", "B={b} compact", alpha=0.6)
    axes[1][1].set_title(f"Sparse view time, T={t0[0] if t0 else '?'}: flat in context "
                         "(solid cache, dashed compact)", fontsize=9)
    for ax in axes[1]:
        ax.set_yscale("log")
        ax.set_ylabel("µs per call (median)")
    for ax in (a for row in axes for a in row):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 and c % 1024 == 0 else str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    title = (f"Decode attention: {meta['device_name']}, {meta['dtype']}, H={meta.get('n_heads')} "
             f"H_kv={meta.get('n_kv_heads')} D={meta.get('head_dim')}, budget {meta.get('budget')} "
             f"(sink {meta.get('sink')})")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)


def write_kernel_report(rows: list, out_dir, meta: dict) -> dict:
    """kernels.json ({meta, summary, rows}), kernels.md and kernels.png (if any row was measured) in
    out_dir. Returns {name: path} of the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = dict(json=out_dir / "kernels.json", md=out_dir / "kernels.md")
    paths["json"].write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1,
                                        ensure_ascii=False) + "\n")
    paths["md"].write_text(kernels_markdown(rows, meta, summary))
    if any(r["time_us"] is not None for r in rows):
        paths["png"] = out_dir / "kernels.png"
        plot_kernels(rows, meta, paths["png"])
    return paths


def kernel_bench_cli(out_dir, command: str, device: Optional[str], dtype: Optional[torch.dtype],
                     batch_sizes: Sequence[int], contexts: Sequence[int], gammas: Sequence[int], budget: int,
                     sink: int, hardware: str = "measure", deadline_s: float = 480.0) -> dict:
    """bench.py --kernels: T = 1 and gamma + 1 for each gamma; the report goes to out_dir. Rows so far
    are kept in out_dir/kernels.partial.json while it runs; after deadline_s no new point starts."""
    from gpt_fast_magicdec.cost_model import get_profile

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    hw = get_profile(hardware, device)
    n_queries = sorted({1, *(g + 1 for g in gammas)})
    shape = dict(n_heads=32, n_kv_heads=8, head_dim=128, budget=budget, sink=sink)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / "kernels.partial.json"
    rows = run_kernel_benchmark(device, dtype, batch_sizes, contexts, n_queries=n_queries,
                                copy_bandwidth=hw.mem_bandwidth, deadline_s=deadline_s, checkpoint_path=partial,
                                **shape)
    meta = kernel_meta(device, dtype, command=command, copy_bandwidth=hw.mem_bandwidth,
                       bandwidth_source=hw.name, window=budget - sink, n_queries=n_queries, **shape)
    paths = write_kernel_report(rows, out_dir, meta)
    with contextlib.suppress(OSError):
        partial.unlink()
    md = paths["md"].read_text()
    print(md[md.index("## Issue 5 targets"):md.index("## All measured rows")].rstrip())  # the full table: in the file
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths
