"""Roofline cost model: hand-computed byte and FLOP counts, and MagicDec's qualitative claims."""
import dataclasses
import math

import pytest
import torch

from gpt_fast_magicdec.memory import kv_bytes_per_token
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import (
    EAGER_MODULES, EAGER_OPS, GRAPH_KERNELS, PROFILES, SCORE_PASS_OPS, HardwareProfile, StepCost,
    allreduce_time, best_gamma, best_gamma_from_times, decode_step_cost,
    eager_attention_time, eager_keys, expected_tokens, get_profile, measure_hardware,
    overhead_time, param_count, params_touched, predict_times, predicted_speedup, roofline_time, row_rate,
    weight_bytes,
)
from gpt_fast_magicdec.errors import UserError

LLAMA3_8B = ModelArgs.from_preset("llama-3.1-8b")
LLAMA2_7B = ModelArgs.from_preset("llama-2-7b")
H100 = get_profile("H100-SXM")
A100 = get_profile("A100-80G")
NO_COMM = dict(link_bandwidth=math.inf, allreduce_latency_s=0.0, allreduce_hop_latency_s=0.0)

# Per-layer parameters, written out: wq + wk + wv + wo + w1/w2/w3 + two RMSNorms.
L3_LAYER = 4096 * 4096 + 4096 * 1024 + 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
L2_LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
L3_TOUCHED = 32 * L3_LAYER + 4096 + 128256 * 4096  # layers + final norm + output head
L2_TOUCHED = 32 * L2_LAYER + 4096 + 32000 * 4096


# ---- parameter and byte counts ---------------------------------------------------------------
def test_param_counts_match_public_checkpoints():
    assert param_count(LLAMA3_8B) == 32 * L3_LAYER + 4096 + 2 * 128256 * 4096 == 8_030_261_248
    assert param_count(LLAMA2_7B) == 32 * L2_LAYER + 4096 + 2 * 32000 * 4096 == 6_738_415_616
    assert param_count(ModelArgs.from_preset("llama-3.2-1b")) == 1_235_814_400  # tied head
    assert param_count(ModelArgs.from_preset("qwen2.5-7b")) == 7_615_616_512  # q/k/v biases


def test_weight_bytes_exclude_embedding_table():
    assert params_touched(LLAMA3_8B) == L3_TOUCHED
    assert weight_bytes(LLAMA3_8B, 2) == 2 * L3_TOUCHED
    assert weight_bytes(LLAMA2_7B, 4) == 4 * L2_TOUCHED
    tied = ModelArgs.from_preset("llama-3.2-1b")  # head is the embedding table: read once
    assert params_touched(tied) == param_count(tied)


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(LLAMA3_8B, 2) == 32 * 8 * 128 * 2 * 2 == 131072  # 128 KiB
    assert kv_bytes_per_token(LLAMA2_7B, 2) == 32 * 32 * 128 * 2 * 2 == 524288  # 512 KiB
    assert kv_bytes_per_token(LLAMA3_8B, 2, tp=2) == 65536
    assert kv_bytes_per_token(LLAMA3_8B, 2, tp=16) == 32 * 1 * 128 * 2 * 2  # KV heads replicated


def test_decode_step_cost_llama3_by_hand():
    B, S = 4, 1000
    cost = decode_step_cost(LLAMA3_8B, batch=B, context=S, n_tokens=1)
    weights = 2 * L3_TOUCHED
    embed_rows = B * 1 * 4096 * 2
    kv_read, kv_write = B * S * 131072, B * 1 * 131072
    assert cost.bytes == weights + embed_rows + kv_read + kv_write
    attn = 4 * B * 1 * S * 32 * 128 * 32
    assert cost.flops == 2 * L3_TOUCHED * B * 1 + attn


