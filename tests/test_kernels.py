"""Triton decode attention vs the plain-torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET before triton is imported).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from gpt_fast_magicdec.kernels import decode_attention_reference as reference
from gpt_fast_magicdec.kernels import triton_available

pytest.importorskip("triton", reason="triton is not installed")
from gpt_fast_magicdec.kernels import decode_attention as KMOD  # noqa: E402  (after the skip: it imports triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S_MAX = 128
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def make_inputs(B, H, H_kv, T, D, lens, dtype=torch.float32, seed=0, strided=False):
    """q [B, H, T, D], k/v caches [B, H_kv, S_MAX, D], cache_len [B]."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # q as a transposed [B, T, H, D] and the cache as a transposed [B, S, H_kv, D]
        q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2)
        k = torch.randn(B, S_MAX, H_kv, D, generator=gen).transpose(1, 2)
        v = torch.randn(B, S_MAX, H_kv, D, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(B, H, T, D, generator=gen)
        k = torch.randn(B, H_kv, S_MAX, D, generator=gen)
        v = torch.randn(B, H_kv, S_MAX, D, generator=gen)
    to = dict(device=DEVICE, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), torch.tensor(lens, device=DEVICE)


def make_sel_pos(lens, H_kv, T, n_sel, n_pad, seed=0):
    """[B, H_kv, n_sel] distinct live positions per (b, h_kv) (some inside the window), -1 padded."""
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for n in lens:
        per_head = []
        for _ in range(H_kv):
            pos = torch.randperm(n + T, generator=gen)[:n_sel - n_pad]  # any live key, window included
            pos = torch.cat([pos, torch.full((n_sel - len(pos),), -1, dtype=torch.long)])
            per_head.append(pos[torch.randperm(n_sel, generator=gen)])  # padding scattered, not last
        rows.append(torch.stack(per_head))
    return torch.stack(rows).to(DEVICE)


def check(q, k, v, cache_len, num_splits, **view):
    scale = q.shape[-1] ** -0.5
    out = KMOD.decode_attention_triton(q, k, v, cache_len, scale=scale, num_splits=num_splits, **view)
    ref = reference(q, k, v, cache_len, scale=scale, **view)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[q.dtype])
    return out


# (B, H, H_kv, T, D, cache_len per sequence)
FULL_CASES = [
    (1, 4, 4, 1, 64, [37]),  # MHA, one token
    (3, 8, 2, 4, 64, [0, 19, 100]),  # GQA 4, ragged, an empty cache (only the new tokens visible)
    (3, 8, 1, 1, 128, [5, 0, 64]),  # GQA 8, head_dim 128
    (1, 16, 2, 16, 64, [90]),  # G*T = 128 rows: the largest decode tile
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", FULL_CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}T{c[3]}D{c[4]}")
def test_full_view(case, num_splits):
    B, H, H_kv, T, D, lens = case
    check(*make_inputs(B, H, H_kv, T, D, lens), num_splits)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_full_view_half(dtype, D):
    check(*make_inputs(3, 8, 2, 4, D, [0, 50, 111], dtype=dtype), 2)


def test_strided_inputs_and_default_splits():
    q, k, v, cl = make_inputs(2, 8, 2, 3, 64, [7, 70], strided=True)
    assert not k.is_contiguous() and not q.is_contiguous()
    check(q, k, v, cl, None)  # num_splits from the launch plan (2 off-GPU)
    plan = KMOD.launch_plan(q, k, v, cl, scale=0.125)
    assert plan.num_splits >= (1 if DEVICE == "cuda" else 2)
    cfg = plan.config()
    assert cfg["grid"] == (2, 2, plan.num_splits) and cfg["block_m"] == 16 and cfg["block_d"] == 64


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("D", [96, 80])
def test_non_power_of_two_head_dim(D, sparse):
    """Phi-3-style head_dim 96 (and 80): the tile is padded to 128 with masked lanes."""
    lens, H_kv, T = [0, 40, 100], 2, 3
    q, k, v, cl = make_inputs(3, 8, H_kv, T, D, lens)
    view = dict(sel_pos=make_sel_pos(lens, H_kv, T, 8, 2), window=16) if sparse else {}
    for num_splits in (1, 3):
        check(q, k, v, cl, num_splits, **view)
    assert KMOD.launch_plan(q, k, v, cl, scale=1.0, **view).tile.block_d == 128


