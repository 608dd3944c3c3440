"""Decode-attention micro-benchmark: the Triton kernels against the torch paths, in bytes/s.

For every (batch B, context L, new tokens T) it allocates K and V caches [B, H_kv, L + 16, D] holding
L committed tokens plus the T new ones (cache_len = L for every sequence) and times

  triton_full            the Triton kernel, full view (what verification / plain decode run on GPU);
  triton_full_mass       ... also writing each position's attention mass (a re-selecting draft's
                         scoring verification), charged the same bytes: its time against
                         triton_full is what the score output costs;
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

import json
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..kernels import triton_available
from ..kernels.reference import decode_attention_reference, full_view_mask

from .. import cuda_graphs
from ..timing import time_calls
from .report import sig

DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32, 64)
DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072)
SLACK = 16  # cache slots past the context: room for up to 16 new tokens
TARGET_FRAC, TARGET_MIN_BATCH, TARGET_MIN_CONTEXT = 0.8, 8, 16384  # the target: full view >= 80% of copy BW
SPARSE_FLAT_TOL = 1.25  # sparse view "independent of context": max / min time over contexts <= this
MEMORY_FRACTION = 0.8  # of the free GPU memory, for the caches of one point
FLUSH_BYTES = 256 << 20  # read before every timed rep: 5x the L2 of an H100 / H200

# name -> (view, description)
METHODS = {
    "triton_full": ("full", "Triton kernel, full view"),
    "triton_full_mass": ("full", "Triton kernel, full view + the attention mass of every position (pillar's scoring "
                                 "verification)"),
    "torch_reference": ("full", "decode_attention_reference: the engine's torch decode path (uncompiled ops)"),
    "torch_sdpa": ("full", "F.scaled_dot_product_attention, enable_gqa, bool mask over the live keys"),
    "triton_sparse": ("sparse", "Triton kernel, sparse view (sink positions + sliding window)"),
    "triton_sparse_compact": ("sparse", "Triton kernel, sparse view, selected keys from compact sel_k/sel_v"),
    "torch_reference_sparse": ("sparse", "decode_attention_reference on the sparse view (masks the whole cache)"),
}
DEFAULT_METHODS = ("triton_full", "triton_full_mass", "torch_reference", "torch_sdpa", "triton_sparse",
                   "triton_sparse_compact")


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


def meets_target(row: dict) -> Optional[bool]:
    """The bar for a measured triton_full row at batch >= 8 and context >= 16K: >= 80% of the
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


def _measure(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, reps: Optional[int],
             time_budget_s: float, max_reps: int, flush: Optional[torch.Tensor],
             use_graphs: bool) -> tuple[float, int, bool, torch.Tensor]:
    """(median seconds, reps, graphed, output) of fn: warm-up calls (Triton compiles there), on CUDA
    a graph replay when capture works, then one call to size the reps, then the timed reps."""
    cuda = device.type == "cuda"
    out = None
    for _ in range(max(warmup, 1) if cuda else warmup):
        out = fn()
    run, graphed = fn, False
    if cuda:
        out = out.clone()  # fn's own output may live in the graph's pool from here on
        if use_graphs:
            run, graphed = _graph_replay(fn)
        run()
    before = flush.sum if flush is not None else None  # evict L2; also lets the CPU run ahead of the GPU
    one = time_calls(run, device, 1, before)[0]
    if out is None:  # no warm-up on CPU: keep an output for the accuracy column
        out = fn()
    times = time_calls(run, device, _n_reps(one, reps, time_budget_s, max_reps), before)
    return statistics.median(times), len(times), graphed, out


def _graph_replay(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], bool]:
    """(graph.replay, True), or (fn, False) with a warning when fn cannot be captured."""
    try:
        graph, _ = cuda_graphs.capture(fn, warmup=1, release_cached=True)
        return graph.replay, True
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # not capturable: time it eagerly
        torch.cuda.synchronize()
        print(f"warning: CUDA graph capture failed ({type(err).__name__}: {err}); timing eagerly",
              file=sys.stderr)
        return fn, False


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
        from ..kernels.decode_attention import launch_plan  # needs triton: imported only here
        return launch_plan(q, k, v, cache_len, scale=1.0, num_splits=num_splits, **view).num_splits
    except Exception:
        return None