def test_decode_step_cost_llama2_verify_by_hand():
    B, S, n = 2, 4096, 4  # verifying gamma + 1 = 4 tokens
    cost = decode_step_cost(LLAMA2_7B, batch=B, context=S, n_tokens=n)
    assert cost.bytes == 2 * L2_TOUCHED + B * n * 4096 * 2 + B * S * 524288 + B * n * 524288
    assert cost.flops == 2 * L2_TOUCHED * B * n + 4 * B * n * S * 32 * 128 * 32


def test_sparse_view_reads_only_budget():
    full = decode_step_cost(LLAMA3_8B, 8, 32768, 1)
    sparse = decode_step_cost(LLAMA3_8B, 8, 32768, 1, kv_tokens=512)
    assert full.bytes - sparse.bytes == 8 * (32768 - 512) * 131072
    assert full.flops - sparse.flops == 4 * 8 * (32768 - 512) * 32 * 128 * 32


def test_tensor_parallel_per_rank_by_hand():
    B, S, tp = 4, 1000, 2
    cost = decode_step_cost(LLAMA3_8B, B, S, 1, tp=tp)
    sharded = (4096 * 4096 + 4096 * 1024 + 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336) // tp
    touched = 32 * (sharded + 2 * 4096) + 4096 + 128256 // tp * 4096  # norms replicated, the head vocab-parallel
    assert params_touched(LLAMA3_8B, tp=tp) == touched
    assert cost.bytes == 2 * touched + B * 4096 * 2 + B * S * 65536 + B * 65536
    assert cost.flops == 2 * touched * B + 4 * B * S * 16 * 128 * 32
    one = decode_step_cost(LLAMA3_8B, B, S, 1)
    eight = decode_step_cost(LLAMA3_8B, B, S, 1, tp=8)
    assert eight.bytes < cost.bytes < one.bytes and eight.flops < cost.flops < one.flops
    assert decode_step_cost(LLAMA3_8B, B, S, 1, dtype_bytes=1).bytes < one.bytes  # fp8 / int8


def test_collectives_by_hand():
    B, n = 4, 4  # verifying gamma + 1 = 4 tokens at TP 8
    cost = decode_step_cost(LLAMA3_8B, B, 1000, n, tp=8)
    assert cost.allreduce_bytes == B * n * 4096 * 2  # [B, T, dim] bf16, after wo and after w2
    assert cost.n_allreduce == 2 * 32 == 64 and cost.tp == 8
    assert cost.attn_bytes == B * 1000 * 16384 + B * n * 16384  # KV, 1 KV head per rank
    assert cost.attn_flops == 4 * B * n * 1000 * 4 * 128 * 32  # 4 query heads per rank
    single = decode_step_cost(LLAMA3_8B, B, 1000, n)
    assert single.n_allreduce == 0 and single.allreduce_bytes == B * n * 4096 * 2


def test_allreduce_time_ring_by_hand():
    hw = HardwareProfile("toy", 1e12, 1e14, link_bandwidth=100e9, allreduce_latency_s=5e-6,
                         allreduce_hop_latency_s=1e-6)
    # 8 ranks: 14 ring steps, each rank sends 2 * 7 / 8 of the buffer.
    assert allreduce_time(1e6, 8, hw) == pytest.approx(5e-6 + 14 * 1e-6 + 14 / 8 * 1e6 / 100e9)
    assert allreduce_time(1e6, 2, hw) == pytest.approx(5e-6 + 2 * 1e-6 + 1e6 / 100e9)
    assert allreduce_time(1e6, 1, hw) == 0.0
    assert PROFILES["A100-80G"].link_bandwidth == 600e9 / 2  # NVLink3, one direction
    assert PROFILES["H100-SXM"].link_bandwidth == 900e9 / 2  # NVLink4, one direction
    # nccl-tests #123 (DGX A100, ring, 8-128 B): 10 us on 2 GPUs, 33.7 us on 8.
    assert allreduce_time(8, 2, A100) == pytest.approx(9.8e-6, rel=0.05)
    assert allreduce_time(8, 8, A100) == pytest.approx(33.7e-6, rel=0.05)


