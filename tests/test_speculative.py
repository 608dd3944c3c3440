"""Speculative decoding is lossless (greedy: token for token) and its drafts are good."""
import copy
import warnings

import pytest
import torch

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec import Engine, random_model

PROMPT_LENS = (5, 41, 23)  # ragged
NEW = 48  # with budget 16 the generation runs far past the draft budget


def sharp_model(seed=0, **overrides):
    """A random tiny model whose logits are peaked enough that drafts are sometimes right."""
    model = random_model(ModelArgs.from_preset("tiny", **overrides) if overrides else ModelArgs.from_preset("tiny"),
                         "cpu", torch.float32, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(6.0)
    return model


def prompts(vocab=512, lens=PROMPT_LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def target():
    return sharp_model()


@pytest.fixture(scope="module")
def baseline(target):
    return Engine(target, attention="torch").generate(prompts(), NEW).tokens


STRATEGIES = {
    "self-streaming": lambda g: DraftConfig(kind="self", kv="streaming", budget=16, sink=4, gamma=g),
    "self-snapkv": lambda g: DraftConfig(kind="self", kv="snapkv", budget=16, window=8, gamma=g),
    "model-streaming": lambda g: DraftConfig(kind="model", kv="streaming", budget=16, sink=4, gamma=g),
    "model-snapkv": lambda g: DraftConfig(kind="model", kv="snapkv", budget=16, window=8, gamma=g),
    "model-full": lambda g: DraftConfig(kind="model", kv="full", gamma=g),
    # re-selected every round and every other round (the default for gamma 4 is 2)
    "self-pillar": lambda g: DraftConfig(kind="self", kv="pillar", budget=16, window=8, gamma=g, reselect=1),
    "model-pillar": lambda g: DraftConfig(kind="model", kv="pillar", budget=16, window=8, gamma=g),
}


def engine_for(target, draft: DraftConfig, draft_model=None):
    if draft.kind == "model" and draft_model is None:
        draft_model = sharp_model(seed=7)  # a different model: partial acceptance
    return Engine(target, draft_model=draft_model if draft.kind == "model" else None, attention="torch")


@pytest.mark.parametrize("gamma", [1, 4])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_greedy_speculative_equals_autoregressive(target, baseline, strategy, gamma):
    draft = STRATEGIES[strategy](gamma)
    result = engine_for(target, draft).generate(prompts(), NEW, draft=draft)
    assert result.tokens == baseline
    assert result.stats.drafted > 0 and result.stats.acceptance_rate is not None


def test_self_speculation_draft_quality_and_partial_acceptance(target):
    """Acceptance is reported; a budget-limited draft of a peaked model accepts some, not all."""
    draft = STRATEGIES["self-streaming"](3)
    stats = engine_for(target, draft).generate(prompts(), NEW, draft=draft).stats
    assert 0.0 < stats.acceptance_rate < 1.0
    assert 1.0 < stats.mean_accepted_per_round < 4.0


@pytest.mark.parametrize("kv", ["streaming", "snapkv"])
@pytest.mark.parametrize("seed", [0, 5])
def test_budget_covering_context_accepts_everything(kv, seed):
    """With the whole context in budget the sparse view IS the full view, so every draft token must
    be accepted, even with random weights. A draft with wrongly rotated keys or a mis-masked
    window stays lossless but fails this."""
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=seed)
    draft = DraftConfig(kind="self", kv=kv, budget=128, sink=4, gamma=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Engine(model, attention="torch").generate(prompts(), 40, draft=draft)
    assert result.stats.acceptance_rate == 1.0
    assert result.tokens == Engine(model, attention="torch").generate(prompts(), 40).tokens


def test_every_draft_accepted_with_identical_standalone_draft(target, baseline):
    """The target as its own full-cache standalone draft: all accepted (exercises the 2-token
    first draft step that catches up the token the draft never ran)."""
    draft = DraftConfig(kind="model", kv="full", gamma=4)
    result = Engine(target, draft_model=copy.deepcopy(target), attention="torch").generate(prompts(), NEW, draft=draft)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.mean_accepted_per_round == pytest.approx(5.0, abs=0.6)  # last rounds are cut by the limit
    assert result.tokens == baseline


def test_no_draft_accepted_with_adversarial_draft(target, baseline):
    """A draft whose argmax is the target's argmin never matches; output is still exact."""
    anti = copy.deepcopy(target)
    with torch.no_grad():
        anti.output.weight.neg_()
    draft = DraftConfig(kind="model", kv="full", gamma=3)
    result = Engine(target, draft_model=anti, attention="torch").generate(prompts(), NEW, draft=draft)
    assert result.stats.accepted == 0
    assert result.stats.mean_accepted_per_round == 1.0
    assert result.tokens == baseline


def truncate_at(tokens, eos, limit):
    out = []
    for t in tokens[:limit]:
        out.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("strategy", ["self-streaming", "model-full"])
def test_sequences_stop_at_different_steps(target, baseline, strategy):
    """Per-sequence EOS and per-sequence limits: nothing is emitted past a stop."""
    eos = baseline[1][9]  # a token sequence 1 emits at step 10; others may hit it elsewhere or never
    limits = [7, 30, NEW]
    expected = [truncate_at(baseline[b], eos, limits[b]) for b in range(3)]
    assert len({len(e) for e in expected}) == 3, "fixture should stop each sequence at a different step"
    draft = STRATEGIES[strategy](3)
    result = engine_for(target, draft).generate(prompts(), limits, draft=draft, eos_ids=[eos])
    plain = Engine(target, attention="torch").generate(prompts(), limits, eos_ids=[eos])
    assert plain.tokens == expected
    assert result.tokens == expected


def test_generation_longer_than_budget_keeps_window_sliding(target):
    """Hundreds of tokens past a 16-key budget: the window slides, never overflows."""
    p = prompts(lens=(30, 9))
    draft = DraftConfig(kind="self", kv="snapkv", budget=16, window=8, gamma=3)
    plain = Engine(target, attention="torch").generate(p, 200).tokens
    assert engine_for(target, draft).generate(p, 200, draft=draft).tokens == plain


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["streaming", "snapkv"])
def test_triton_kernels_inside_the_engine(target, kv):
    """--attention triton: verify and draft steps run the kernels, same output. Interpreted on CPU;
    on a CUDA machine the kernels run compiled and need CUDA tensors, so the model moves there (fp32:
    the kernel's dots are IEEE fp32, no TF32)."""
    pytest.importorskip("triton", reason="triton is not installed")
    model = copy.deepcopy(target).to("cuda") if torch.cuda.is_available() else target
    p = prompts(lens=(20, 7))
    draft = DraftConfig(kind="self", kv=kv, budget=8, sink=2, window=None if kv == "streaming" else 4, gamma=2)
    eager = dict(compile=False, use_graphs=False)  # the same eager steps on either device
    engine = Engine(model, attention="triton", **eager)
    assert engine.backend == "triton"
    result = engine.generate(p, 6, draft=draft)
    assert result.tokens == Engine(model, attention="torch", **eager).generate(p, 6).tokens


@pytest.mark.slow
def test_compiled_steps_match_eager(target):
    """torch.compile'd forward_step (what CUDA graphs capture on GPU) gives the same output."""
    p = prompts(lens=(20, 7))
    draft = STRATEGIES["self-snapkv"](3)
    compiled = Engine(target, attention="torch", compile=True).generate(p, 12, draft=draft)
    assert compiled.tokens == Engine(target, attention="torch").generate(p, 12).tokens
