"""The Triton attention mass (kernels/attention_mass.py) against its reference twin, the mass
`decode_attention_reference(..., mass_out=)` writes (itself checked against an explicit softmax in
test_pillar.py). On CPU under Triton's interpreter (tests/conftest.py), on a GPU compiled."""
from __future__ import annotations

import pytest
import torch

from gpt_fast_magicdec.kernels import decode_attention_reference as reference

pytest.importorskip("triton", reason="triton is not installed")
from gpt_fast_magicdec.kernels import decode_attention as KMOD  # noqa: E402  (after the skip: it imports triton)
from test_kernels import DEVICE, S_MAX, TOL, make_inputs  # noqa: E402

MASS_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (B, H, H_kv, T, D, cache_len per sequence, the layer's sliding window)
CASES = [
    (1, 4, 4, 1, 64, [37], None),  # MHA, one token
    (3, 8, 2, 4, 64, [0, 19, 100], None),  # GQA 4, ragged, an empty cache
    (2, 8, 8, 4, 32, [70, 9], 16),  # a sliding layer narrower than the context
    (2, 4, 1, 3, 96, [120, 33], None),  # G 4, head_dim 96 (padded tile), the cache nearly full
]


def masses(q, k, v, cache_len, num_splits, sliding_window, dtype=torch.float32):
    B, H_kv = k.shape[:2]
    scale = q.shape[-1] ** -0.5
    got = torch.full((B, H_kv, S_MAX), 7.0, device=DEVICE)  # stale values must all be overwritten
    ref = torch.zeros(B, H_kv, S_MAX, device=DEVICE)
    out = KMOD.decode_attention_triton(q, k, v, cache_len, scale=scale, num_splits=num_splits,
                                       sliding_window=sliding_window, mass_out=got)
    plain = KMOD.decode_attention_triton(q, k, v, cache_len, scale=scale, num_splits=max(2, num_splits or 2),
                                         sliding_window=sliding_window)
    reference(q, k, v, cache_len, scale=scale, sliding_window=sliding_window, mass_out=ref)
    return got, ref, out, plain


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}T{c[3]}D{c[4]}w{c[6]}")
def test_mass_matches_the_reference(case, num_splits):
    B, H, H_kv, T, D, lens, window = case
    q, k, v, cache_len = make_inputs(B, H, H_kv, T, D, lens)
    got, ref, out, plain = masses(q, k, v, cache_len, num_splits, window)
    torch.testing.assert_close(got, ref, **MASS_TOL[torch.float32])
    G = H // H_kv
    torch.testing.assert_close(got.sum(-1), torch.full((B, H_kv), float(G * T), device=DEVICE), atol=1e-4, rtol=1e-5)
    for b, n in enumerate(lens):
        assert (got[b, :, n + T:] == 0).all()  # nothing past the live length, stale 7.0s included
        if window is not None:
            assert (got[b, :, :max(0, n - window + 1)] == 0).all()  # nor before the layer's window
    torch.testing.assert_close(out, plain)  # scoring leaves the attention itself as it was


def test_mass_bf16():
    q, k, v, cache_len = make_inputs(2, 8, 2, 4, 64, [50, 11], dtype=torch.bfloat16)
    got, ref, out, plain = masses(q, k, v, cache_len, None, None)
    torch.testing.assert_close(got, ref, **MASS_TOL[torch.bfloat16])
    torch.testing.assert_close(out.float(), reference(q, k, v, cache_len, scale=64 ** -0.5).float(),
                               **TOL[torch.bfloat16])


def test_the_comparison_can_fail():
    """A mass computed for other cache lengths does not pass for these."""
    q, k, v, cache_len = make_inputs(3, 8, 2, 4, 64, [0, 19, 100])
    got, _, _, _ = masses(q, k, v, cache_len, 2, None)
    wrong = torch.zeros_like(got)
    reference(q, k, v, cache_len + 1, scale=64 ** -0.5, mass_out=wrong)
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_sparse_view_refuses_mass():
    q, k, v, cache_len = make_inputs(1, 4, 2, 1, 64, [40])
    sel = torch.zeros(1, 2, 0, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="full view"):
        KMOD.decode_attention_triton(q, k, v, cache_len, scale=0.125, sel_pos=sel, window=8,
                                     mass_out=torch.zeros(1, 2, S_MAX, device=DEVICE))


def test_engine_pillar_with_the_triton_kernel():
    """A pillar self-draft through the Triton path (scoring verification included) gives the
    target's greedy tokens and the same selections as the torch path."""
    from gpt_fast_magicdec import Engine, random_model
    from gpt_fast_magicdec.config import ModelArgs
    from gpt_fast_magicdec.drafting import DraftConfig

    model = random_model(ModelArgs.from_preset("tiny"), DEVICE, torch.float32, seed=0)
    prompts = [list(range(3, 40)), list(range(100, 121))]
    draft = DraftConfig(kind="self", kv="pillar", budget=16, window=8, gamma=2, reselect=1)
    by_backend = {}
    for backend in ("torch", "triton"):
        engine = Engine(model, attention=backend)
        tokens = engine.generate(prompts, 10, draft=draft).tokens
        by_backend[backend] = (tokens, engine.drafter(draft)._selected.clone())
    assert by_backend["triton"][0] == by_backend["torch"][0] == Engine(model, attention="torch").generate(prompts, 10).tokens
    assert torch.equal(by_backend["triton"][1], by_backend["torch"][1])
