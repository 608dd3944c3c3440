"""Roofline cost model for decoding and MagicDec speculation: the model behind --gamma auto and bench's predictions.

A forward step over `n_tokens` new tokens for each of `batch` sequences costs

    time = max(linear bytes / mem_bandwidth, linear flops / matmul_flops)      [weights: wq..w2, head]
         + max(KV bytes / mem_bandwidth, attention flops / matmul_flops)       [attention over the cache]
         + n_collectives * allreduce_time(B * n * dim * dtype_bytes)          [tensor parallel, W > 1]
         + n_kernels * per-kernel overhead + step_overhead_s                  [launches, host sync]

where `bytes` is what the step must read or write in device memory (weights, KV cache) and `flops`
its matmul work. The two rooflines are separate because they are separate kernels: at large
batch x (gamma + 1) the linear layers turn compute bound while the KV read still is not, so
`T_V / T_T` rises above 1 sooner than one global max over the sums says.

One speculation round with `gamma` draft steps then yields, for acceptance rate `alpha`,
`Omega = (1 - alpha^(gamma+1)) / (1 - alpha)` tokens per sequence, so the speedup over plain decoding is
`Omega * T_T / (gamma * T_D + T_V)` (MagicDec, arXiv 2408.11049, section 3).

On CPU the engine runs eager and unfused, and `measure_hardware` adds what that costs (generic
microbenchmarks, no model shape): the linear layers run at the measured rate of a matmul with
B * n rows (`row_rate`: skinny matmuls are below both roofs; cached or streamed weight by the
step's working set), and attention is `eager_attention_time`: QK^T and PV at the rate of G * n
rows plus the passes over the fp32 scores that `kernels/reference.py` materialises, over the
bucketed key range the eager path uses (`decode_step_cost(kv_bucket=)`). Not counted there: the
page faults of score temporaries that glibc maps fresh (benchmarks/cost_model_validation_cpu.md).

Everything counts bytes and FLOPs *per tensor-parallel rank*: attention heads, KV heads and MLP
columns are sharded over `tp` ranks, and so is the output head, by vocabulary rows (tp.VocabShard);
norms are replicated. Under TP a step makes 2 all-reduces per layer (counted). Not counted:
activations and logits (small next to weights and KV at the shapes that matter), the one tiny
all-gather of each rank's (max, index) for the greedy argmax, and sampling's gather of the logits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from .config import ModelArgs
from .errors import UserError
from .memory import kv_bytes_per_token, kv_heads_per_rank
from .timing import time_op


# ---- hardware --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    mem_bandwidth: float  # bytes/s, device memory
    matmul_flops: float  # FLOP/s, bf16 dense
    step_overhead_s: float = 20e-6  # host launch + sync of one forward step (graph replay or eager)
    kernel_overhead_s: float = 0.0  # per kernel inside a replayed CUDA graph (launch gap)
    eager_op_overhead_s: float = 0.0  # per aten op run eagerly (Python + dispatch + launch)
    eager_module_overhead_s: float = 0.0  # per nn.Module call run eagerly (hooks, Python frames)
    graphs: bool = True  # the engine replays CUDA graphs on this device (False: eager, e.g. CPU)
    link_bandwidth: float = math.inf  # bytes/s one GPU sends in one direction (collectives)
    allreduce_latency_s: float = 0.0  # fixed cost of one all-reduce, any size
    allreduce_hop_latency_s: float = 0.0  # per step of a ring all-reduce (2 (W - 1) steps)
    # Measured on CPU (`measure_hardware`), empty in the presets. Skinny matmuls run below both roofs:
    # ((rows, FLOP/s), ...) of `rows` activation rows against a weight streamed from memory
    # (MATMUL_WEIGHT) and against one that stays in cache (MATMUL_CACHED_WEIGHT). The eager attention's
    # passes over its fp32 scores (mask, scale, softmax, nan_to_num): ((score bytes, seconds per element), ...).
    matmul_rate_by_rows: tuple = ()
    eager_score_cost: tuple = ()
    matmul_rate_cached: tuple = ()


# Sources. Memory bandwidth and dense bf16 FLOP/s: the vendor data sheets (A100 80GB SXM, H100 SXM5,
# H200 SXM, L40S, L40). Link bandwidth: NVLink3 on A100 is 600 GB/s total per GPU (both directions),
# NVLink4 on H100/H200 900 GB/s (A100 / H100 / H200 data sheets); L40S and L40 have no NVLink, PCIe Gen4
# x16 is 64 GB/s both directions (L40S / L40 data sheets). A ring all-reduce is limited by one direction: half.
# All-reduce latency: NVIDIA/nccl-tests issue #123 measured a ring all-reduce of 8-128 B on a DGX
# A100 at 10 us on 2 GPUs and 33.7 us on 8 (single channel): 5.8 us + 2.0 us per ring step, the
# A100 figures below. NVIDIA/nccl issue #1259 measured ~6 us on 2 H100s (NVLS, CUDA graphs) and
# says it grows with GPUs, without the 8-GPU figure: H100/H200 take 4 us + 1 us per step (6 us at 2
# GPUs; the per-step figure is an assumption). L40S / L40 over PCIe: no published figure found; 10 us +
# 5 us per step is an assumption. Kernel overheads are not vendor figures: ~1 us per kernel in a
# graph, ~10 us per eager PyTorch op and ~2 us per nn.Module call are the usual orders of
# magnitude. Measured copy bandwidth is typically ~80-90% of peak, so all these presets are
# optimistic: `get_profile("measure")` (run under torchrun for the all-reduce terms) replaces every
# number with what the machine really does.
_GRAPH_GPU = dict(kernel_overhead_s=1e-6, eager_op_overhead_s=10e-6, eager_module_overhead_s=2e-6)
_NVLINK3 = dict(link_bandwidth=300e9, allreduce_latency_s=5.8e-6, allreduce_hop_latency_s=2.0e-6)
_NVLINK4 = dict(link_bandwidth=450e9, allreduce_latency_s=4e-6, allreduce_hop_latency_s=1e-6)
_PCIE4 = dict(link_bandwidth=32e9, allreduce_latency_s=10e-6, allreduce_hop_latency_s=5e-6)
PROFILES: dict[str, HardwareProfile] = {
    p.name: p for p in (
        HardwareProfile("A100-80G", 2.039e12, 312e12, **_GRAPH_GPU, **_NVLINK3),
        HardwareProfile("H100-SXM", 3.35e12, 989e12, **_GRAPH_GPU, **_NVLINK4),
        HardwareProfile("H200", 4.8e12, 989e12, **_GRAPH_GPU, **_NVLINK4),
        HardwareProfile("L40S", 0.864e12, 362e12, **_GRAPH_GPU, **_PCIE4),
        HardwareProfile("L40", 0.864e12, 181e12, **_GRAPH_GPU, **_PCIE4),  # L40 data sheet: half the L40S's tensor rate
    )
}
_ALIASES = {"a100": "A100-80G", "h100": "H100-SXM"}

# Kernels of one forward step. Graph path (compiled, fused): per layer ~10 (norm, qkv, rope + cache
# write, attention, wo, add + norm, w1/w3, silu * mul, w2, add), per step ~4 (embedding, final norm,
# head, cast); the all-reduces are counted by the collective term. Eager path: aten ops, counted
# with a TorchDispatchMode over this engine's `forward_step` under inference mode, as the engine
# runs it (views included, composite ops such as linear counted once): 108 ops at 1 layer, 198 at 2,
# 288 at 3, the same at T = 1 and T = 4 (tiny and tiny-llama3): 90 per layer, 18 per step; and
# nn.Module calls: 10 per layer, 4 per step.
GRAPH_KERNELS = (10, 4)  # (per layer, per step)
EAGER_OPS = (90, 18)
EAGER_MODULES = (10, 4)


def _clock(device: torch.device) -> Callable[[], float]:
    """CPU with one thread: this process's CPU time, so that time spent preempted by the other jobs
    of a shared machine does not count (benchmarks/validate_cost_model.py times steps the same way);
    otherwise wall time."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _time_op(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Seconds per call of `fn` (timing.time_op: warm-up, then the median of `reps` calls), with this
    module's clock: CPU time on a single-threaded CPU, so a shared machine's preemption does not count."""
    return time_op(fn, device, reps, clock=_clock(device))


def _op_mix(device: torch.device) -> list[tuple[int, Callable[[], object]]]:
    """(count, op) on tiny tensors, in the proportions of one layer of this engine's eager step: the
    aten ops of `Transformer.forward` under inference mode, counted with a TorchDispatchMode (tiny
    preset, 2 layers: to 31, mul 20, unsqueeze 19, add 18, transpose 14, slice 12, linear 11,
    arange 9, view 8, reshape 6, pow / mean / rsqrt 5, neg / cat / index_put_ / matmul 4, 2 each of
    index, split, le, mul_, bitwise_not, masked_fill_, softmax, nan_to_num_, silu), halved."""
    x, w = torch.ones(1, 1, 64, device=device), torch.ones(64, 64, device=device)
    q, cache = torch.ones(1, 2, 2, 16, device=device), torch.zeros(1, 2, 32, 16, device=device)
    pos = batch = torch.zeros(1, 1, dtype=torch.long, device=device)
    mask, scratch = torch.ones(1, 1, 2, 32, dtype=torch.bool, device=device), torch.zeros(1, 2, 2, 32, device=device)
    return [(15, lambda: x.to(torch.float32)), (10, lambda: x * x), (1, lambda: scratch.mul_(1.0)),
            (9, lambda: x.unsqueeze(1)),
            (9, lambda: x + x), (7, lambda: q.transpose(1, 2)), (6, lambda: cache[:, :, :8]),
            (5, lambda: torch.nn.functional.linear(x, w)), (4, lambda: torch.arange(4, device=device)),
            (3, lambda: q.reshape(1, 4, 16)), (4, lambda: x.view(64)), (2, lambda: x.pow(2)),
            (2, lambda: x.mean(-1, keepdim=True)), (2, lambda: x.rsqrt()), (2, lambda: x.neg()),
            (2, lambda: torch.cat([x, x], dim=-1)),
            (2, lambda: cache.__setitem__((batch, slice(None), pos), q[:, :, :1].transpose(1, 2))),  # index_put_
            (2, lambda: torch.matmul(q, cache.transpose(-1, -2))), (1, lambda: cache[batch]),
            (1, lambda: x.split([32, 32], dim=-1)), (1, lambda: pos <= pos), (1, lambda: ~mask),
            (1, lambda: scratch.masked_fill_(mask, 0.0)), (1, lambda: torch.softmax(q, -1)),
            (1, lambda: scratch.nan_to_num_(0.0)), (1, lambda: torch.nn.functional.silu(x))]


def _eager_op_overhead(device: torch.device, reps: int) -> float:
    """Seconds per eager aten op on tiny tensors, over `_op_mix` (the model's op proportions under
    inference mode, as the engine runs them): what a step costs when its tensors are too small to matter."""
    mix = _op_mix(device)

    def run():
        for count, op in mix:
            for _ in range(count):
                op()
    with torch.inference_mode():
        return _time_op(run, device, reps) / sum(count for count, _ in mix)


# CPU generic shapes. The streamed weight is 64 MiB of fp32, twice this machine's 32 MiB L3 (lscpu), so
# each call reads it from memory as a large model's layers do; the rows span decode (1) to verify at
# batch 16; L2 is 1 MiB per core (lscpu: 2 MiB, 2 instances).
MATMUL_WEIGHT = (8192, 2048)  # (out, in) features
MATMUL_CACHED_WEIGHT = (256, 512)  # 512 KiB: stays within the 1 MiB L2 of a core between calls
MATMUL_ROWS = (1, 4, 16, 64)
SCORE_BYTES = (256 << 10, 2 << 20, 16 << 20)  # fp32 scores: within the 1 MiB L2 of a core, 2x it, half the L3
# aten ops of one `masked_softmax_` call: view, mul_, unsqueeze, bitwise_not, masked_fill_, softmax, nan_to_num_
SCORE_PASS_OPS = 7


def _matmul_rates(device: torch.device, reps: int, weight: tuple = MATMUL_WEIGHT) -> tuple:
    """((rows, FLOP/s), ...): x [rows, in] @ W^T for a generic weight [out, in] (2 FLOPs per weight
    element per row); the rate a skinny linear layer really runs at."""
    out_f, in_f = weight
    w = torch.full((out_f, in_f), 0.5, device=device)
    rates = []
    for rows in MATMUL_ROWS:
        x = torch.full((rows, in_f), 0.5, device=device)
        rates.append((rows, 2 * rows * in_f * out_f / _time_op(lambda: torch.nn.functional.linear(x, w), device, reps)))
    return tuple(rates)


def _score_pass_cost(device: torch.device, reps: int, op_s: float) -> tuple:
    """((score bytes, seconds per score element), ...): the passes `kernels/reference.py` makes over
    its fp32 scores (`masked_softmax_`: scale and mask in place, softmax, nan_to_num in place), run
    as it is on generic scores [1, 1, G * T, S] (G = T = 4) of each of SCORE_BYTES. Its
    SCORE_PASS_OPS ops' fixed cost (`op_s` each) is subtracted: `overhead_time` counts it. The
    probabilities are allocated afresh per call, as in the engine; scale is 1 so that the scores
    overwritten in place stay the same from call to call."""
    from .kernels.reference import masked_softmax_

    out = []
    for nbytes in SCORE_BYTES:
        rows, cols = 16, nbytes // 4 // 16
        scores = torch.randn(1, 1, rows, cols, device=device)
        mask = (torch.arange(cols, device=device) <= cols // 2).expand(1, 1, 4, cols)  # [B, 1, T, S]
        with torch.inference_mode():
            t = _time_op(lambda: masked_softmax_(scores, mask, 1.0), device, reps)
        out.append((nbytes, max(t - SCORE_PASS_OPS * op_s, 0.0) / (rows * cols)))
    return tuple(out)


def _module_call_overhead(device: torch.device, reps: int) -> float:
    """Seconds per eager nn.Module call beyond its ops (an Identity module: no op at all)."""
    module, x = torch.nn.Identity(), torch.ones(1, device=device)

    def calls():  # 10 calls
        for _ in range(10):
            module(x)
    return _time_op(calls, device, 20 * reps) / 10


def _graph_overheads(device: torch.device, reps: int, n: int = 100) -> tuple[float, float]:
    """(seconds per kernel inside a replayed CUDA graph, seconds of replay + host sync of a
    one-kernel graph): the graph path's launch gap and per-step cost."""
    x = torch.zeros(1, device=device)
    captured = []
    for count in (n, 1):
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(count):
                x.add_(1)
        captured.append(g)
    per_kernel = _time_op(captured[0].replay, device, reps) / n

    def step():
        captured[1].replay()
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return per_kernel, (time.perf_counter() - t0) / reps