@dataclass
class _Sweep:
    """What every point of one sweep shares: shapes, options, the Triton entry point, the L2 flush
    buffer, the RNG and the progress bar (set once the rest is ready, as the sweep then starts)."""
    device: torch.device
    dtype: torch.dtype
    methods: tuple[str, ...]
    n_queries: Sequence[int]
    H: int
    H_kv: int
    D: int
    sink: int
    window: int  # budget - sink: the sparse view's sliding window
    scale: float
    dtype_bytes: int
    copy_bandwidth: float  # bytes/s the fractions refer to
    has_triton: bool
    triton_fn: Optional[Callable[..., torch.Tensor]]  # None when no Triton method can run
    num_splits: Optional[int]
    flush: Optional[torch.Tensor]  # [FLUSH_BYTES / 4] fp32 on GPU, read before every timed rep; None on CPU
    gen: torch.Generator
    warmup: int
    reps: Optional[int]
    time_budget_s: float
    max_reps: int
    use_graphs: bool
    deadline_s: Optional[float]
    t_start: float  # time.monotonic() when the sweep began, for deadline_s
    bar: object = None  # tqdm

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class _Caches:
    """The tensors of one (batch B, context L) point, shared by all its T and methods."""
    k: torch.Tensor  # [B, H_kv, L + SLACK, D]
    v: torch.Tensor  # [B, H_kv, L + SLACK, D]
    cache_len: torch.Tensor  # [B] int64, all L
    sparse: dict  # sel_pos [B, H_kv, sink] int64 (= arange(sink), as cache.py) and window
    compact: dict  # sparse + sel_k, sel_v [B, H_kv, sink, D]: the selected keys in compact buffers
    free_after: Optional[int]  # free GPU bytes once the caches are allocated (None on CPU)