@pytest.mark.parametrize("rows,D", [(4, 128), (8, 128), (32, 128), (64, 128), (128, 128), (256, 128),
                                    (8, 64), (8, 96), (8, 256)])
def test_tile_rules(rows, D):
    """Every tile is a legal tl.dot shape, with more warps and fewer keys per step as it grows
    (tests/test_kernel_compile.py checks that the engine's tiles do not spill)."""
    tile = KMOD.choose_tile(rows, D)
    assert tile.block_m >= max(16, rows) and tile.block_d >= D and tile.block_n >= 16
    assert tile.block_m * tile.block_d <= 32 * 128 or tile.num_warps == 8
    assert tile.block_n * tile.block_d <= 64 * 128 and tile.block_m * tile.block_n <= 64 * 64


@pytest.mark.skipif(DEVICE != "cuda", reason="reads the registers of the kernel loaded on a GPU")
def test_split_count_from_compiled_kernel():
    q, k, v, cl = make_inputs(40, 32, 8, 1, 128, [100] * 40, dtype=torch.bfloat16)
    plan = KMOD.launch_plan(q, k, v, cl, scale=1.0)
    constexprs = tuple((k, v) for k, v in plan.split.constexprs.items() if k != "SPLIT_OUT")
    n_regs, smem = KMOD._RESOURCES[(plan.tile, constexprs, q.dtype, q.device.index)]
    assert 0 < n_regs <= 255 and smem > 0
    occ = KMOD._occupancy(q.device.index)
    slots = occ.sm_count * KMOD.blocks_per_sm(occ, n_regs, plan.tile.num_warps, smem)
    assert plan.num_splits == KMOD.choose_num_splits(40 * 8, S_MAX // plan.tile.block_n, slots)


def test_blocks_per_sm():
    occ = KMOD.Occupancy(sm_count=132)
    assert KMOD.blocks_per_sm(occ, n_regs=152, num_warps=4, smem_bytes=39424) == 3  # registers bind
    assert KMOD.blocks_per_sm(occ, n_regs=32, num_warps=4, smem_bytes=100 * 1024) == 2  # shared memory
    assert KMOD.blocks_per_sm(occ, n_regs=16, num_warps=4, smem_bytes=0) == 16  # threads
    assert KMOD.blocks_per_sm(occ, n_regs=255, num_warps=8, smem_bytes=0) == 1


def test_splits_fill_whole_waves():
    """B = 40 x 8 KV heads on 132 SMs x 2 resident blocks (264 slots), an 8K context (128 blocks)."""
    n_tiles, slots, n_blocks = 40 * 8, 132 * 2, 128
    old = max(1, min(math.ceil(2 * 132 / n_tiles), n_blocks // 2))  # the former "2 x SM count" rule
    assert old == 1 and (n_tiles * old) % slots / slots < 0.22  # a second wave 21% full
    new = KMOD.choose_num_splits(n_tiles, n_blocks, slots)
    last_wave = (n_tiles * new) % slots or slots
    assert last_wave / slots > 0.8, (new, last_wave)
    assert n_blocks // new >= 2  # each split still reads >= 2 key blocks
    # Few programs: split until one wave is full; short contexts: never below 2 blocks per split.
    assert KMOD.choose_num_splits(8, 128, 264) * 8 <= 264
    assert KMOD.choose_num_splits(8, 128, 264) >= 16
    assert KMOD.choose_num_splits(8, 4, 264) <= 2
    assert KMOD.choose_num_splits(1, 10**6, 264) == 64  # capped


# (B, H, H_kv, T, D, cache_len, window, n_sel, n_pad)
SPARSE_CASES = [
    (3, 8, 2, 4, 64, [0, 40, 100], 16, 8, 2),  # overlap with the window, -1 padding, empty cache
    (2, 8, 1, 1, 128, [30, 120], 8, 12, 3),  # GQA 8, one draft token
    (2, 4, 4, 2, 64, [3, 60], 100, 4, 1),  # window larger than the context: selection unused
    (2, 8, 2, 2, 64, [10, 90], 16, 0, 0),  # window only (empty sel_pos)
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"B{c[0]}kv{c[2]}T{c[3]}w{c[6]}K{c[7]}")
def test_sparse_view(case, num_splits):
    B, H, H_kv, T, D, lens, window, n_sel, n_pad = case
    q, k, v, cl = make_inputs(B, H, H_kv, T, D, lens)
    sel_pos = make_sel_pos(lens, H_kv, T, n_sel, n_pad)
    check(q, k, v, cl, num_splits, sel_pos=sel_pos, window=window)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_compact_buffers(num_splits):
    lens, H_kv, T, window = [0, 40, 100], 2, 4, 16
    q, k, v, cl = make_inputs(3, 8, H_kv, T, 64, lens)
    sel_pos = make_sel_pos(lens, H_kv, T, 8, 2)
    gen = torch.Generator().manual_seed(5)  # unrelated to the cache, so reading the cache would fail
    sel_k, sel_v = (torch.randn(3, H_kv, 8, 64, generator=gen).to(DEVICE) for _ in range(2))
    check(q, k, v, cl, num_splits, sel_pos=sel_pos, window=window, sel_k=sel_k, sel_v=sel_v)
    # Compact buffers gathered from the cache give the same answer as gathering by position.
    idx = sel_pos.clamp(min=0)[..., None].expand(-1, -1, -1, 64)
    out_c = check(q, k, v, cl, num_splits, sel_pos=sel_pos, window=window,
                  sel_k=k.gather(2, idx), sel_v=v.gather(2, idx))
    out_g = check(q, k, v, cl, num_splits, sel_pos=sel_pos, window=window)
    torch.testing.assert_close(out_c, out_g, **TOL[torch.float32])


def test_sparse_bf16():
    lens = [20, 110]
    q, k, v, cl = make_inputs(2, 8, 2, 3, 128, lens, dtype=torch.bfloat16)
    check(q, k, v, cl, 2, sel_pos=make_sel_pos(lens, 2, 3, 10, 2), window=32)


@pytest.mark.parametrize("sparse", [False, True])
def test_never_reads_past_live_length(sparse):
    """NaN past cache_len + T (and in compact slots nobody may use) must never reach the output."""
    lens, H_kv, T, window = [0, 33, 90], 2, 4, 16
    q, k, v, cl = make_inputs(3, 8, H_kv, T, 64, lens)
    view = {}
    if sparse:
        sel_pos = make_sel_pos(lens, H_kv, T, 8, 2)
        idx = sel_pos.clamp(min=0)[..., None].expand(-1, -1, -1, 64)
        sel_k, sel_v = k.gather(2, idx), v.gather(2, idx)
        # Padding, and slots inside the window of every token (even the last one), are never used.
        unused = (sel_pos < 0) | (sel_pos > cl[:, None, None] + T - 1 - window)
        assert unused.any() and not unused.all()
        view = dict(sel_pos=sel_pos, window=window, sel_k=sel_k, sel_v=sel_v)
    ref = reference(q, k, v, cl, scale=0.125, **view)
    dead = torch.arange(S_MAX, device=DEVICE)[None, :] >= (cl + T)[:, None]  # [B, S]
    k[dead[:, None, :, None].expand_as(k)] = float("nan")
    v[dead[:, None, :, None].expand_as(v)] = float("nan")
    if sparse:
        sel_k[unused[..., None].expand_as(sel_k)] = float("nan")
        sel_v[unused[..., None].expand_as(sel_v)] = float("nan")
    for num_splits in (1, 3):
        out = KMOD.decode_attention_triton(q, k, v, cl, scale=0.125, num_splits=num_splits, **view)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


# (B, H, H_kv, T, D, cache_len, layer window, sparse view (window, n_sel, n_pad) or None for the full view)
LAYER_WINDOW_CASES = [
    (3, 8, 2, 4, 64, [0, 40, 100], 24, None),  # full view: the band p - 24 < s <= p
    (2, 8, 2, 2, 64, [10, 90], 24, (16, 8, 2)),  # draft window inside the layer's; selection clipped
    (2, 8, 2, 2, 64, [10, 90], 12, (16, 8, 2)),  # draft window wider than the layer's: clipped to it
]


@pytest.mark.parametrize("case", LAYER_WINDOW_CASES, ids=lambda c: f"W{c[6]}-{'sparse' if c[7] else 'full'}")
def test_layer_sliding_window(case):
    """A sliding-window layer: the kernel matches the reference, the window changes the answer, and
    keys the window excludes (NaN here) are never read, by the full view nor by a draft's selection."""
    B, H, H_kv, T, D, lens, layer_window, sparse = case
    q, k, v, cl = make_inputs(B, H, H_kv, T, D, lens)
    view = {}
    if sparse:
        window, n_sel, n_pad = sparse
        view = dict(sel_pos=make_sel_pos(lens, H_kv, T, n_sel, n_pad), window=window)
    ref = reference(q, k, v, cl, scale=0.125, sliding_window=layer_window, **view)
    assert not torch.allclose(ref, reference(q, k, v, cl, scale=0.125, **view), **TOL[torch.float32])
    excluded = torch.arange(S_MAX, device=DEVICE)[None, :] <= (cl - layer_window)[:, None]  # [B, S]: for every token
    assert excluded.any()
    k[excluded[:, None, :, None].expand_as(k)] = float("nan")
    v[excluded[:, None, :, None].expand_as(v)] = float("nan")
    for num_splits in (1, 3):
        out = KMOD.decode_attention_triton(q, k, v, cl, scale=0.125, num_splits=num_splits,
                                           sliding_window=layer_window, **view)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_checks_can_fail():
    """The comparison is sharp: an off-by-one mask or window is caught."""
    lens, T = [0, 33, 90], 4
    q, k, v, cl = make_inputs(3, 8, 2, T, 64, lens)
    out = KMOD.decode_attention_triton(q, k, v, cl, scale=0.125, num_splits=2)
    assert not torch.allclose(out, reference(q, k, v, cl + 1, scale=0.125), **TOL[torch.float32])
    sel_pos = make_sel_pos(lens, 2, T, 8, 2)
    out = KMOD.decode_attention_triton(q, k, v, cl, scale=0.125, sel_pos=sel_pos, window=16, num_splits=2)
    wrong = reference(q, k, v, cl, scale=0.125, sel_pos=sel_pos, window=15)
    assert not torch.allclose(out, wrong, **TOL[torch.float32])


def test_rejects_unsupported_shapes():
    q, k, v, cl = make_inputs(1, 2, 2, 1, 64, [4])
    with pytest.raises(ValueError):  # head_dim below 16: tl.dot cannot take it
        KMOD.decode_attention_triton(q[..., :8], k[..., :8], v[..., :8], cl, scale=1.0)
    with pytest.raises(ValueError):
        KMOD.decode_attention_triton(q, k, v, cl, scale=1.0, window=8)  # sparse view without sel_pos


def test_triton_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_available("cpu") is False
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # as if triton were not installed
    assert triton_available("cpu") is False


def test_attend_falls_back_outside_the_kernel_range():
    """`--attention triton` / auto on a head_dim the kernel cannot take: the torch path, one warning;
    head_dim 96 stays on the kernel (padded tile)."""
    from gpt_fast_magicdec.attention import AttentionView, attend

    for D, expect_warning in ((8, True), (96, False)):
        q, k, v, cl = make_inputs(2, 4, 2, 2, D, [5, 30])
        view = AttentionView(cache_len=cl, n_tokens=2, backend="triton")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = attend(q, k, v, view, layer_id=0, scale=D ** -0.5)
        assert any("torch path" in str(w.message) for w in caught) == expect_warning
        torch.testing.assert_close(out, reference(q, k, v, cl, scale=D ** -0.5), **TOL[torch.float32])
