"""The re-selecting draft view (`pillar`): the attention mass verification emits, the top-K the
policy takes from it, how often the drafter asks for it, and the option's checks and CLI.
Losslessness is tested with every other strategy (test_speculative, test_job, test_sampling,
test_model_families, test_tp); the Triton twin of the mass is tests/test_attention_mass.py."""
import types
import warnings

import pytest
import torch
from click.testing import CliRunner

from gpt_fast_magicdec import Engine, random_model
from gpt_fast_magicdec.cli import generate
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.errors import ParameterError
from gpt_fast_magicdec.kernels import decode_attention_reference
from gpt_fast_magicdec.policies import POLICIES
from gpt_fast_magicdec.policies.pillar import Pillar

PILLAR = POLICIES["pillar"]


def explicit_mass(q, k, cache_len, sliding_window=None):
    """The attention mass per (b, h_kv, position), one softmax at a time: the definition."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H // H_kv
    mass = torch.zeros(B, H_kv, S)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                p = int(cache_len[b]) + t
                lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
                scores = (k[b, h // G, lo:p + 1] @ q[b, h, t]) * D ** -0.5
                mass[b, h // G, lo:p + 1] += torch.softmax(scores, dim=0)
    return mass


@pytest.mark.parametrize("sliding_window, kv_limit", [(None, None), (None, 32), (6, None)])
def test_reference_mass_is_the_attention_each_position_received(sliding_window, kv_limit):
    torch.manual_seed(0)
    B, H, H_kv, T, D, S = 3, 4, 2, 3, 16, 40
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H_kv, S, D), torch.randn(B, H_kv, S, D)
    cache_len = torch.tensor([0, 9, 25])
    mass = torch.full((B, H_kv, S), 7.0)  # stale values must all be overwritten
    out = decode_attention_reference(q, k, v, cache_len, scale=D ** -0.5, kv_limit=kv_limit,
                                     sliding_window=sliding_window, mass_out=mass)
    expected = explicit_mass(q, k, cache_len, sliding_window)
    torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.full((B, H_kv), float(H // H_kv * T)))  # rows sum to 1
    assert (mass[2, :, 25 + T:] == 0).all() and (mass[0, :, T:] == 0).all()
    plain = decode_attention_reference(q, k, v, cache_len, scale=D ** -0.5, kv_limit=kv_limit,
                                       sliding_window=sliding_window)
    assert torch.equal(out, plain)  # scoring changes nothing of the attention itself
    # ... and the check can fail: another cache length gives another mass
    other = torch.zeros_like(mass)
    decode_attention_reference(q, k, v, cache_len + 1, scale=D ** -0.5, mass_out=other)
    assert not torch.allclose(other, expected, atol=1e-3)


def test_a_sparse_view_does_not_score():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="full view"):
        decode_attention_reference(q, k, k, torch.tensor([4]), scale=0.25, sel_pos=torch.zeros(1, 1, 0, dtype=torch.long),
                                   window=2, mass_out=torch.zeros(1, 1, 8))


def view(budget, window, pool_kernel=1):
    """What Pillar.reselect reads of a DraftConfig."""
    return types.SimpleNamespace(n_selected=budget - window, view_window=window, pool_kernel=pool_kernel)


def test_reselect_takes_the_heaviest_positions_before_the_window():
    S, cache_len = 64, torch.tensor([50])
    mass = torch.rand(1, 2, S) * 0.1
    mass[0, 0, [3, 17, 30, 40]] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    mass[0, 0, 45] = 9.0  # inside the next draft's window (50 - 8 < 45): the view shows it anyway
    mass[0, 1, [1, 2]] = 8.0
    sel = PILLAR.reselect(mass, view(budget=12, window=8), cache_len)  # 4 selected slots
    assert sel.shape == (1, 2, 4)
    assert sel[0, 0].tolist() == [3, 17, 30, 40]  # ascending, window position 45 left out
    assert {1, 2} <= set(sel[0, 1].tolist()) and (sel[0, 1] <= 50 - 8).all()
    assert sel[0, 1].unique().numel() == 4  # distinct, as the sparse view requires


def test_reselect_gives_a_short_context_the_positions_after_it():
    """Fewer eligible positions than slots: every one is picked, and the spare slots take the next
    positions, which become visible as they leave the window (a budget covering the context)."""
    mass = torch.rand(2, 1, 32)
    sel = PILLAR.reselect(mass, view(budget=12, window=8), torch.tensor([10, 31]))
    assert sel[0, 0].tolist() == [0, 1, 2, 3]  # cache_len 10: positions 0..2 eligible, then 3
    assert sel[1, 0].unique().numel() == 4 and (sel[1, 0] <= 31 - 8).all()
    near_end = PILLAR.reselect(mass, view(budget=12, window=8), torch.tensor([0, 30]))
    assert near_end[0, 0].tolist() == [-1, -1, -1, -1] or (near_end[0, 0] < 32).all()


def test_pooling_keeps_the_neighbours_of_a_spike():
    mass = torch.full((1, 1, 40), 0.5)
    mass[0, 0, 20] = 10.0  # one spike; every other position is equal before pooling
    raw = PILLAR.reselect(mass, view(budget=11, window=8, pool_kernel=1), torch.tensor([39]))
    pooled = PILLAR.reselect(mass, view(budget=11, window=8, pool_kernel=3), torch.tensor([39]))
    assert 20 in raw[0, 0].tolist()
    assert pooled[0, 0].tolist() == [19, 20, 21]


def test_reselect_keeps_leading_dimensions():
    mass = torch.rand(5, 2, 3, 48)  # [layers, B, H_kv, S]
    sel = PILLAR.reselect(mass, view(budget=16, window=8, pool_kernel=7), torch.tensor([40, 20]))
    assert sel.shape == (5, 2, 3, 8)
    one = PILLAR.reselect(mass[2], view(budget=16, window=8, pool_kernel=7), torch.tensor([40, 20]))
    assert torch.equal(sel[2], one)


def tiny_engine(seed=0):
    return Engine(random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=seed), attention="torch")


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(512, (n,), generator=g).tolist() for n in (30, 47)]


@pytest.mark.parametrize("reselect, gamma", [(1, 3), (2, 3), (None, 4)])
def test_verification_scores_every_n_rounds(monkeypatch, reselect, gamma):
    calls = []
    real = Pillar.reselect

    def counting(self, mass, config, cache_len):
        calls.append(cache_len.clone())
        return real(self, mass, config, cache_len)

    monkeypatch.setattr(Pillar, "reselect", counting)
    engine = tiny_engine()
    draft = DraftConfig(kind="self", kv="pillar", budget=16, window=8, gamma=gamma, reselect=reselect)
    result = engine.generate(prompts(), 40, draft=draft)
    every = reselect or round(8 / gamma)
    assert draft.reselect_every == every
    assert len(calls) == result.stats.rounds // every > 0
    drafter = engine.drafter(draft)
    G_T = engine.model.args.n_heads // engine.model.args.n_kv_heads * (gamma + 1)
    # every layer of the last scoring verification wrote its mass: each query's row sums to 1
    torch.testing.assert_close(drafter.scores.sum(-1), torch.full(drafter.scores.shape[:3], float(G_T)))
    # the drafter's buffers hold the last re-selection (the captured draft steps read them)
    expected = real(PILLAR, drafter.scores, draft, calls[-1])
    if result.stats.rounds % every == 0:
        assert torch.equal(drafter._selected, expected)


def test_a_budget_covering_the_context_accepts_every_draft():
    """Re-selection with the whole context in budget must keep showing the draft everything."""
    engine = tiny_engine(seed=5)
    draft = DraftConfig(kind="self", kv="pillar", budget=128, gamma=4, reselect=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = engine.generate(prompts(), 40, draft=draft)
    assert result.stats.acceptance_rate == 1.0
    assert result.tokens == tiny_engine(seed=5).generate(prompts(), 40).tokens


def test_reselect_option_checks():
    assert DraftConfig(kind="self", kv="pillar", budget=64).reselect_every == 3  # round(8 / 3)
    assert DraftConfig(kind="self", kv="pillar", budget=64).reselect_every_at(8) == 1
    assert DraftConfig(kind="self", kv="snapkv", budget=64).reselect_every is None
    assert "re-selected every 2 rounds" in DraftConfig(kind="self", kv="pillar", budget=64, reselect=2).describe()
    with pytest.raises(ParameterError, match="re-selecting"):
        DraftConfig(kind="self", kv="streaming", budget=64, reselect=2)
    with pytest.raises(ParameterError, match="positive"):
        DraftConfig(kind="self", kv="pillar", budget=64, reselect=0)


def test_cli_reselect(tmp_path):
    args = ["--random-weights", "tiny", "--prompt-length", 40, "--max-new-tokens", 8, "--draft", "self",
            "--draft-budget", 16, "--gamma", 2, "--no-progress"]
    ok = CliRunner().invoke(generate.main, [str(a) for a in args + ["--draft-kv", "pillar", "--reselect", 2]])
    assert ok.exit_code == 0, ok.output
    assert "re-selected every 2 rounds" in ok.output
    ignored = CliRunner().invoke(generate.main, [str(a) for a in args + ["--reselect", 2, "--sink", 2]])
    assert ignored.exit_code == 0, ignored.output
    assert "notice: --reselect is ignored with --draft-kv streaming" in ignored.output
    bad = CliRunner().invoke(generate.main, [str(a) for a in args + ["--draft-kv", "pillar", "--reselect", 0]])
    assert bad.exit_code != 0 and "error: --reselect must be a positive number of rounds" in bad.output
