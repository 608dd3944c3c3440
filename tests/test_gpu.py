"""Checks that need a CUDA device: CUDA graphs, compiled Triton kernels, bf16 numerics.

Run them with `python -m pytest -m gpu` on a GPU machine; elsewhere they skip. Each test builds
its own tiny random model, so any one of them can run alone (`-k name`).
"""
import copy

import pytest
import torch

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec import Engine, random_model
from gpt_fast_magicdec.steps import CapturedStep, StepSpec, forward_step
from gpt_fast_magicdec.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DRAFT = DraftConfig(kind="self", budget=16, sink=4, gamma=3)


def tiny(dtype=torch.float32, seed=0, sharp=True):
    """A tiny random model on the GPU; `sharp` scales the weights so drafts are sometimes right."""
    model = random_model(ModelArgs.from_preset("tiny"), "cuda", dtype, seed=seed)
    if sharp:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.mul_(6.0)
    return model


def draft_spec(n_tokens, greedy=True):
    """The StepSpec of a draft step through DRAFT's sparse view."""
    return StepSpec("draft", n_tokens, DRAFT.view_window, DRAFT.n_selected, last_only=True, greedy=greedy)


def prompts(lens=(5, 41, 23), vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lens]


# ---- graph replay equals eager -------------------------------------------------------------------
@pytest.mark.parametrize("role, n_tokens", [("verify", DRAFT.gamma + 1), ("draft", 1), ("draft", 2)])
def test_captured_step_replay_equals_eager(role, n_tokens):
    """One captured step (not compiled, so the same kernels run both ways) replayed on new inputs
    gives bit-identical logits to the eager step on those inputs."""
    model = tiny()
    B, S = 3, 256 + 16
    model.setup_caches(B, S, torch.float32, "cuda")
    for layer in model.layers:  # a populated cache, so attention reads real values
        layer.attention.kv_cache.k_cache.normal_()
        layer.attention.kv_cache.v_cache.normal_()
    spec, selected = StepSpec("target", n_tokens, greedy=False), None
    if role == "draft":
        spec = draft_spec(n_tokens, greedy=False)
        selected = [torch.arange(DRAFT.sink, device="cuda").expand(B, model.args.n_kv_heads, -1).contiguous()
                    for _ in range(model.args.n_layers)]

    def step(tokens, cache_len):
        return forward_step(model, spec, tokens, cache_len, selected, "torch")

    graph = CapturedStep(step, B, n_tokens, S - 16, "cuda", torch.cuda.graph_pool_handle(),
                         torch.empty(B, n_tokens, model.args.vocab_size, device="cuda"))
    tokens = torch.randint(512, (B, n_tokens), device="cuda")
    cache_len = torch.tensor([7, 100, 200], device="cuda")
    replayed = graph(tokens, cache_len).clone()
    eager = step(tokens, cache_len)
    assert torch.equal(replayed, eager), f"max abs difference {(replayed - eager).abs().max().item():.3e}"


def test_graphed_generation_equals_eager_generation():
    """The whole loop with captured steps (greedy and sampled, self and standalone drafts) gives the
    tokens of the same loop run eagerly."""
    model = tiny()
    graphed = Engine(model, draft_model=copy.deepcopy(model), compile=False, use_graphs=True)
    eager = Engine(model, draft_model=copy.deepcopy(model), compile=False, use_graphs=False)
    sampled = SamplingParams(temperature=0.8, top_k=50)
    for draft in (DRAFT, DraftConfig(kind="model", budget=16, sink=4, gamma=3)):
        for sampling in (SamplingParams(), sampled):
            outs = []
            for engine in (graphed, eager):
                outs.append(engine.generate(prompts(), 24, sampling, draft, seed=3).tokens)
            assert outs[0] == outs[1], f"graphs differ from eager for {draft.describe()}, {sampling}"


# ---- re-setup after a shape change ------------------------------------------------------------------
def test_recapture_after_batch_and_length_changes():
    """A second shape must not capture into a freed private pool (it once asserted). Batch 2, then
    3, then 2 again across a 256-token boundary, each equal to the same steps run eagerly."""
    model = tiny()
    graphed = Engine(model, compile=False, use_graphs=True)
    eager = Engine(model, compile=False, use_graphs=False)
    pools = []
    for lens, new in [((5, 41), 16), ((5, 41, 23), 16), ((5, 41), 300)]:
        p = prompts(lens)
        got, expected = graphed.generate(p, new, draft=DRAFT).tokens, eager.generate(p, new, draft=DRAFT).tokens
        assert got == expected, f"prompts of {lens} tokens, {new} new: graphs differ from eager"
        assert {s.spec for s in graphed.graphs.captured} == {StepSpec("target", DRAFT.gamma + 1), draft_spec(1)}
        pools.append(graphed.graphs.pool)
    assert len(set(pools)) == 3, f"each new shape should capture into a fresh pool, got {pools}"