def _allreduce_terms(device: torch.device, group, reps: int) -> dict:
    """Latency (a 1-element all-reduce) and link bandwidth from a large one, solving
    t_large - t_small = 2 (W - 1) / W * bytes / link_bandwidth. Every rank of `group` must call."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_large = (32 << 20) if device.type == "cuda" else (1 << 20)  # elements
    small, large = torch.ones(1, dtype=dtype, device=device), torch.ones(n_large, dtype=dtype, device=device)
    t_small = _time_op(lambda: dist.all_reduce(small, group=group), device, reps)
    t_large = _time_op(lambda: dist.all_reduce(large, group=group), device, reps)
    ring_bytes = 2 * (world - 1) / world * large.numel() * large.element_size()
    return dict(allreduce_latency_s=t_small, allreduce_hop_latency_s=0.0,
                link_bandwidth=ring_bytes / max(t_large - t_small, 1e-9))


def _default_tp_group():
    """The default process group when one of more than one rank is initialised (torchrun), else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def measure_hardware(device: Union[str, torch.device] = "cpu", reps: int = 10, tp_group=None) -> HardwareProfile:
    """Measure on `device`: copy bandwidth (bytes read + written per second), the matmul rate (bf16
    on GPU, fp32 on CPU), per-op eager overhead, per-kernel graph overhead and graph step cost (GPU),
    and with a `tp_group` of W > 1 ranks the all-reduce latency and link bandwidth (a collective:
    every rank must call). On CPU also the matmul rate at 1-64 rows (`_matmul_rates`) and the eager
    attention's cost per score element (`_score_pass_cost`), all on generic shapes; ~1 s."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    # CPU: 64 MiB, twice this machine's 32 MiB L3, so the copy streams from memory.
    n_bytes, mm, dtype = (1 << 30, 8192, torch.bfloat16) if on_gpu else (64 << 20, 512, torch.float32)
    extra: dict = {}
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():  # events on its stream
        src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        copy_s = _time_op(lambda: dst.copy_(src), device, reps)
        del src, dst
        a, b = (torch.randn(mm, mm, dtype=dtype, device=device) for _ in range(2))
        mm_s = _time_op(lambda: torch.mm(a, b), device, reps)
        extra["eager_op_overhead_s"] = _eager_op_overhead(device, reps)
        extra["eager_module_overhead_s"] = _module_call_overhead(device, reps)
        if not on_gpu:  # the CPU engine runs eager: skinny matmuls and unfused attention
            extra["matmul_rate_by_rows"] = _matmul_rates(device, 3)
            extra["matmul_rate_cached"] = _matmul_rates(device, 10, MATMUL_CACHED_WEIGHT)
            extra["eager_score_cost"] = _score_pass_cost(device, 10, extra["eager_op_overhead_s"])
        if on_gpu:
            extra["kernel_overhead_s"], extra["step_overhead_s"] = _graph_overheads(device, reps)
        if tp_group is not None:
            extra.update(_allreduce_terms(device, tp_group, reps))
    name = f"measured-{torch.cuda.get_device_name(device) if on_gpu else 'cpu'}"
    return HardwareProfile(name, mem_bandwidth=2 * n_bytes / copy_s, matmul_flops=2 * mm**3 / mm_s,
                           step_overhead_s=extra.pop("step_overhead_s", 0.0), graphs=on_gpu, **extra)


def get_profile(name: str, device: Union[str, torch.device, None] = None, tp_group=None) -> HardwareProfile:
    """A preset by name (case-insensitive; `a100`, `h100` also accepted) or `measure`.
    `measure` under an initialised process group of W > 1 ranks (torchrun) also measures the
    all-reduce on it (`tp_group`, default the whole world): then every rank must call this."""
    if name.lower() == "measure":
        return measure_hardware(device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                tp_group=tp_group if tp_group is not None else _default_tp_group())
    lookup = {k.lower(): v for k, v in PROFILES.items()}
    lookup.update({alias: PROFILES[target] for alias, target in _ALIASES.items()})
    if name.lower() not in lookup:
        raise UserError(f"unknown hardware profile {name!r}: choose one of {', '.join(PROFILES)} or 'measure'")
    return lookup[name.lower()]


# ---- bytes and FLOPs of one step ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepCost:
    bytes: float  # device memory read + written by one forward step, per rank
    flops: float  # matmul + attention FLOPs of that step, per rank
    attn_bytes: float = 0.0  # the KV cache part of `bytes` (read + written)
    attn_flops: float = 0.0  # the attention part of `flops` (QK^T and PV)
    allreduce_bytes: float = 0.0  # input of one all-reduce, per rank: B * n * dim * dtype_bytes
    n_allreduce: int = 0  # all-reduces per step: 2 per layer (after wo and w2) when tp > 1
    tp: int = 1  # ranks taking part in each all-reduce
    n_layers: int = 0  # for the kernel count of the overhead term
    rows: int = 0  # B * n: activation rows of every linear layer (sets the skinny-matmul rate)
    attn_rows: int = 0  # G * n: query rows per KV head of the QK^T and PV matmuls
    score_elems: float = 0.0  # B * H_q_local * n * keys: fp32 scores the eager path makes, per layer


def allreduce_time(nbytes: float, world: int, hw: HardwareProfile) -> float:
    """Ring all-reduce of `nbytes` per rank over `world` ranks (0 for one rank):
    latency + 2 (W - 1) * hop latency + 2 (W - 1) / W * nbytes / link_bandwidth."""
    if world <= 1:
        return 0.0
    steps = 2 * (world - 1)
    return hw.allreduce_latency_s + steps * hw.allreduce_hop_latency_s + steps / world * nbytes / hw.link_bandwidth


def _count(per_layer_and_step: tuple[int, int], n_layers: int) -> int:
    return n_layers * per_layer_and_step[0] + per_layer_and_step[1]


def overhead_time(cost: StepCost, hw: HardwareProfile, graphs: Optional[bool] = None) -> float:
    """step_overhead_s + launches: GRAPH_KERNELS * `kernel_overhead_s` when the step replays a CUDA
    graph (default `hw.graphs`), else EAGER_OPS * `eager_op_overhead_s` + EAGER_MODULES *
    `eager_module_overhead_s`."""
    if hw.graphs if graphs is None else graphs:
        return hw.step_overhead_s + _count(GRAPH_KERNELS, cost.n_layers) * hw.kernel_overhead_s
    return (hw.step_overhead_s + _count(EAGER_OPS, cost.n_layers) * hw.eager_op_overhead_s
            + _count(EAGER_MODULES, cost.n_layers) * hw.eager_module_overhead_s)


def _interpolate(points: tuple, x: float) -> float:
    """y at x, linear in log(x) between the measured (x, y) points (sorted by x), flat beyond them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return y0 + f * (y1 - y0)
    return points[-1][1]