# ---- roofline -----------------------------------------------------------------------------------
def test_roofline_time():
    hw = HardwareProfile("toy", mem_bandwidth=1e12, matmul_flops=1e14, step_overhead_s=1e-5)
    assert roofline_time(StepCost(bytes=2e12, flops=1e14), hw) == pytest.approx(2.0 + 1e-5)  # memory
    assert roofline_time(StepCost(bytes=1e9, flops=3e14), hw) == pytest.approx(3.0 + 1e-5)  # compute


def test_roofline_sums_linear_attention_comm_and_overhead():
    hw = HardwareProfile("toy", mem_bandwidth=1e12, matmul_flops=1e14, step_overhead_s=1e-5,
                         kernel_overhead_s=1e-6, eager_op_overhead_s=4e-6, eager_module_overhead_s=3e-6,
                         link_bandwidth=1e11,
                         allreduce_latency_s=2e-6)
    cost = StepCost(bytes=3e12, flops=3e14, attn_bytes=1e12, attn_flops=2e14, allreduce_bytes=1e8,
                    n_allreduce=4, tp=2, n_layers=2)
    linear = max(2e12 / 1e12, 1e14 / 1e14)  # memory bound: 2 s
    attention = max(1e12 / 1e12, 2e14 / 1e14)  # compute bound: 2 s
    comm = 4 * (2e-6 + 2 * 1 / 2 * 1e8 / 1e11)  # 4 all-reduces over 2 ranks
    graph = 1e-5 + (2 * GRAPH_KERNELS[0] + GRAPH_KERNELS[1]) * 1e-6
    eager = 1e-5 + (2 * EAGER_OPS[0] + EAGER_OPS[1]) * 4e-6 + (2 * EAGER_MODULES[0] + EAGER_MODULES[1]) * 3e-6
    assert overhead_time(cost, hw) == pytest.approx(graph) and overhead_time(cost, hw, False) == pytest.approx(eager)
    assert roofline_time(cost, hw) == pytest.approx(linear + attention + comm + graph)
    assert roofline_time(cost, hw, graphs=False) == pytest.approx(linear + attention + comm + eager)
    # One global max over the sums would say 3 s: the components are separate kernels.
    assert roofline_time(cost, hw) > max(3e12 / 1e12, 3e14 / 1e14) + comm + graph


def test_predict_times_structure():
    t = predict_times(LLAMA3_8B, H100, batch=32, context=32768, gamma=3, budget=512)
    assert t.T_T == pytest.approx(roofline_time(t.target, H100))
    assert t.verify == decode_step_cost(LLAMA3_8B, 32, 32768, 4)
    assert t.draft == decode_step_cost(LLAMA3_8B, 32, 32768, 1, kv_tokens=512)
    assert t.T_T <= t.T_V < 1.1 * t.T_T  # memory bound: verifying 4 tokens ~ decoding 1
    assert t.draft_ratio < 0.2 and t.verify_ratio == t.T_V / t.T_T
    # Budget above the context: the draft reads only what exists.
    short = predict_times(LLAMA3_8B, H100, 4, 256, 3, budget=512)
    assert short.draft == short.target


def test_predict_times_standalone_draft():
    draft = ModelArgs.from_preset("llama-3.2-1b")
    full = predict_times(LLAMA3_8B, H100, 8, 16384, 3, 512, draft_args=draft, draft_budget=-1)
    assert full.draft == decode_step_cost(draft, 8, 16384, 1)
    sparse = predict_times(LLAMA3_8B, H100, 8, 16384, 3, 512, draft_args=draft, draft_budget=1024)
    assert sparse.draft == decode_step_cost(draft, 8, 16384, 1, kv_tokens=1024)
    inherits = predict_times(LLAMA3_8B, H100, 8, 16384, 3, 512, draft_args=draft)
    assert inherits.draft == decode_step_cost(draft, 8, 16384, 1, kv_tokens=512)
    assert sparse.T_D < full.T_D < full.T_T


