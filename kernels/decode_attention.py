"""Triton decode attention: T = 1..16 new tokens per sequence over the static KV cache.

Same signature and answer as `decode_attention_reference` (read its module doc for the full and
sparse views). Layout of the work:

* one program per (b, h_kv, split): its query tile holds all G = H // H_kv query heads of that KV
  head times all T new tokens (row m = g * T + t, padded to >= 16 rows for tl.dot), so every K/V
  byte is loaded once per (b, h_kv);
* the keys a sequence needs form one "virtual" list: first the n_sel selected slots (sparse view
  only), then the contiguous window win_lo .. cache_len + T - 1. The full view is the same list
  with n_sel = 0 and an infinite window (win_lo = 0). Nothing past cache_len + T is ever loaded,
  nor a selected slot no token may use (-1 padding, inside the window);
* a sliding-window layer (`sliding_window`) is the same list with the window clipped to the
  layer's (the full view: exactly the layer's window, so only its keys are read) and one more
  bound on the selected slots, s > p - layer_window;
* precondition: sel_pos holds distinct positions per (b, h_kv) apart from -1 (top-k output does);
  like the reference, the kernel counts every slot;
* flash-decoding split-K: the virtual list is cut into num_splits chunks, each program writes an
  fp32 partial (row max, row sum of exp, un-normalised output) and `_combine_kernel` merges them
  with the log-sum-exp rule. With num_splits == 1 the first kernel writes the final output.

* any head_dim in 16..256: the d axis of the tile is padded to the next power of two (BLOCK_D)
  with masked loads and stores, so Phi-3's 96 costs a 128-wide tile and nothing else;
* `launch_plan` maps one call to its grid, constexprs, num_warps and num_stages (`choose_tile`) and
  split count (`choose_num_splits` from occupancy). The launch, the kernel benchmark
  (gpt_fast_magicdec/benchmarking/kernels.py) and the
  ahead-of-time compile test (tests/test_kernel_compile.py) all go through it.

* `mass_out` (full view): the attention mass of every cache position, for a re-selecting draft, by
  `attention_mass._mass_kernel` after the split kernel, from its partials' log-sum-exp (the
  split path is then always taken, so the partials exist).

All softmax arithmetic is in fp32 and in base 2 (scores pre-multiplied by log2(e)).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import KERNEL_MAX_ROWS, kernel_supports
from .attention_mass import _mass_kernel, lse_from_partials, mass_launch

_LOG2E = 1.4426950408889634


# One function of ~85 lines on purpose: a Triton kernel is one program; splitting it into
# @triton.jit helpers would only scatter the loop whose every line reads the same tile.
@triton.jit
def _split_kernel(Q, K, V, SK, SV, CacheLen, SelPos, Out, PartO, PartM, PartL,
                  sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                  sskb, sskh, ssks, sskd, ssvb, ssvh, ssvs, ssvd, spb, sph, spk,
                  sob, soh, sot, sod,
                  qk_scale, window, n_sel, T, G, num_splits, layer_window,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_D: tl.constexpr, COMPACT: tl.constexpr, SPLIT_OUT: tl.constexpr, PRECISION: tl.constexpr,
                  DOT_FP32: tl.constexpr, SEL_LAYER_BOUND: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # int64 so b * stride cannot overflow on big caches
    h_kv = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] query-tile rows
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N] keys of one block
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D] head_dim padded to a power of two
    d_ok = offs_d < HEAD_D  # padding lanes load zeros (add nothing to q.k) and are never stored
    g = offs_m // T  # query head inside the group
    t = offs_m % T  # new-token index
    row_ok = offs_m < G * T  # padding rows load zeros and are never stored
    head = h_kv * G + g  # [BLOCK_M] query head, h = h_kv * G + g

    cache_len = tl.load(CacheLen + b).to(tl.int32)
    pos_q = cache_len + t  # [BLOCK_M] position of each query token
    n_live = cache_len + T  # keys 0 .. n_live - 1 hold data; nothing at or past n_live is read
    win_lo = tl.maximum(cache_len - window + 1, 0)  # first key inside the window of token t = 0
    n_total = n_sel + n_live - win_lo  # length of the virtual key list [selected ; window]
    chunk = tl.cdiv(tl.cdiv(n_total, num_splits), BLOCK_N) * BLOCK_N  # keys per split, whole blocks
    start = split * chunk
    end = tl.minimum(start + chunk, n_total)

    q_ptrs = Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:  # interpreter only: its tl.dot multiplies bf16 bit patterns (triton#11584)
        q = q.to(tl.float32)
    k_base = K + b * skb + h_kv * skh  # this (b, h_kv) slice of the cache
    v_base = V + b * svb + h_kv * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running un-normalised output
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + offs_n  # [BLOCK_N] index into the virtual key list
        in_range = idx < end
        is_sel = idx < n_sel  # selected slot (sparse view) vs window key
        sel = tl.load(SelPos + b * spb + h_kv * sph + idx * spk, mask=in_range & is_sel, other=-1)
        kpos = tl.where(is_sel, sel.to(tl.int32), win_lo + idx - n_sel)  # [BLOCK_N] cache position
        # Visibility [BLOCK_M, BLOCK_N]: selected keys only before the window (and, on a sliding
        # layer, inside the layer's own window), window keys causal. The layer bound is compiled in
        # only where a selection meets a sliding layer: the full view's band is its clipped window.
        vis_sel = (kpos[None, :] >= 0) & (kpos[None, :] <= pos_q[:, None] - window)
        if SEL_LAYER_BOUND:
            vis_sel = vis_sel & (kpos[None, :] > pos_q[:, None] - layer_window)
        vis_win = (kpos[None, :] <= pos_q[:, None]) & (kpos[None, :] > pos_q[:, None] - window)
        visible = tl.where(is_sel[None, :], vis_sel, vis_win) & in_range[None, :]
        # A selected key is needed only if some row sees it; invisible ones are never loaded.
        load_n = in_range & (tl.max(visible.to(tl.int32), axis=0) > 0)  # [BLOCK_N]
        row = tl.where(load_n, kpos, 0)  # keep masked-off addresses inside the cache
        k_ptrs = k_base + row[:, None] * sks + offs_d[None, :] * skd  # [BLOCK_N, D]
        v_ptrs = v_base + row[:, None] * svs + offs_d[None, :] * svd
        if COMPACT:  # selected rows come from the compact [B, H_kv, K, D] buffers, row = slot
            slot = tl.where(is_sel & load_n, idx, 0)
            sk_ptrs = SK + b * sskb + h_kv * sskh + slot[:, None] * ssks + offs_d[None, :] * sskd
            sv_ptrs = SV + b * ssvb + h_kv * ssvh + slot[:, None] * ssvs + offs_d[None, :] * ssvd
            k_ptrs = tl.where(is_sel[:, None], sk_ptrs, k_ptrs)
            v_ptrs = tl.where(is_sel[:, None], sv_ptrs, v_ptrs)
        kv_ok = load_n[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        alpha = tl.exp2(m_i - m_safe)  # rescale of the old state (0 when m_i is -inf)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N], 0 where invisible
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT_OUT:  # partials [B, H_kv, num_splits, G*T, (D)] in fp32, row m = g * T + t
        part = ((b * tl.num_programs(1) + h_kv) * num_splits + split) * (G * T) + offs_m  # flat row
        tl.store(PartM + part, m_i, mask=row_ok)
        tl.store(PartL + part, l_i, mask=row_ok)
        tl.store(PartO + part[:, None] * HEAD_D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    else:  # single split: normalise here; a row with no visible key gives zeros
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = Out + b * sob + head[:, None] * soh + t[:, None] * sot + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(PartO, PartM, PartL, Out, sob, soh, sot, sod, T, G, num_splits,
                    SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # query head
    t = tl.program_id(2)  # new-token index
    h_kv = h // G
    offs_s = tl.arange(0, SPLITS_P2)  # [SPLITS_P2]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < HEAD_D
    split_ok = offs_s < num_splits
    n_kv = tl.num_programs(1) // G  # H_kv
    # Flat partial row of (b, h_kv, split, m) with m = g * T + t, as written by _split_kernel.
    part = ((b * n_kv + h_kv) * num_splits + offs_s) * (G * T) + (h % G) * T + t  # [SPLITS_P2]
    m_s = tl.load(PartM + part, mask=split_ok, other=float("-inf"))
    l_s = tl.load(PartL + part, mask=split_ok, other=0.0)
    o_s = tl.load(PartO + part[:, None] * HEAD_D + offs_d[None, :], mask=split_ok[:, None] & d_ok[None, :],
                  other=0.0)  # [SPLITS_P2, BLOCK_D]
    m_max = tl.max(m_s, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no split saw a key: all weights 0
    w = tl.exp2(m_s - m_max)  # [SPLITS_P2] log-sum-exp weight of each split (0 for empty ones)
    l_tot = tl.sum(w * l_s, axis=0)
    out = tl.sum(w[:, None] * o_s, axis=0) / tl.where(l_tot > 0, l_tot, 1.0)  # [D]; no key -> zeros
    tl.store(Out + b * sob + h * soh + t * sot + offs_d * sod, out.to(Out.dtype.element_ty), mask=d_ok)


@dataclasses.dataclass(frozen=True)
class Tile:
    """Compile-time shape of one _split_kernel program and the warps / pipeline stages it runs with."""
    block_m: int  # query-tile rows (>= G*T, >= 16 for tl.dot)
    block_n: int  # keys per loop step
    block_d: int  # head_dim padded to a power of two (masked lanes)
    num_warps: int
    num_stages: int


def choose_tile(rows: int, head_dim: int) -> Tile:
    """Tile for G*T = `rows` query rows, sized so that ptxas spills nothing on sm_80 / sm_90.

    Per thread the fp32 accumulator holds BLOCK_M * BLOCK_D / (32 * num_warps) values, the score
    tile BLOCK_M * BLOCK_N / (32 * num_warps) more, and the K/V gather one 64-bit address per
    element of the [BLOCK_N, BLOCK_D] tile. Without a num_warps the launch got 4 warps and G*T >= 64
    spilled. 8 warps for accumulators past 32 x 128 (16 warps cap ptxas at 128 registers and spill
    more), and the key block halves each time the accumulator doubles past that, never above
    8192 / BLOCK_D so the gathered K tile stays the size of the 64 x 128 one. Two stages: the loop
    is a gather, and a third buffer only costs shared memory. Measured per engine shape by
    tests/test_kernel_compile.py (sm_80 is the tighter one: 254 registers at 32 x 64 x 128).
    No engine model reaches G*T > 128; a 256 x 16 x 128 tile still spills 64-176 B in its
    single-split variant (the split variant does not)."""
    block_m = max(16, triton.next_power_of_2(rows))
    block_d = triton.next_power_of_2(head_dim)
    acc = block_m * block_d  # fp32 accumulator elements
    num_warps = 4 if acc <= 32 * 128 else 8
    block_n = max(16, min(64, 8192 // block_d, 64 * 32 * 128 // acc))
    return Tile(block_m, block_n, block_d, num_warps, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """What one SM can hold (CUDA occupancy-calculator inputs; sm_80 / sm_90 values by default)."""
    sm_count: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    smem_per_sm: int = 227 * 1024  # usable by one block on sm_90 (sm_80: 163 KiB)
    max_blocks_per_sm: int = 32
    reg_granule: int = 256  # registers are allocated per warp in chunks of 256


def blocks_per_sm(occ: Occupancy, n_regs: int, num_warps: int, smem_bytes: int) -> int:
    """Programs of one kernel resident on an SM at once: the tightest of registers, threads, smem."""
    regs_per_warp = triton.cdiv(max(n_regs, 1) * 32, occ.reg_granule) * occ.reg_granule
    by_regs = occ.regs_per_sm // (regs_per_warp * num_warps)
    by_threads = occ.threads_per_sm // (32 * num_warps)
    by_smem = occ.smem_per_sm // smem_bytes if smem_bytes else occ.max_blocks_per_sm
    return max(1, min(by_regs, by_threads, by_smem, occ.max_blocks_per_sm))


def choose_num_splits(n_tiles: int, n_blocks: int, slots: int, max_splits: int = 64) -> int:
    """Split-K count for n_tiles = B * H_kv programs per split over n_blocks key blocks, when
    `slots` programs fit on the GPU at once (SMs x blocks_per_sm: one wave).

    Modelled time: waves x (key blocks per program + 1), the 1 standing for a program's fixed cost
    (q load, partial store, its share of the combine). Splitting fills the SMs, but a grid that
    ends in a part-full wave wastes the rest of that wave, so the count is picked to end on (nearly)
    whole waves. Each split keeps >= 2 key blocks. Ties go to fewer splits (less combine work)."""
    most = max(1, min(max_splits, n_blocks // 2))

    def cost(s: int) -> int:
        return triton.cdiv(n_tiles * s, slots) * (triton.cdiv(n_blocks, s) + 1)

    return min(range(1, most + 1), key=lambda s: (cost(s), s))


@functools.lru_cache(maxsize=None)
def _occupancy(device_index: Optional[int]) -> Occupancy:
    props = torch.cuda.get_device_properties(device_index)
    return Occupancy(sm_count=props.multi_processor_count,
                     regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
                     threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048),
                     smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", 227 * 1024))


_RESOURCES: dict = {}  # (tile, constexprs, dtype, device) -> (n_regs, shared bytes) of the split kernel


def _kernel_resources(key: tuple, make_call: Callable[[], "KernelCall"]) -> tuple[int, int]:
    """Registers per thread and shared memory of the compiled split kernel. Compiled (and its
    buffers allocated) once per configuration, normally in the engine's warm-up; later calls, CUDA
    graph capture included, only read the cache: no host sync, nothing that depends on data."""
    if key not in _RESOURCES:
        _measure_resources(key, make_call)
    return _RESOURCES[key]


@torch.compiler.disable  # compiles and loads a kernel binary: run it, do not trace it
def _measure_resources(key: tuple, make_call: Callable[[], "KernelCall"]) -> None:
    call = make_call()
    kernel = _split_kernel.warmup(*call.args, grid=(1,), **call.kwargs)
    kernel._init_handles()  # loads the binary: that is where triton reads n_regs
    _RESOURCES[key] = (kernel.n_regs, kernel.metadata.shared)


@dataclasses.dataclass
class KernelCall:
    """One kernel launch: fn[grid](*args, **constexprs, num_warps=, num_stages=)."""
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2

    @property
    def kwargs(self) -> dict:
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass
class LaunchPlan:
    """Everything decode_attention_triton launches for one call; `config()` is what to report."""
    tile: Tile
    num_splits: int
    split: KernelCall  # _split_kernel
    combine: Optional[KernelCall]  # _combine_kernel, None when num_splits == 1
    out: torch.Tensor  # [B, H, T, D]
    mass: Optional[KernelCall] = None  # _mass_kernel (mass_out given); its lse argument is filled
    lse: Optional[torch.Tensor] = None  # ... from the split partials first (lse_from_partials)

    def config(self) -> dict:
        return dict(grid=self.split.grid, num_splits=self.num_splits, **dataclasses.asdict(self.tile))


def launch_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor, *,
                scale: float, sel_pos: Optional[torch.Tensor] = None, window: Optional[int] = None,
                sel_k: Optional[torch.Tensor] = None, sel_v: Optional[torch.Tensor] = None,
                kv_limit: Optional[int] = None, num_splits: Optional[int] = None,
                sliding_window: Optional[int] = None, mass_out: Optional[torch.Tensor] = None) -> LaunchPlan:
    """The launches of `decode_attention_triton` for these inputs (same arguments), allocating the
    output and partials. Meta tensors work: tests/test_kernel_compile.py compiles what this returns."""
    B, H, T, D = q.shape
    H_kv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = H // H_kv
    if G * H_kv != H or not kernel_supports(G * T, D):
        raise ValueError(f"need H % H_kv == 0, a head_dim in 16..256 and G*T <= {KERNEL_MAX_ROWS} "
                         f"(else use decode_attention_reference), got D={D} H={H} H_kv={H_kv} T={T}")
    if window is not None and sel_pos is None:
        raise ValueError("the sparse view needs sel_pos (use an empty [B, H_kv, 0] tensor for window only)")
    if mass_out is not None and window is not None:
        raise ValueError("mass_out is the full view's (verification's); a sparse view reads too few keys to score")
    tile = choose_tile(G * T, D)
    n_sel = 0 if window is None else sel_pos.shape[-1]
    win = S_max + T if window is None else int(window)  # full view = window that covers everything
    layer_window = S_max + T if sliding_window is None else int(sliding_window)  # no bound: covers everything
    win = min(win, layer_window)
    compact = sel_k is not None and n_sel > 0
    if n_sel == 0:
        sel_pos = cache_len  # never read (n_sel = 0); any valid pointer with strides 0 will do
    sp_strides = sel_pos.stride() + (0,) * (3 - sel_pos.dim())
    sk, sv = (sel_k, sel_v) if compact else (k_cache, v_cache)  # unused stand-ins when not compact
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # interpreter bf16 workaround
    precision = "ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32"  # fp32 stays exact (no TF32)
    constexprs = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=tile.block_d, HEAD_D=D,
                      COMPACT=compact, PRECISION=precision, DOT_FP32=dot_fp32,
                      SEL_LAYER_BOUND=n_sel > 0 and sliding_window is not None)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, H, T, D]

    def split_call(splits: int) -> KernelCall:
        part_o = q.new_empty((B, H_kv, splits, G * T, D) if splits > 1 else (1,), dtype=torch.float32)
        part_m = q.new_empty((B, H_kv, splits, G * T) if splits > 1 else (1,), dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        args = (q, k_cache, v_cache, sk, sv, cache_len, sel_pos, out, part_o, part_m, part_l,
                *q.stride(), *k_cache.stride(), *v_cache.stride(), *sk.stride(), *sv.stride(), *sp_strides,
                *out.stride(), scale * _LOG2E, win, n_sel, T, G, splits, layer_window)
        return KernelCall((B, H_kv, splits), args, dict(constexprs, SPLIT_OUT=splits > 1),
                          tile.num_warps, tile.num_stages)

    if num_splits is None:
        max_keys = min(n_sel + win + T, S_max if kv_limit is None else kv_limit)  # upper bound, no sync
        n_blocks = triton.cdiv(max_keys, tile.block_n)
        if q.device.type != "cuda":
            num_splits = 2  # interpreter / CPU: small but > 1, so the combine path is always exercised
        else:
            occ = _occupancy(q.device.index)
            key = (tile, tuple(constexprs.items()), q.dtype, q.device.index)
            n_regs, smem = _kernel_resources(key, lambda: split_call(2))
            slots = occ.sm_count * blocks_per_sm(occ, n_regs, tile.num_warps, smem)
            num_splits = choose_num_splits(B * H_kv, n_blocks, slots)
    if mass_out is not None:
        num_splits = max(num_splits, 2)  # the mass reads the row log-sum-exp from the split partials
    split = split_call(num_splits)
    combine = None
    if num_splits > 1:
        part_o, part_m, part_l = split.args[8:11]
        combine = KernelCall((B, H, T), (part_o, part_m, part_l, out, *out.stride(), T, G, num_splits),
                             dict(SPLITS_P2=triton.next_power_of_2(num_splits), BLOCK_D=tile.block_d, HEAD_D=D))
    mass = lse = None
    if mass_out is not None:
        lse = q.new_empty((B, H_kv, G * T), dtype=torch.float32)
        grid, args, mass_constexprs, warps = mass_launch(q, k_cache, cache_len, lse, mass_out, scale=scale, tile=tile,
                                                         sliding_window=sliding_window)
        mass = KernelCall(grid, args, mass_constexprs, warps, tile.num_stages)
    return LaunchPlan(tile, num_splits, split, combine, out, mass, lse)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_len: torch.Tensor, *, scale: float,
                            sel_pos: Optional[torch.Tensor] = None, window: Optional[int] = None,
                            sel_k: Optional[torch.Tensor] = None, sel_v: Optional[torch.Tensor] = None,
                            kv_limit: Optional[int] = None, num_splits: Optional[int] = None,
                            sliding_window: Optional[int] = None, mass_out: Optional[torch.Tensor] = None
                            ) -> torch.Tensor:
    """Triton twin of `decode_attention_reference`; returns [B, H, T, D] in q's dtype (and, full
    view, fills mass_out [B, H_kv, S_max] fp32 with each position's attention mass).

    kv_limit only bounds the split count (the kernel reads each sequence's own length);
    num_splits forces the split-K factor (default: occupancy-aware, see `launch_plan`)."""
    plan = launch_plan(q, k_cache, v_cache, cache_len, scale=scale, sel_pos=sel_pos, window=window,
                       sel_k=sel_k, sel_v=sel_v, kv_limit=kv_limit, num_splits=num_splits,
                       sliding_window=sliding_window, mass_out=mass_out)
    for fn, call in ((_split_kernel, plan.split), (_combine_kernel, plan.combine)):
        if call is not None:
            fn[call.grid](*call.args, **call.kwargs)
    if plan.mass is not None:
        part_m, part_l = plan.split.args[9:11]
        plan.lse.copy_(lse_from_partials(part_m, part_l))
        _mass_kernel[plan.mass.grid](*plan.mass.args, **plan.mass.kwargs)
    return plan.out