def _fp32_bytes(shape: tuple) -> int:
    return 4 * shape[0] * shape[1]  # fp32, as measured


def row_rate(hw: HardwareProfile, rows: int, operand_bytes: Optional[float] = None) -> float:
    """FLOP/s of a matmul of `rows` activation rows against `operand_bytes` of weight (or K / V):
    `matmul_rate_by_rows` (streamed) interpolated in log(rows); with `matmul_rate_cached` and
    `operand_bytes`, interpolated in log(bytes) between the cached weight's rate at
    MATMUL_CACHED_WEIGHT bytes and the streamed one at MATMUL_WEIGHT bytes. No rates: `matmul_flops`."""
    if not hw.matmul_rate_by_rows or rows <= 0:
        return hw.matmul_flops
    streamed = _interpolate(hw.matmul_rate_by_rows, rows)
    if not hw.matmul_rate_cached or operand_bytes is None:
        return streamed
    cached = _interpolate(hw.matmul_rate_cached, rows)
    points = ((_fp32_bytes(MATMUL_CACHED_WEIGHT), cached), (_fp32_bytes(MATMUL_WEIGHT), streamed))
    return _interpolate(points, max(operand_bytes, 1.0))


def matmul_time(flops: float, rows: int, nbytes: float, hw: HardwareProfile,
                operand_bytes: Optional[float] = None) -> float:
    """A matmul of `rows` activation rows: flops / (measured rate at that many rows and, if given, that
    many `operand_bytes` per call, `row_rate`) when the profile has rates (CPU: they include reading
    the weight), else the roofline max(nbytes / bandwidth, flops / matmul rate)."""
    if hw.matmul_rate_by_rows and rows > 0:
        return flops / row_rate(hw, rows, operand_bytes)
    return max(nbytes / hw.mem_bandwidth, flops / hw.matmul_flops)