def _checked_methods(methods: Optional[Sequence[str]], n_heads: int, n_kv_heads: int, budget: int, sink: int,
                     n_queries: Sequence[int]) -> tuple[str, ...]:
    """The methods to time (DEFAULT_METHODS if none given); ValueError on unknown ones or bad shapes."""
    methods = tuple(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if n_heads % n_kv_heads or not 0 <= sink < budget or max(n_queries) > SLACK or min(n_queries) < 1:
        raise ValueError(f"need n_heads % n_kv_heads == 0, 0 <= sink < budget, 1 <= T <= {SLACK}")
    return methods


def _measured_copy_bandwidth(device: torch.device) -> float:
    from gpt_fast_magicdec.cost_model import measure_hardware  # the cost model is only needed here
    return measure_hardware(device).mem_bandwidth


def _triton_entry(has_triton: bool, methods: Sequence[str]) -> Optional[Callable[..., torch.Tensor]]:
    """decode_attention_triton when some Triton method will run; None otherwise (triton may be absent)."""
    if has_triton and any(m.startswith("triton") for m in methods):
        from ..kernels import decode_attention_triton  # needs triton: imported only here
        return decode_attention_triton
    return None


def _flush_buffer(device: torch.device) -> Optional[torch.Tensor]:
    """[FLUSH_BYTES / 4] fp32 on GPU, whose read before each rep evicts L2; None on CPU (nothing to evict)."""
    return torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if device.type == "cuda" else None


def _base_row(sw: _Sweep, B: int, L: int, T: int, method: str) -> dict:
    """The row of (B, L, T, method) before timing: the bytes its view moves, every result None."""
    view = METHODS[method][0]
    keys = keys_read(L, T, sw.window, range(sw.sink)) if view == "sparse" else keys_read(L, T)
    nbytes = bytes_moved(B, keys, T, sw.H, sw.H_kv, sw.D, sw.dtype_bytes)
    return dict(batch=B, context=L, n_queries=T, method=method, view=view, keys_per_seq=keys, bytes=nbytes,
                MB=sig(nbytes / 1e6), time_us=None, bandwidth_GBps=None, frac_copy_bw=None, reps=None,
                graphed=None, num_splits=None, max_abs_err=None, meets_target=None, skipped=None)


def _skipped_point(sw: _Sweep, B: int, L: int, reason: str) -> list[dict]:
    """Every (T, method) row of a point that is not run, each with skipped = reason."""
    sw.bar.write(f"skipped batch {B}, context {L}: {reason}", file=sys.stderr)
    return [dict(_base_row(sw, B, L, T, m), skipped=reason) for T in sw.n_queries for m in sw.methods]


def _point_skip_reason(sw: _Sweep, B: int, L: int) -> Optional[str]:
    """Why the point (B, L) is not started (past the deadline, caches too big for the GPU), or None."""
    if sw.deadline_s is not None and time.monotonic() - sw.t_start > sw.deadline_s:
        return f"time limit: {sw.deadline_s:.0f} s had passed before this point"
    cache_bytes = 2 * B * sw.H_kv * (L + SLACK) * sw.D * sw.dtype_bytes
    if sw.on_gpu:
        torch.cuda.empty_cache()  # the previous point's caches: give them back before asking what is free
        free = torch.cuda.mem_get_info(sw.device)[0]
        if cache_bytes > MEMORY_FRACTION * free:
            return (f"K+V caches {cache_bytes / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of "
                    f"{free / 2**30:.1f} GiB free")
    return None


def _alloc_kv(sw: _Sweep, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V caches [B, H_kv, L + SLACK, D] (may raise OutOfMemoryError: the point is skipped)."""
    S_max = L + SLACK
    k = torch.randn(B, sw.H_kv, S_max, sw.D, generator=sw.gen, device=sw.device, dtype=sw.dtype)
    v = torch.randn(B, sw.H_kv, S_max, sw.D, generator=sw.gen, device=sw.device, dtype=sw.dtype)
    return k, v


def _make_caches(sw: _Sweep, k: torch.Tensor, v: torch.Tensor, B: int, L: int) -> _Caches:
    """The point's caches with cache_len = L and the sparse views over them."""
    cache_len = torch.full((B,), L, dtype=torch.long, device=sw.device)
    sel_pos = torch.arange(sw.sink, device=sw.device).expand(B, sw.H_kv, sw.sink).contiguous()  # as cache.py
    sparse = dict(sel_pos=sel_pos, window=sw.window)
    # Compact buffers: the selected (sink) keys, gathered once after prefill in the engine.
    compact = dict(sparse, sel_k=k[:, :, :sw.sink].contiguous(), sel_v=v[:, :, :sw.sink].contiguous())
    free_after = torch.cuda.mem_get_info(sw.device)[0] if sw.on_gpu else None
    return _Caches(k, v, cache_len, sparse, compact, free_after)


def _run_point(sw: _Sweep, B: int, L: int) -> list[dict]:
    """Every (T, method) row of one (batch, context): the caches are allocated once for all."""
    reason = _point_skip_reason(sw, B, L)
    if reason is not None:
        return _skipped_point(sw, B, L, reason)
    try:
        k, v = _alloc_kv(sw, B, L)
    except torch.cuda.OutOfMemoryError:
        return _skipped_point(sw, B, L, "out of memory allocating the K+V caches")
    caches = _make_caches(sw, k, v, B, L)
    out_rows = []
    for T in sw.n_queries:
        out_rows += _run_queries(sw, caches, B, L, T)
    return out_rows


def _run_queries(sw: _Sweep, caches: _Caches, B: int, L: int, T: int) -> list[dict]:
    """The rows of every method at (B, L, T), with their errors against each other."""
    sw.bar.set_postfix_str(f"B={B} L={L} T={T}")
    q = torch.randn(B, sw.H, T, sw.D, generator=sw.gen, device=sw.device, dtype=sw.dtype)  # [B, H, T, D]
    outs: dict[str, torch.Tensor] = {}  # method -> its output [B, H, T, D], for the accuracy column
    t_rows = [_time_method(sw, caches, q, B, L, T, method, outs) for method in sw.methods]
    _fill_errors(t_rows, outs)
    return t_rows


def _triton_view(caches: _Caches, method: str) -> dict:
    """The view arguments decode_attention_triton gets for a Triton method ({} for the full view)."""
    if method.endswith("compact"):
        return caches.compact
    return caches.sparse if METHODS[method][0] == "sparse" else {}


def _sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: torch.Tensor, T: int, live: int,
                 scale: float) -> torch.Tensor:
    """torch_sdpa: SDPA over the live keys [B, H_kv, live, D]; the bool mask [B, 1, T, live] is built
    here so that the timed call pays for it, as a caller would."""
    return F.scaled_dot_product_attention(q, k[:, :, :live], v[:, :, :live],
                                          attn_mask=full_view_mask(cache_len, T, live)[:, None],
                                          scale=scale, enable_gqa=True)


def _method_call(sw: _Sweep, caches: _Caches, q: torch.Tensor, L: int, T: int,
                 method: str) -> Callable[[], torch.Tensor]:
    """The no-argument call that `_measure` times for method at (q [B, H, T, D], the caches)."""
    k, v, cache_len, live = caches.k, caches.v, caches.cache_len, L + T  # keys 0 .. L + T - 1 hold data
    if method == "triton_full_mass":
        mass = torch.empty(k.shape[0], k.shape[1], k.shape[2], dtype=torch.float32, device=k.device)
        return partial(sw.triton_fn, q, k, v, cache_len, scale=sw.scale, num_splits=sw.num_splits, mass_out=mass)
    if method.startswith("triton"):
        return partial(sw.triton_fn, q, k, v, cache_len, scale=sw.scale, num_splits=sw.num_splits,
                       **_triton_view(caches, method))
    if method == "torch_sdpa":
        return partial(_sdpa_masked, q, k, v, cache_len, T, live, sw.scale)
    # torch_reference(_sparse): kv_limit = L + T, as the eager engine passes it
    view = caches.sparse if method == "torch_reference_sparse" else {}
    return partial(decode_attention_reference, q, k, v, cache_len, scale=sw.scale, kv_limit=live, **view)


def _method_skip_reason(sw: _Sweep, caches: _Caches, row: dict, q: torch.Tensor) -> Optional[str]:
    """Why row's method is not timed (no Triton, working memory too big), or None; sets num_splits
    of a Triton row as a side effect, since it needs the same inputs."""
    method, B, T = row["method"], row["batch"], row["n_queries"]
    if method.startswith("triton"):
        if not sw.has_triton:
            return f"triton unavailable on {sw.device.type} (needs CUDA, or TRITON_INTERPRET=1)"
        row["num_splits"] = _launch_splits(q, caches.k, caches.v, caches.cache_len, _triton_view(caches, method),
                                           sw.num_splits)
        if method == "triton_full_mass" and row["num_splits"] is not None:
            row["num_splits"] = max(2, row["num_splits"])  # the mass needs the split partials (launch_plan)
    live = row["context"] + T  # keys 0 .. L + T - 1 hold data
    need = _working_bytes(method, B, sw.H, sw.H_kv, T, live, sw.D, sw.dtype_bytes)
    if sw.on_gpu and need > MEMORY_FRACTION * caches.free_after:
        return (f"working memory ~{need / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of "
                f"{caches.free_after / 2**30:.1f} GiB free")
    return None


def _time_method(sw: _Sweep, caches: _Caches, q: torch.Tensor, B: int, L: int, T: int, method: str,
                 outs: dict) -> dict:
    """The row of one method at (B, L, T): timed, or skipped with the reason; its output goes to outs."""
    row = _base_row(sw, B, L, T, method)
    row["skipped"] = _method_skip_reason(sw, caches, row, q)
    if row["skipped"] is not None:
        return row
    try:
        t, n, graphed, outs[method] = _measure(_method_call(sw, caches, q, L, T, method), sw.device, sw.warmup,
                                               sw.reps, sw.time_budget_s, sw.max_reps, sw.flush, sw.use_graphs)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory"
        torch.cuda.empty_cache()
        return row
    except Exception as err:  # e.g. no SDPA kernel for these inputs: note it, go on
        row["skipped"] = f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        sw.bar.write(f"batch {B}, context {L}, T {T}, {method}: {row['skipped']}", file=sys.stderr)
        return row
    bw = row["bytes"] / t
    row.update(time_us=sig(t * 1e6), bandwidth_GBps=sig(bw / 1e9),
               frac_copy_bw=sig(bw / sw.copy_bandwidth, 3), reps=n, graphed=graphed)
    row["meets_target"] = meets_target(row)
    return row


def _fill_errors(t_rows: list[dict], outs: dict) -> None:
    """max_abs_err of each row of one (B, L, T) whose method and comparison base both ran."""
    # Sanity check: full view against torch_sdpa (else the reference); the sparse kernel against
    # the sparse reference when it ran; the compact form against the cache-reading kernel.
    full_base = outs.get("torch_sdpa", outs.get("torch_reference"))
    bases = {"triton_full": full_base, "triton_full_mass": full_base, "torch_reference": outs.get("torch_sdpa"),
             "triton_sparse": outs.get("torch_reference_sparse"),
             "triton_sparse_compact": outs.get("triton_sparse", outs.get("torch_reference_sparse"))}
    for row in t_rows:
        out, base = outs.get(row["method"]), bases.get(row["method"])
        if out is not None and base is not None:
            row["max_abs_err"] = sig((out.float() - base.float()).abs().max().item(), 3)


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

    device = torch.device(device)
    methods = _checked_methods(methods, n_heads, n_kv_heads, budget, sink, n_queries)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    if copy_bandwidth is None:
        copy_bandwidth = _measured_copy_bandwidth(device)
    has_triton = triton_available(device)
    sw = _Sweep(device=device, dtype=dtype, methods=methods, n_queries=n_queries, H=n_heads, H_kv=n_kv_heads,
                D=head_dim, sink=sink, window=budget - sink, scale=head_dim ** -0.5, dtype_bytes=dtype_bytes,
                copy_bandwidth=copy_bandwidth, has_triton=has_triton, triton_fn=_triton_entry(has_triton, methods),
                num_splits=num_splits, flush=_flush_buffer(device),
                gen=torch.Generator(device=device).manual_seed(seed), warmup=warmup, reps=reps,
                time_budget_s=time_budget_s, max_reps=max_reps, use_graphs=use_graphs, deadline_s=deadline_s,
                t_start=time.monotonic())
    sw.bar = tqdm(total=len(batch_sizes) * len(contexts) * len(n_queries), desc="kernels", unit="point",
                  disable=not progress)
    rows: list[dict] = []
    for L in contexts:
        for B in batch_sizes:
            rows += _run_point(sw, B, L)
            sw.bar.update(len(n_queries))
            if checkpoint_path is not None:
                Path(checkpoint_path).write_text(json.dumps(rows, indent=1) + "\n")
    sw.bar.close()
    return rows
