"""Roofline cost model for decoding and MagicDec speculation (DESIGN.md, decision 11).

A forward step over `n_tokens` new tokens for each of `batch` sequences costs

    time = max(bytes / mem_bandwidth, flops / matmul_flops) + step_overhead_s

where `bytes` is what the step must read or write in device memory (weights, KV cache) and `flops`
its matmul work. One speculation round with `gamma` draft steps then yields, for acceptance rate
`alpha`, `Omega = (1 - alpha^(gamma+1)) / (1 - alpha)` tokens per sequence, so the speedup over
plain decoding is `Omega * T_T / (gamma * T_D + T_V)` (MagicDec, arXiv 2408.11049, section 3).

Everything counts bytes and FLOPs *per tensor-parallel rank*: attention heads, KV heads and MLP
columns are sharded over `tp` ranks; norms and the output head are replicated (decision 9).
Not counted: activations and logits (small next to weights and KV at the shapes that matter).
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


# ---- hardware --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    mem_bandwidth: float  # bytes/s
    matmul_flops: float  # FLOP/s, bf16 dense
    step_overhead_s: float = 20e-6  # launch + sync cost of one graphed forward step


# Vendor peak numbers. Measured copy bandwidth is typically ~80-90% of peak, so times predicted
# from these presets are optimistic; `get_profile("measure")` uses what the device really does.
PROFILES: dict[str, HardwareProfile] = {
    p.name: p for p in (
        HardwareProfile("A100-80G", 2.039e12, 312e12),
        HardwareProfile("H100-SXM", 3.35e12, 989e12),
        HardwareProfile("H200", 4.8e12, 989e12),
        HardwareProfile("L40S", 0.864e12, 362e12),
    )
}
_ALIASES = {"a100": "A100-80G", "h100": "H100-SXM", "l40": "L40S"}


def _time_op(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Seconds per call of `fn`, after one warm-up call (CUDA events on GPU, perf_counter on CPU)."""
    fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure_hardware(device: Union[str, torch.device] = "cpu", reps: int = 10) -> HardwareProfile:
    """Measure copy bandwidth (bytes read + written per second) and the matmul rate on `device`
    (bf16 on GPU, fp32 on CPU). CPU sizes are small so this takes well under a second."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    n_bytes, mm, dtype = (1 << 30, 8192, torch.bfloat16) if on_gpu else (16 << 20, 512, torch.float32)
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():  # events on its stream
        src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        copy_s = _time_op(lambda: dst.copy_(src), device, reps)
        del src, dst
        a, b = (torch.randn(mm, mm, dtype=dtype, device=device) for _ in range(2))
        mm_s = _time_op(lambda: torch.mm(a, b), device, reps)
    name = f"measured-{torch.cuda.get_device_name(device) if on_gpu else 'cpu'}"
    return HardwareProfile(name, mem_bandwidth=2 * n_bytes / copy_s, matmul_flops=2 * mm**3 / mm_s,
                           step_overhead_s=20e-6 if on_gpu else 0.0)


def get_profile(name: str, device: Union[str, torch.device, None] = None) -> HardwareProfile:
    """A preset by name (case-insensitive; `a100`, `h100`, `l40` also accepted) or `measure`."""
    if name.lower() == "measure":
        return measure_hardware(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


def roofline_time(cost: StepCost, hw: HardwareProfile) -> float:
    """max(bytes / bandwidth, flops / matmul rate) + per-step overhead, in seconds."""
    return max(cost.bytes / hw.mem_bandwidth, cost.flops / hw.matmul_flops) + hw.step_overhead_s


def achieved_bandwidth(cost: StepCost, measured_s: float) -> float:
    """Bytes/s a measured step actually moved: compare with `hw.mem_bandwidth` (bench.py)."""
    return cost.bytes / measured_s


def _per_rank(n: int, tp: int) -> int:
    return -(-n // tp)  # ceil: with tp > n_kv_heads each rank keeps a (replicated) KV head


def layer_params(args: ModelArgs, tp: int = 1) -> tuple[int, int]:
    """(sharded, replicated) parameters of one transformer block on one rank.

    sharded = dim * (H_q + 2 H_kv) * D  [wq, wk, wv]  + (H_q + 2 H_kv) * D if qkv_bias
            + H_q * D * dim             [wo]          + 3 * dim * intermediate [w1, w2, w3]
    replicated = 2 * dim                [attention_norm, ffn_norm]"""
    hq, hkv, d = _per_rank(args.n_heads, tp), _per_rank(args.n_kv_heads, tp), args.head_dim
    qkv = (hq + 2 * hkv) * d
    sharded = args.dim * qkv + (qkv if args.qkv_bias else 0) + hq * d * args.dim
    sharded += 3 * args.dim * _per_rank(args.intermediate_size, tp)
    return sharded, 2 * args.dim


def param_count(args: ModelArgs) -> int:
    """All parameters stored: layers + final norm + embedding + output head (if untied)."""
    sharded, replicated = layer_params(args)
    embedding = args.vocab_size * args.dim
    head = 0 if args.tie_word_embeddings else embedding
    return args.n_layers * (sharded + replicated) + args.dim + embedding + head


def params_touched(args: ModelArgs, tp: int = 1) -> int:
    """Parameters one decode step reads on one rank: every layer, the final norm and the output
    head. Not the embedding table: decode gathers one embedding row per token (counted in
    `decode_step_cost`). With tied embeddings the head *is* the table, read once as the head."""
    sharded, replicated = layer_params(args, tp)
    return args.n_layers * (sharded + replicated) + args.dim + args.vocab_size * args.dim


def weight_bytes(args: ModelArgs, dtype_bytes: int = 2, tp: int = 1) -> int:
    """Bytes of weights a decode step reads per rank (norms are tiny but counted)."""
    return params_touched(args, tp) * dtype_bytes


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2, tp: int = 1) -> int:
    """K and V of one token, all layers, one rank: 2 * n_layers * H_kv_local * D * dtype_bytes."""
    return 2 * args.n_layers * _per_rank(args.n_kv_heads, tp) * args.head_dim * dtype_bytes


def decode_step_cost(args: ModelArgs, batch: int, context: int, n_tokens: int, dtype_bytes: int = 2,
                     tp: int = 1, kv_tokens: Optional[int] = None) -> StepCost:
    """One forward of `n_tokens` new tokens per sequence, attending to `kv_tokens` cached keys
    (default `context`: the full view; a draft's budget for the sparse view).

    bytes = weight_bytes + B * n * dim * dtype_bytes                       [embedding rows]
          + B * kv_tokens * kv_bytes_per_token + B * n * kv_bytes_per_token [KV read + written]
    flops = 2 * params_touched * B * n + 4 * B * n * kv_tokens * H_q_local * D * n_layers"""
    kv_tokens = context if kv_tokens is None else kv_tokens
    kv_tok = kv_bytes_per_token(args, dtype_bytes, tp)
    nbytes = (weight_bytes(args, dtype_bytes, tp) + batch * n_tokens * args.dim * dtype_bytes
              + batch * kv_tokens * kv_tok + batch * n_tokens * kv_tok)
    # QK^T and PV: 2 FLOPs per multiply-add, each over kv_tokens x head_dim per query head.
    attn = 4 * batch * n_tokens * kv_tokens * _per_rank(args.n_heads, tp) * args.head_dim * args.n_layers
    return StepCost(bytes=float(nbytes), flops=float(2 * params_touched(args, tp) * batch * n_tokens + attn))


# ---- speculation -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PredictedTimes:
    T_T: float  # target decoding 1 token (full view), seconds
    T_V: float  # target verifying gamma + 1 tokens (full view)
    T_D: float  # one draft step (1 token, sparse view or standalone draft)
    target: StepCost
    verify: StepCost
    draft: StepCost

    @property
    def verify_ratio(self) -> float:  # T_V / T_T: ~1 when verification is memory bound
        return self.T_V / self.T_T

    @property
    def draft_ratio(self) -> float:  # T_D / T_T: small when the draft's KV read is bounded
        return self.T_D / self.T_T


def predict_times(args: ModelArgs, hw: HardwareProfile, batch: int, context: int, gamma: int, budget: int,
                  dtype_bytes: int = 2, tp: int = 1, draft_args: Optional[ModelArgs] = None,
                  draft_budget: Optional[int] = None) -> PredictedTimes:
    """Roofline times of the three steps of a round. Self-speculation (`draft_args=None`): the
    target's weights reading `min(budget, context)` keys. Standalone draft: `draft_args` weights
    reading `draft_budget` keys (None: `budget`; -1: the full context)."""
    target = decode_step_cost(args, batch, context, 1, dtype_bytes, tp)
    verify = decode_step_cost(args, batch, context, gamma + 1, dtype_bytes, tp)
    if draft_args is None:
        draft_args, draft_budget = args, budget
    elif draft_budget is None:
        draft_budget = budget
    draft_kv = context if draft_budget == -1 else min(draft_budget, context)
    draft = decode_step_cost(draft_args, batch, context, 1, dtype_bytes, tp, kv_tokens=draft_kv)
    return PredictedTimes(roofline_time(target, hw), roofline_time(verify, hw), roofline_time(draft, hw),
                          target, verify, draft)


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


def _speedup(T_T: float, T_V: float, T_D: float, gamma: int, alpha: float) -> float:
    return expected_tokens(gamma, alpha) * T_T / (gamma * T_D + T_V)


def predicted_speedup(times: PredictedTimes, gamma: int, alpha: float) -> float:
    """Omega(gamma, alpha) * T_T / (gamma * T_D + T_V); `times` must be predicted for this gamma."""
    return _speedup(times.T_T, times.T_V, times.T_D, gamma, alpha)


def best_gamma_from_times(T_T: float, T_V: Union[Callable[[int], float], Mapping[int, float]], T_D: float,
                          alpha: float, gammas: Optional[Iterable[int]] = None,
                          margin: float = 1.0) -> tuple[int, float]:
    """The gamma with the highest speedup from (measured) step times; `T_V` maps gamma to the
    time of verifying gamma + 1 tokens (default gammas: the dict's keys, else 1..8).
    Returns (0, 1.0), plain decoding, unless some gamma predicts a speedup > `margin`."""
    if gammas is None:
        gammas = sorted(T_V) if isinstance(T_V, Mapping) else range(1, 9)
    t_v = T_V.__getitem__ if isinstance(T_V, Mapping) else T_V
    best_g, best_s = 0, -math.inf
    for g in gammas:
        s = _speedup(T_T, t_v(g), T_D, g, alpha)
        if s > best_s:
            best_g, best_s = g, s
    return (best_g, best_s) if best_s > margin else (0, 1.0)


def best_gamma(args: ModelArgs, hw: HardwareProfile, batch: int, context: int, alpha: float, budget: int,
               gammas: Iterable[int] = range(1, 9), margin: float = 1.0, dtype_bytes: int = 2, tp: int = 1,
               draft_args: Optional[ModelArgs] = None, draft_budget: Optional[int] = None) -> tuple[int, float]:
    """`best_gamma_from_times` over roofline-predicted times: (gamma, speedup), or (0, 1.0)."""
    gammas = list(gammas)
    times = {g: predict_times(args, hw, batch, context, g, budget, dtype_bytes, tp, draft_args, draft_budget)
             for g in gammas}
    if not times:
        return 0, 1.0
    any_t = next(iter(times.values()))  # T_T and T_D do not depend on gamma
    return best_gamma_from_times(any_t.T_T, {g: t.T_V for g, t in times.items()}, any_t.T_D, alpha,
                                 gammas, margin)


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