def eager_attention_time(cost: StepCost, hw: HardwareProfile) -> float:
    """The unfused attention of `kernels/reference.py` (eager steps), per layer over fp32 scores
    [B, H_kv, G * n, keys] (score_elems, 4 * score_elems bytes):

        attn_flops / row_rate(G * n rows, cost.bytes)                   [QK^T and PV]
      + n_layers * score_elems * eager_score_cost(4 * score_elems)      [mask, scale, softmax, ...]"""
    passes = cost.n_layers * cost.score_elems * _interpolate(hw.eager_score_cost, 4 * cost.score_elems)
    return matmul_time(cost.attn_flops, cost.attn_rows, cost.attn_bytes, hw, cost.bytes) + passes


def roofline_time(cost: StepCost, hw: HardwareProfile, graphs: Optional[bool] = None) -> float:
    """Seconds of one step: max(bytes / bandwidth, flops / matmul rate) for the linear layers and for
    attention separately, summed, + the all-reduces + the launch overheads (`overhead_time`).
    A profile measured on CPU replaces the linear roofline by the rate at `cost.rows` rows
    (`matmul_time`) and, for eager steps, attention by `eager_attention_time`."""
    eager = not (hw.graphs if graphs is None else graphs)
    # A step reads every weight and its KV once, so what is still in cache at the next step is set by
    # the step's whole working set (`cost.bytes`): that picks the cached or the streamed matmul rate.
    linear = matmul_time(cost.flops - cost.attn_flops, cost.rows, cost.bytes - cost.attn_bytes, hw, cost.bytes)
    if eager and hw.eager_score_cost:
        attention = eager_attention_time(cost, hw)
    else:
        attention = max(cost.attn_bytes / hw.mem_bandwidth, cost.attn_flops / hw.matmul_flops)
    comm = cost.n_allreduce * allreduce_time(cost.allreduce_bytes, cost.tp, hw)
    return linear + attention + comm + overhead_time(cost, hw, graphs)