def test_one_host_sync_per_round():
    """A round is gamma + 1 graph launches and one device-to-host read (the done flags)."""
    from gpt_fast_magicdec.profiling import profile_rounds

    engine = Engine(tiny(), compile=False, use_graphs=True)
    counts = profile_rounds(engine, prompts(), DRAFT, short=4, extra=8)
    assert counts["graph_launches"] == DRAFT.gamma + 1, counts
    assert counts["host_syncs"] <= 1 and counts["dtoh_copies"] == 1, counts


# ---- bf16: speculative vs plain under the near-tie rule ---------------------------------------------
def test_bf16_speculative_equals_plain_up_to_near_ties():
    """The production path (compiled, graphed, Triton attention, bf16): greedy speculative output
    is plain output, or diverges only where the target's top-2 logits are a near-tie."""
    from gpt_fast_magicdec.lossless import compare_greedy

    model = tiny(torch.bfloat16)
    engine = Engine(model)
    p = prompts((5, 41, 23, 300))
    plain = engine.generate(p, 48).tokens
    spec = engine.generate(p, 48, draft=DRAFT).tokens
    report = compare_greedy(engine, p, plain, spec)
    assert report.ok, "\n".join(report.lines)


def test_lm_head_is_fp32_without_upcasting_the_weight():
    """torch >= 2.8 on CUDA: bf16 x bf16 -> fp32 matmul; the logits are fp32 and close to fp64."""
    from gpt_fast_magicdec.model import logits_fp32, probe_fp32_matmul

    assert probe_fp32_matmul("cuda"), f"torch {torch.__version__} has no fp32-output bf16 matmul on CUDA"
    x = torch.randn(4, 3, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16)
    out = logits_fp32(x, w)
    compiled = torch.compile(logits_fp32)(x, w)
    exact = x.double() @ w.double().T
    assert out.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(compiled, out, atol=1e-3, rtol=1e-4)


# ---- kernels and SnapKV on the device ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, sparse", [(1, False), (4, False), (1, True), (2, True)])
def test_triton_matches_reference_on_device(dtype, T, sparse):
    pytest.importorskip("triton", reason="triton is not installed")
    from gpt_fast_magicdec.kernels import decode_attention_reference, decode_attention_triton

    g = torch.Generator(device="cuda").manual_seed(T)
    B, H, H_kv, S, D = 3, 8, 2, 1024, 128
    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(B, H_kv, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    cache_len = torch.tensor([0, 300, S - T], device="cuda")
    kw = {}
    if sparse:
        kw = dict(window=32, sel_pos=torch.randint(0, 300, (B, H_kv, 16), device="cuda", generator=g))
    ref = decode_attention_reference(q, k, v, cache_len, scale=D ** -0.5, **kw)
    out = decode_attention_triton(q, k, v, cache_len, scale=D ** -0.5, **kw)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_snapkv_votes_in_bf16_track_fp32():
    """Chunked scoring in the cache dtype: votes within bf16 noise of the fp32 computation."""
    from gpt_fast_magicdec.policies.snapkv import attention_votes

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 32, 128, device="cuda", generator=g)
    k = torch.randn(2, 2, 5000, 128, device="cuda", generator=g)
    cache_len = torch.tensor([4000, 4968], device="cuda")
    exact = attention_votes(q, k, cache_len, 5000, chunk=5000)
    low = attention_votes(q.bfloat16(), k.bfloat16(), cache_len, 5000, chunk=1024)
    torch.testing.assert_close(low, exact, atol=2e-2, rtol=5e-2)


# ---- the compiled steps are single graphs on the Triton path ------------------------------------------
def test_triton_steps_compile_without_graph_breaks():
    """The engine compiles its steps with fullgraph=True: on the Triton path (the CUDA default) a
    graph break would be an error at capture time. dynamo's explain finds none in verification and
    draft steps, full and sparse views, greedy and sampled."""
    pytest.importorskip("triton", reason="triton is not installed")
    model = tiny(torch.bfloat16)
    B = 3
    model.setup_caches(B, 256 + 16, torch.bfloat16, "cuda")
    selected = [torch.arange(DRAFT.sink, device="cuda").expand(B, model.args.n_kv_heads, -1).contiguous()
                for _ in range(model.args.n_layers)]
    specs = [(StepSpec("target", n, greedy=g), None) for n in (1, DRAFT.gamma + 1) for g in (True, False)]
    specs += [(draft_spec(n, greedy=g), selected) for n in (1, 2) for g in (True, False)]
    for spec, sel in specs:
        tokens = torch.zeros(B, spec.n_tokens, dtype=torch.long, device="cuda")
        cache_len = torch.tensor([7, 100, 200], device="cuda")
        report = torch._dynamo.explain(forward_step)(model, spec, tokens, cache_len, sel, "triton")
        assert report.graph_break_count == 0, (spec, report.break_reasons)
        torch._dynamo.reset()