def test_verify_ratio_rises_when_verification_turns_compute_bound():
    # Large batch x (gamma + 1): the linear layers (and at long gamma attention) leave the memory roof.
    ratios = [predict_times(LLAMA3_8B, A100, 128, 32768, g, 512).verify_ratio for g in (1, 3, 7)]
    assert ratios == sorted(ratios) and ratios[-1] > 1.1, ratios
    small = predict_times(LLAMA3_8B, A100, 1, 32768, 3, 512)
    assert small.verify_ratio < 1.01  # batch 1: memory bound, verifying 4 tokens ~ decoding 1


def test_single_rank_ignores_link_terms():
    no_comm = dataclasses.replace(A100, **NO_COMM)
    assert predict_times(LLAMA3_8B, A100, 32, 32768, 3, 512) == predict_times(LLAMA3_8B, no_comm, 32, 32768, 3, 512)


def test_tensor_parallel_speedup_lower_with_communication_and_overhead():
    def speedup(hw, tp=8):
        return predicted_speedup(predict_times(LLAMA3_8B, hw, 32, 32768, 3, 512, tp=tp), 3, 0.8)
    bare = dataclasses.replace(A100, **NO_COMM, kernel_overhead_s=0.0, step_overhead_s=0.0)
    with_comm = dataclasses.replace(bare, **{k: getattr(A100, k) for k in NO_COMM})
    assert speedup(A100) < speedup(with_comm) < speedup(bare)  # each fixed cost dilutes the gain
    assert speedup(A100, tp=8) < speedup(A100, tp=1)  # per rank, fixed costs weigh more at TP 8
    # 64 all-reduces of [B, 1, dim] per decode step, of [B, gamma + 1, dim] per verify step.
    t = predict_times(LLAMA3_8B, A100, 32, 32768, 3, 512, tp=8)
    c = predict_times(LLAMA3_8B, dataclasses.replace(A100, **NO_COMM), 32, 32768, 3, 512, tp=8)
    assert t.T_T - c.T_T == pytest.approx(64 * allreduce_time(32 * 4096 * 2, 8, A100))
    assert t.T_V - c.T_V == pytest.approx(64 * allreduce_time(32 * 4 * 4096 * 2, 8, A100))


# ---- MagicDec's claims ----------------------------------------------------------------------------
def _speedup(batch, context, gamma=3, alpha=0.8, budget=512):
    times = predict_times(LLAMA3_8B, H100, batch, context, gamma, budget)
    return predicted_speedup(times, gamma, alpha)


def test_long_context_speedup_rises_with_batch():
    s = [_speedup(b, 32768) for b in (1, 8, 32, 128)]
    assert s == sorted(s) and len(set(s)) == 4, s
    assert s[-1] > 2.0


def test_short_context_speedup_falls_with_batch():
    assert _speedup(256, 512) < _speedup(1, 512) < 1.0