def _per_rank(n: int, tp: int) -> int:
    return -(-n // tp)  # ceil: the largest share (vocabulary rows differ by one when tp does not divide)


def layer_params(args: ModelArgs, tp: int = 1) -> tuple[int, int]:
    """(sharded, replicated) parameters of one transformer block on one rank.

    sharded = dim * (H_q + 2 H_kv) * D  [wq, wk, wv]  + (H_q + 2 H_kv) * D if qkv_bias
            + H_q * D * dim             [wo]          + 3 * dim * intermediate [w1, w2, w3]
            + 2 * intermediate if mlp_bias [w1, w3 biases]
    replicated = 2 * dim                [attention_norm, ffn_norm]
               + dim if out_bias, + dim if mlp_bias [wo, w2 biases: added after the all-reduce]
               + 2 * D if qk_norm       [q_norm, k_norm]"""
    hq, hkv, d = _per_rank(args.n_heads, tp), kv_heads_per_rank(args, tp), args.head_dim
    qkv = (hq + 2 * hkv) * d
    ffn = _per_rank(args.intermediate_size, tp)
    sharded = args.dim * qkv + (qkv if args.qkv_bias else 0) + hq * d * args.dim
    sharded += 3 * args.dim * ffn + (2 * ffn if args.mlp_bias else 0)
    replicated = (2 + args.out_bias + args.mlp_bias) * args.dim + (2 * d if args.qk_norm else 0)
    return sharded, replicated


def param_count(args: ModelArgs) -> int:
    """All parameters stored: layers + final norm + embedding + output head (if untied)."""
    sharded, replicated = layer_params(args)
    embedding = args.vocab_size * args.dim
    head = 0 if args.tie_word_embeddings else embedding
    return args.n_layers * (sharded + replicated) + args.dim + embedding + head


def params_touched(args: ModelArgs, tp: int = 1) -> int:
    """Parameters one decode step reads on one rank: every layer, the final norm and this rank's
    rows of the output head (vocabulary-parallel under TP). Not the embedding table: decode gathers
    one embedding row per token (counted in `decode_step_cost`). With tied embeddings the head *is*
    the table, read once as the head."""
    sharded, replicated = layer_params(args, tp)
    return args.n_layers * (sharded + replicated) + args.dim + _per_rank(args.vocab_size, tp) * args.dim


def weight_bytes(args: ModelArgs, dtype_bytes: int = 2, tp: int = 1) -> int:
    """Bytes of weights a decode step reads per rank (norms are tiny but counted)."""
    return params_touched(args, tp) * dtype_bytes


def eager_keys(context: int, n_tokens: int, bucket: int) -> int:
    """Keys the eager path attends over: context + n rounded up to `bucket` (`bucketed_kv_limit` in
    steps.py, which also caps it at the cache length)."""
    return -(-(context + n_tokens) // bucket) * bucket


def windowed_keys(args: ModelArgs, kv_tokens: float) -> float:
    """Keys per layer, averaged over the layers, that a step reads where it would read `kv_tokens`:
    a sliding-window layer reads at most its window (Mistral-7B-v0.1: min(kv_tokens, 4096) on
    every layer), so a windowed target's KV read stops growing with the context."""
    windows = args.layer_windows
    return sum(kv_tokens if w is None else min(kv_tokens, w) for w in windows) / len(windows)


def decode_step_cost(args: ModelArgs, batch: int, context: int, n_tokens: int, dtype_bytes: int = 2,
                     tp: int = 1, kv_tokens: Optional[int] = None, kv_bucket: Optional[int] = None) -> StepCost:
    """One forward of `n_tokens` new tokens per sequence, attending to `kv_tokens` cached keys
    (default `context`: the full view; a draft's budget for the sparse view), each sliding-window
    layer at most its window (`windowed_keys`). `kv_bucket` (eager steps): attention reads
    `eager_keys(context, n_tokens, kv_bucket)` keys instead, the range the engine's eager full view
    trims the cache to, masked keys included (a sliding layer's band is a mask there too).

    bytes = weight_bytes + B * n * dim * dtype_bytes                       [embedding rows]
          + B * kv_tokens * kv_bytes_per_token + B * n * kv_bytes_per_token [KV read + written]
    flops = 2 * params_touched * B * n + 4 * B * n * kv_tokens * H_q_local * D * n_layers
    all-reduces (tp > 1): 2 * n_layers per step, each of B * n * dim * dtype_bytes"""
    kv_tokens = context if kv_tokens is None else kv_tokens
    if kv_bucket is not None:
        kv_tokens = eager_keys(context, n_tokens, kv_bucket)
    else:
        kv_tokens = windowed_keys(args, kv_tokens)
    kv_tok = kv_bytes_per_token(args, dtype_bytes, tp)
    kv = batch * kv_tokens * kv_tok + batch * n_tokens * kv_tok
    nbytes = weight_bytes(args, dtype_bytes, tp) + batch * n_tokens * args.dim * dtype_bytes + kv
    # QK^T and PV: 2 FLOPs per multiply-add, each over kv_tokens x head_dim per query head; per KV
    # head that is G * n query rows, so attention turns compute bound at large G * n.
    heads = _per_rank(args.n_heads, tp)
    attn = 4 * batch * n_tokens * kv_tokens * heads * args.head_dim * args.n_layers
    return StepCost(bytes=float(nbytes), flops=float(2 * params_touched(args, tp) * batch * n_tokens + attn),
                    attn_bytes=float(kv), attn_flops=float(attn),
                    allreduce_bytes=float(batch * n_tokens * args.dim * dtype_bytes),
                    n_allreduce=2 * args.n_layers if tp > 1 else 0, tp=tp, n_layers=args.n_layers,
                    rows=batch * n_tokens, attn_rows=heads // kv_heads_per_rank(args, tp) * n_tokens,
                    score_elems=float(batch * heads * n_tokens * kv_tokens))


# ---- speculation -----------------------------------------------------------------------------------
# A re-selection (a dynamic draft view, policies/pillar.py) on top of its scoring verification:
# fp32 bytes per cache position and KV head of each layer: the mass written, read by the pooling,
# the pooled values written, then read by the mask and by the top-k.
RESELECT_SCORE_PASSES = 5
RESELECT_OPS = 12  # eager launches of the pooling, masking, top-k, sort and copy (outside any graph)


def reselect_cost(args: ModelArgs, batch: int, context: int, gamma: int, dtype_bytes: int = 2,
                  tp: int = 1) -> StepCost:
    """What one re-selection adds to its round, priced as the Triton path: the verify kernel's mass
    pass re-reads every key the verification read (K, not V: half its KV read) and recomputes the
    gamma + 1 queries' q.k, writes the fp32 mass of every cache position per KV head and layer, and
    the policy pools it and takes the top-k (RESELECT_SCORE_PASSES fp32 passes over the buffer).

    bytes = B * keys * kv_bytes_per_token / 2 + B * context * H_kv_local * n_layers * 4 * passes
    flops = 2 * B * (gamma + 1) * keys * H_q_local * D * n_layers"""
    keys = windowed_keys(args, context)
    k_bytes = batch * keys * kv_bytes_per_token(args, dtype_bytes, tp) / 2
    score_bytes = batch * context * kv_heads_per_rank(args, tp) * args.n_layers * 4 * RESELECT_SCORE_PASSES
    heads = _per_rank(args.n_heads, tp)
    flops = 2 * batch * (gamma + 1) * keys * heads * args.head_dim * args.n_layers
    return StepCost(bytes=float(k_bytes + score_bytes), flops=float(flops), attn_bytes=float(k_bytes + score_bytes),
                    attn_flops=float(flops), tp=tp, n_layers=args.n_layers,
                    attn_rows=heads // kv_heads_per_rank(args, tp) * (gamma + 1))


def reselect_time(cost: StepCost, hw: HardwareProfile) -> float:
    """Seconds of one re-selection: its bytes or FLOPs at the roofline, plus its eager launches."""
    return max(cost.bytes / hw.mem_bandwidth, cost.flops / hw.matmul_flops) + RESELECT_OPS * hw.eager_op_overhead_s


@dataclasses.dataclass(frozen=True)
class PredictedTimes:
    T_T: float  # target decoding 1 token (full view), seconds
    T_V: float  # target verifying gamma + 1 tokens (full view)
    T_D: float  # one draft step (1 token, sparse view or standalone draft)
    target: StepCost
    verify: StepCost
    draft: StepCost
    T_R: float = 0.0  # one re-selection of a dynamic draft view (0: the selection is fixed)
    reselect_every: Optional[int] = None  # rounds per re-selection (None: never)

    @property
    def T_R_per_round(self) -> float:
        """The re-selection's cost spread over the rounds it serves."""
        return self.T_R / self.reselect_every if self.reselect_every else 0.0

    @property
    def verify_ratio(self) -> float:  # T_V / T_T: ~1 when verification is memory bound
        return self.T_V / self.T_T

    @property
    def draft_ratio(self) -> float:  # T_D / T_T: small when the draft's KV read is bounded
        return self.T_D / self.T_T


def predict_times(args: ModelArgs, hw: HardwareProfile, batch: int, context: int, gamma: int, budget: int,
                  dtype_bytes: int = 2, tp: int = 1, draft_args: Optional[ModelArgs] = None,
                  draft_budget: Optional[int] = None, graphs: Optional[bool] = None,
                  kv_bucket: Optional[int] = None, reselect_every: Optional[int] = None) -> PredictedTimes:
    """Roofline times of the three steps of a round. Self-speculation (`draft_args=None`): the
    target's weights reading `min(budget, context)` keys. Standalone draft: `draft_args` weights
    reading `draft_budget` keys (None: `budget`; -1: the full context), on the same `tp` ranks.
    `graphs`: whether steps replay CUDA graphs (None: `hw.graphs`), for the overhead term.
    `kv_bucket`: full-view steps attend over the bucketed key range (eager CPU steps, `eager_keys`).
    `reselect_every`: a dynamic view re-selects every that many rounds (`reselect_cost`)."""
    target = decode_step_cost(args, batch, context, 1, dtype_bytes, tp, kv_bucket=kv_bucket)
    verify = decode_step_cost(args, batch, context, gamma + 1, dtype_bytes, tp, kv_bucket=kv_bucket)
    if draft_args is None:
        draft_args, draft_budget = args, budget
    elif draft_budget is None:
        draft_budget = budget
    draft_kv = context if draft_budget == -1 else min(draft_budget, context)
    draft = decode_step_cost(draft_args, batch, context, 1, dtype_bytes, tp, kv_tokens=draft_kv,
                             kv_bucket=kv_bucket if draft_budget == -1 else None)
    T_R = 0.0
    if reselect_every:
        T_R = reselect_time(reselect_cost(args, batch, context, gamma, dtype_bytes, tp), hw)
    return PredictedTimes(roofline_time(target, hw, graphs), roofline_time(verify, hw, graphs),
                          roofline_time(draft, hw, graphs), target, verify, draft, T_R, reselect_every)


def expected_tokens(gamma: int, alpha: float) -> float:
    """Omega(gamma, alpha) = (1 - alpha^(gamma+1)) / (1 - alpha): tokens emitted per round, with
    i.i.d. per-token acceptance `alpha` (gamma + 1 when alpha == 1; 1 when gamma == 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def _speedup(T_T: float, T_V: float, T_D: float, gamma: int, alpha: float, T_R: float = 0.0) -> float:
    return expected_tokens(gamma, alpha) * T_T / (gamma * T_D + T_V + T_R)


def predicted_speedup(times: PredictedTimes, gamma: int, alpha: float) -> float:
    """Omega(gamma, alpha) * T_T / (gamma * T_D + T_V + T_R / reselect_every); `times` must be
    predicted for this gamma."""
    return _speedup(times.T_T, times.T_V, times.T_D, gamma, alpha, times.T_R_per_round)


def best_gamma_from_times(T_T: float, T_V: Mapping[int, float], T_D: float, alpha: float,
                          margin: float = 1.0, T_R: Optional[Mapping[int, float]] = None) -> tuple[int, float]:
    """The gamma with the highest speedup from step times; `T_V` maps each gamma to try to the time
    of verifying gamma + 1 tokens, `T_R` (optional) to a re-selection's cost per round at that gamma.
    (0, 1.0), plain decoding, unless some gamma beats `margin`."""
    best_g, best_s = 0, -math.inf
    for g in sorted(T_V):
        s = _speedup(T_T, T_V[g], T_D, g, alpha, T_R[g] if T_R else 0.0)
        if s > best_s:
            best_g, best_s = g, s
    return (best_g, best_s) if best_s > margin else (0, 1.0)


def best_gamma(args: ModelArgs, hw: HardwareProfile, batch: int, context: int, alpha: float, budget: int,
               gammas: Iterable[int] = range(1, 9), margin: float = 1.0, dtype_bytes: int = 2, tp: int = 1,
               draft_args: Optional[ModelArgs] = None, draft_budget: Optional[int] = None,
               graphs: Optional[bool] = None,
               reselect_every: Optional[Callable[[int], Optional[int]]] = None) -> tuple[int, float]:
    """`best_gamma_from_times` over predicted times (`predict_times`, collectives included when
    tp > 1): (gamma, speedup), or (0, 1.0). `reselect_every(gamma)`: a dynamic view's rounds per
    re-selection at that gamma (DraftConfig.reselect_every_at), so its cost is priced per gamma."""
    gammas = list(gammas)
    times = {g: predict_times(args, hw, batch, context, g, budget, dtype_bytes, tp, draft_args, draft_budget,
                              graphs, reselect_every=reselect_every(g) if reselect_every else None) for g in gammas}
    if not times:
        return 0, 1.0
    any_t = next(iter(times.values()))  # T_T and T_D do not depend on gamma
    return best_gamma_from_times(any_t.T_T, {g: t.T_V for g, t in times.items()}, any_t.T_D, alpha, margin,
                                 {g: t.T_R_per_round for g, t in times.items()})


def alpha_from_tokens_per_round(gamma: int, tokens_per_round: float) -> float:
    """The per-token acceptance alpha with Omega(gamma, alpha) = measured tokens per round.

    This, not accepted / drafted, is the alpha of the cost model: accepted / drafted counts the
    drafts after the first rejection as rejected too (0.72 for alpha 0.8 at gamma 2)."""
    if tokens_per_round >= gamma + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):  # Omega is increasing in alpha: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(gamma, mid) < tokens_per_round else (lo, mid)
    return (lo + hi) / 2
