"""Speculative sampling emits tokens with the target's own distribution (statistical test)."""
import dataclasses

import pytest
import torch

from gpt_fast_magicdec import speculative
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec import Engine, random_model
from gpt_fast_magicdec.sampling import TARGET_STREAM, SamplingParams, logits_to_probs, sample_from_probs
from tools.tiny_model.causal import causal_logits

VOCAB = 16
N = 6000  # independent sequences, run as one batch
PROMPT = [3, 1, 4, 1, 5]
TV_BOUND = 0.06  # E[TV] ~ 0.02 at N=6000 over 16 cells; P(TV > bound) < exp(-2 N 0.04^2) ~ 1e-8


def tiny_model(seed):
    args = dataclasses.replace(ModelArgs.from_preset("tiny"), vocab_size=VOCAB)
    model = random_model(args, "cpu", torch.float32, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)  # sharper distributions: the draft's q differs visibly from p
    return model


def exact_marginals(model, params):
    """Exact distributions of emitted tokens 2 and 3 under plain sampling from the target."""
    with torch.no_grad():
        p1 = logits_to_probs(causal_logits(model, torch.tensor([PROMPT]))[0, -1], params)  # [V]
        ctx2 = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        p2_given = logits_to_probs(causal_logits(model, ctx2)[:, -1], params)  # [V(t1), V(t2)]
        ctx3 = torch.tensor([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        p3_given = logits_to_probs(causal_logits(model, ctx3)[:, -1], params).view(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2_given  # [t1, t2]
    return joint12.sum(0), (joint12[:, :, None] * p3_given).sum((0, 1))


def empirical(tokens, index):
    counts = torch.bincount(torch.tensor([t[index] for t in tokens]), minlength=VOCAB).float()
    return counts / counts.sum()


def always_accept(proposal, target_logits, params, state):
    """A broken rule: keep every draft token. Its output follows the draft, not the target."""
    drafts = proposal.tokens
    p = logits_to_probs(target_logits, params)
    bonus = sample_from_probs(p[:, -1], state.keys, state.cache_len + drafts.shape[1] + 1, TARGET_STREAM)
    n = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long)
    return n, torch.cat([drafts, bonus[:, None]], dim=1)


# A standalone draft with its full cache, and a self-draft that re-selects its keys after every
# round: with gamma 1 the third token of a row that rejected its first draft is drafted through a
# selection taken from the first round's verification.
SAMPLED_DRAFTS = {"model-full": DraftConfig(kind="model", kv="full", gamma=2),
                  "self-pillar": DraftConfig(kind="self", kv="pillar", budget=2, window=1, gamma=1, reselect=1)}


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=10, top_p=0.9)])
@pytest.mark.parametrize("name", SAMPLED_DRAFTS)
def test_speculative_sampling_matches_target_distribution(params, name, monkeypatch):
    draft = SAMPLED_DRAFTS[name]
    target = tiny_model(0)
    exact2, exact3 = exact_marginals(target, params)
    engine = Engine(target, draft_model=tiny_model(1) if draft.kind == "model" else None, attention="torch")

    result = engine.generate([PROMPT] * N, 3, params, draft, seed=0)
    assert 0.05 < result.stats.acceptance_rate < 0.95  # drafts really are being rejected and resampled
    tv2 = 0.5 * (empirical(result.tokens, 1) - exact2).abs().sum()
    tv3 = 0.5 * (empirical(result.tokens, 2) - exact3).abs().sum()
    assert tv2 < TV_BOUND and tv3 < TV_BOUND, (tv2, tv3)

    monkeypatch.setattr(speculative, "accept_sampling", always_accept)
    broken = engine.generate([PROMPT] * N, 3, params, draft, seed=0)
    broken_tv = max(0.5 * (empirical(broken.tokens, i) - e).abs().sum() for i, e in ((1, exact2), (2, exact3)))
    assert broken_tv > 2 * TV_BOUND, broken_tv


def test_plain_sampling_matches_target_distribution():
    """The same yardstick on plain decoding, so a bias in the test itself would show here too."""
    params = SamplingParams(temperature=1.0)
    target = tiny_model(0)
    exact2, _ = exact_marginals(target, params)
    tokens = Engine(target, attention="torch").generate([PROMPT] * N, 2, params, seed=1).tokens
    assert 0.5 * (empirical(tokens, 1) - exact2).abs().sum() < TV_BOUND


def test_top_p_top_k_warps():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (probs[0, 3:] == 0).all() and probs[0, :3].sum() == pytest.approx(1.0)
    full = logits.softmax(-1)[0]
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    keep = int((full.cumsum(0) - full < 0.7).sum())  # tokens whose preceding mass is below top_p
    assert (probs[0, :keep] > 0).all() and (probs[0, keep:] == 0).all()