# ---- Omega and gamma choice ---------------------------------------------------------------------
def test_expected_tokens():
    assert expected_tokens(0, 0.7) == 1.0
    assert expected_tokens(5, 0.0) == 1.0
    assert expected_tokens(3, 1.0) == 4.0
    assert expected_tokens(2, 0.5) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(3, 1 - 1e-9) == pytest.approx(4.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            expected_tokens(3, bad)
    with pytest.raises(ValueError):
        expected_tokens(-1, 0.5)


def test_best_gamma_from_predictions():
    assert best_gamma(LLAMA3_8B, H100, 32, 32768, alpha=0.01, budget=512) == (0, 1.0)
    assert best_gamma(LLAMA3_8B, H100, 64, 512, alpha=0.8, budget=512) == (0, 1.0)  # short context
    g, s = best_gamma(LLAMA3_8B, H100, 32, 32768, alpha=0.9, budget=512)
    assert 1 <= g <= 8 and s > 1.0
    assert s == pytest.approx(_speedup(32, 32768, gamma=g, alpha=0.9))
    assert all(_speedup(32, 32768, gamma=k, alpha=0.9) <= s for k in range(1, 9))
    assert best_gamma(LLAMA3_8B, H100, 32, 32768, alpha=0.9, budget=512, margin=100.0) == (0, 1.0)


def test_best_gamma_from_measured_times():
    t_v = {g: 1.0 + 0.05 * g for g in range(1, 9)}
    expect = max(range(1, 9), key=lambda g: expected_tokens(g, 0.8) / (g * 0.1 + t_v[g]))
    g, s = best_gamma_from_times(1.0, t_v, 0.1, alpha=0.8)
    assert g == expect and s == pytest.approx(expected_tokens(g, 0.8) / (g * 0.1 + t_v[g]))
    assert best_gamma_from_times(1.0, {2: 1.1}, 0.1, 0.8)[0] == 2  # only the gammas given are tried
    assert best_gamma_from_times(1.0, t_v, 0.9, alpha=0.3) == (0, 1.0)  # draft nearly as slow
    # Exactly 1.0 does not pay with the default margin (strictly greater required).
    assert best_gamma_from_times(1.0, {1: 1.0}, 0.0, 0.0) == (0, 1.0)


# ---- hardware -------------------------------------------------------------------------------------
def test_profiles():
    assert set(PROFILES) == {"A100-80G", "H100-SXM", "H200", "L40S", "L40"}
    assert get_profile("h100") is PROFILES["H100-SXM"] and get_profile("l40s") is PROFILES["L40S"]
    assert get_profile("l40") is PROFILES["L40"]  # not the L40S: half its tensor-core rate
    assert PROFILES["H200"].mem_bandwidth == 4.8e12 and PROFILES["A100-80G"].matmul_flops == 312e12
    with pytest.raises(UserError, match="measure"):
        get_profile("tpu-v9")


def test_measure_hardware_cpu_is_sane():
    # One thread, as benchmarks/validate_cost_model.py measures: on a loaded 2-core host two OpenMP
    # threads can wait ~250 us per op for a descheduled peer, which times the host, not this code.
    # (How long the measurement takes is not asserted: on a loaded machine any bound is a coin toss.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hw = measure_hardware("cpu")
    finally:
        torch.set_num_threads(threads)
    for v in (hw.mem_bandwidth, hw.matmul_flops, hw.eager_op_overhead_s, hw.eager_module_overhead_s):
        assert math.isfinite(v) and v > 0
    for table in (hw.matmul_rate_by_rows, hw.matmul_rate_cached, hw.eager_score_cost):  # CPU-only terms
        xs = [x for x, _ in table]
        assert len(xs) >= 3 and xs == sorted(xs) and all(math.isfinite(y) and y >= 0 for _, y in table)
    assert not hw.graphs and hw.link_bandwidth == math.inf  # eager on CPU; no group, no all-reduce
    assert get_profile("measure", "cpu").name == "measured-cpu"


def _measure_rank(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        hw = get_profile("measure", "cpu")  # under a process group: measures the all-reduce on it
        if rank == 0:
            out.put((hw.allreduce_latency_s, hw.link_bandwidth))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_measure_hardware_all_reduce_under_process_group():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    torch.multiprocessing.start_processes(_measure_rank, args=(2, port, out), nprocs=2, start_method="spawn")
    latency, link = out.get(timeout=5)
    assert 0 < latency < 0.1 and 0 < link < math.inf


# ---- CPU eager terms (measured profile) -------------------------------------------------------------
TINY_L3 = ModelArgs.from_preset("tiny-llama3")  # dim 64, 2 layers, 8 heads, 2 KV heads, head_dim 16


def test_eager_keys_round_up_to_bucket_by_hand():
    # bucketed_kv_limit in engine.py: context + n rounded up to the bucket (256).
    assert eager_keys(256, 1, 256) == 512 and eager_keys(255, 1, 256) == 256 and eager_keys(4096, 4, 256) == 4352
    B, S, n = 2, 300, 4  # the eager path attends over 512 keys, masked ones included
    cost = decode_step_cost(TINY_L3, B, S, n, dtype_bytes=4, kv_bucket=256)
    kv_tok = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32: 512 bytes
    assert kv_bytes_per_token(TINY_L3, 4) == kv_tok
    assert cost.attn_bytes == B * 512 * kv_tok + B * n * kv_tok
    assert cost.attn_flops == 4 * B * n * 512 * 8 * 16 * 2
    assert cost.score_elems == B * 8 * n * 512  # fp32 scores [B, H_kv, G * n, keys], per layer
    assert cost.rows == B * n and cost.attn_rows == (8 // 2) * n
    plain = decode_step_cost(TINY_L3, B, S, n, dtype_bytes=4)  # no bucket: the context as before
    assert plain.attn_bytes == B * S * kv_tok + B * n * kv_tok and plain.score_elems == B * 8 * n * S


def test_row_rate_interpolates_rows_and_working_set():
    hw = HardwareProfile("toy", 1e10, 1e11, matmul_rate_by_rows=((1, 1e9), (4, 4e9), (16, 8e9)),
                         matmul_rate_cached=((1, 3e9), (4, 6e9), (16, 12e9)))
    assert row_rate(hw, 2) == pytest.approx(2.5e9)  # halfway in log(rows) between 1 and 4
    assert row_rate(hw, 64) == 8e9 and row_rate(hw, 1) == 1e9  # flat beyond the measured rows
    cached, streamed = 4 * 256 * 512, 4 * 8192 * 2048  # MATMUL_CACHED_WEIGHT, MATMUL_WEIGHT (fp32)
    assert row_rate(hw, 4, cached) == 6e9 and row_rate(hw, 4, 100) == 6e9
    assert row_rate(hw, 4, streamed) == 4e9 and row_rate(hw, 4, 10 * streamed) == 4e9
    assert row_rate(hw, 4, math.sqrt(cached * streamed)) == pytest.approx(5e9)  # geometric middle
    assert row_rate(PROFILES["H100-SXM"], 4, 1e6) == PROFILES["H100-SXM"].matmul_flops  # presets: no rates


def test_eager_attention_and_cpu_roofline_by_hand():
    hw = HardwareProfile("toy", 1e10, 1e11, graphs=False, eager_op_overhead_s=1e-6,
                         matmul_rate_by_rows=((1, 1e9), (16, 4e9)), eager_score_cost=((1e3, 1e-9), (1e5, 3e-9)))
    cost = StepCost(bytes=5e6, flops=3e9, attn_bytes=1e6, attn_flops=1e9, n_layers=2, rows=1, attn_rows=4,
                    score_elems=2500.0)  # 10^4 bytes of scores: halfway in log between 1e3 and 1e5
    attention = 1e9 / 2.5e9 + 2 * 2500 * 2e-9  # rate at 4 rows: halfway in log(rows) between 1 and 16
    assert eager_attention_time(cost, hw) == pytest.approx(attention)
    linear = 2e9 / 1e9  # (flops - attn_flops) at the 1-row rate
    assert roofline_time(cost, hw) == pytest.approx(linear + attention + overhead_time(cost, hw))
    # Graph steps (fused kernel) keep the attention roofline; the linear layers keep the row rate.
    roof = max(1e6 / 1e10, 1e9 / 1e11)
    assert roofline_time(cost, hw, graphs=True) == pytest.approx(linear + roof + overhead_time(cost, hw, True))


def count_ops(fn) -> int:
    """aten ops `fn` dispatches under inference mode, at the top level (views included), as the
    engine's eager steps run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))
    with torch.inference_mode(), Count() as count:
        fn()
    return count.n


def test_eager_op_count_matches_forward_step():
    from gpt_fast_magicdec import random_model
    from gpt_fast_magicdec.steps import StepSpec, forward_step

    for layers in (1, 3):
        args = dataclasses.replace(ModelArgs.from_preset("tiny"), n_layers=layers)
        model = random_model(args, torch.device("cpu"), torch.float32)
        model.setup_caches(2, 512, torch.float32, torch.device("cpu"))
        for n in (1, 4):
            tokens, cache_len = torch.zeros(2, n, dtype=torch.long), torch.full((2,), 100)
            count = count_ops(lambda: forward_step(model, StepSpec("target", n, greedy=False), tokens, cache_len,
                                                   kv_limit=256))
            assert count == layers * EAGER_OPS[0] + EAGER_OPS[1], (layers, n, count)


def test_score_pass_op_count_matches_the_reference():
    # _score_pass_cost subtracts SCORE_PASS_OPS fixed op costs from its timing of masked_softmax_.
    from gpt_fast_magicdec.kernels.reference import masked_softmax_

    scores, mask = torch.randn(2, 2, 8, 16), torch.rand(2, 1, 4, 16) < 0.5
    assert count_ops(lambda: masked_softmax_(scores, mask, 0.5)) == SCORE_PASS_OPS


def test_predict_times_kv_bucket():
    t = predict_times(TINY_L3, H100, 2, 300, 3, 64, dtype_bytes=4, kv_bucket=256)
    assert t.target == decode_step_cost(TINY_L3, 2, 300, 1, 4, kv_bucket=256)
    assert t.verify == decode_step_cost(TINY_L3, 2, 300, 4, 4, kv_bucket=256)
    assert t.draft == decode_step_cost(TINY_L3, 2, 300, 1, 4, kv_tokens=64)  # sparse view: not bucketed


def test_validation_script_runs_on_cpu(tmp_path, monkeypatch):
    # benchmarks/validate_cost_model.py on one model of its CPU sweep: a row per shape with a
    # prediction, a measurement and an error, and the command and commit beside them. Each step runs
    # once (a stand-in for time_steps reports 1 ms): no timing is asserted.
    import sys

    from benchmarks import validate_cost_model

    def run_once(steps, device):
        for step in steps.values():
            step()
        return dict.fromkeys(steps, (1e-3, 0.0))
    out = tmp_path / "validation.md"
    monkeypatch.setattr(sys, "argv", ["validate_cost_model", "--models", "tiny", "--out", str(out)])
    monkeypatch.setattr(validate_cost_model, "time_steps", run_once)
    threads = torch.get_num_threads()
    try:
        validate_cost_model.main()
    finally:
        torch.set_num_threads(threads)  # main() times with one thread
    text = out.read_text()
    assert "`python -m benchmarks.validate_cost_model --models tiny --out" in text and "commit `" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| tiny | ")]
    rows = [row for row in rows if len(row) == 11]  # the step table's rows, not the summary's
    assert len(rows) == 8  # batches (1, 8) x contexts (256, 2048) x T (1, 4)
    for row in rows:
        predicted, measured = float(row[7]), float(row[8])
        assert predicted > 0 and measured == 1.0


# ---- models of 2025-26: Qwen3, sliding-window targets ----------------------------------------------
def test_param_counts_of_qwen3_and_mistral_v01_match_their_model_cards():
    # Qwen3: per-head q/k norms (2 x 128 per layer), head_dim 128 independent of the width.
    assert param_count(ModelArgs.from_preset("qwen3-0.6b")) == 596_049_920  # tied head
    assert param_count(ModelArgs.from_preset("qwen3-8b")) == 8_190_735_360
    assert param_count(ModelArgs.from_preset("mistral-7b-v0.1")) == 7_241_732_096


MISTRAL_V01 = ModelArgs.from_preset("mistral-7b-v0.1")  # every layer: the last 4096 keys
UNWINDOWED = dataclasses.replace(MISTRAL_V01, sliding_window=None)


def test_a_sliding_window_bounds_the_targets_kv_read():
    """Past its window a windowed target's step costs the same at any context; before it, the same
    as the unwindowed model. A mix (layer_types) pays the window on its sliding layers only."""
    H200 = get_profile("H200")
    at = {ctx: decode_step_cost(MISTRAL_V01, 64, ctx, 4) for ctx in (2048, 4096, 8192, 32768)}
    assert at[2048].attn_bytes == decode_step_cost(UNWINDOWED, 64, 2048, 4).attn_bytes
    assert at[4096].attn_bytes == at[8192].attn_bytes == at[32768].attn_bytes
    assert decode_step_cost(UNWINDOWED, 64, 32768, 4).attn_bytes > 7 * at[32768].attn_bytes
    half = dataclasses.replace(MISTRAL_V01, layer_types=("sliding_attention", "full_attention") * 16)
    kv_tok = kv_bytes_per_token(MISTRAL_V01, 2)
    assert decode_step_cost(half, 1, 32768, 1).attn_bytes == (32768 + 4096) / 2 * kv_tok + kv_tok
    # So speculation pays less: with the same draft and acceptance, a windowed target at 32K is
    # predicted a smaller speedup, and its best gamma is no larger.
    windowed = best_gamma(MISTRAL_V01, H200, 64, 32768, alpha=0.8, budget=512)
    full = best_gamma(UNWINDOWED, H200, 64, 32768, alpha=0.8, budget=512)
    assert 1.0 < windowed[1] < full[1] and windowed[0] <= full[0]


# ---- a re-selecting draft view (pillar) ---------------------------------------------------------------
def test_reselect_is_priced_as_a_key_reread_plus_the_score_passes():
    from gpt_fast_magicdec.cost_model import RESELECT_SCORE_PASSES, reselect_cost

    B, S, gamma = 8, 32768, 3
    cost = reselect_cost(LLAMA3_8B, B, S, gamma)
    verify = decode_step_cost(LLAMA3_8B, B, S, gamma + 1)
    k_read = B * S * kv_bytes_per_token(LLAMA3_8B) / 2
    assert k_read == pytest.approx((verify.attn_bytes - B * (gamma + 1) * kv_bytes_per_token(LLAMA3_8B)) / 2)
    assert cost.bytes == k_read + B * S * 8 * 32 * 4 * RESELECT_SCORE_PASSES
    assert cost.flops == verify.attn_flops / 2  # q.k again, no p.v
    # at 32K the mass pass is about half of verification's KV read: ~0.5 of the verify time at most
    times = predict_times(LLAMA3_8B, H100, B, S, gamma, 512, reselect_every=1)
    assert 0.3 < times.T_R / times.T_V < 0.6


def test_reselecting_less_often_costs_less_and_tends_to_the_fixed_view():
    from gpt_fast_magicdec.cost_model import predicted_speedup

    fixed = predict_times(LLAMA3_8B, H100, 32, 16384, 3, 512)
    speedups = [predicted_speedup(predict_times(LLAMA3_8B, H100, 32, 16384, 3, 512, reselect_every=n), 3, 0.8)
                for n in (1, 3, 100)]
    assert speedups[0] < speedups[1] < speedups[2] < predicted_speedup(fixed, 3, 0.8)
    assert speedups[2] == pytest.approx(predicted_speedup(fixed, 3, 0.8), rel=0.01)
    # --gamma auto prices it per gamma: never a better speedup than the same alpha with a fixed view
    g_fixed, s_fixed = best_gamma(LLAMA3_8B, H100, 32, 16384, 0.8, 512)
    g_dyn, s_dyn = best_gamma(LLAMA3_8B, H100, 32, 16384, 0.8, 512, reselect_every=lambda g: max(1, round(8 / g)))
    assert s_dyn < s_fixed and g_dyn >= 1
