"""--gamma auto: the cost model picks gamma (or plain decoding) as the context grows."""
import types

import pytest

import torch

from gpt_fast_magicdec.autogamma import AutoGamma
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import PROFILES
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec import Engine, random_model


def fake_state(batch, context, accepted=0, rounds=0):
    return types.SimpleNamespace(accepted=torch.tensor([accepted]), rounds=torch.tensor([rounds]),
                                 done=torch.zeros(batch, dtype=torch.bool),
                                 cache_len=torch.full((batch,), context))


def controller(alpha=0.8):
    draft = DraftConfig(kind="self", budget=512, sink=16, gamma=3)
    return AutoGamma(ModelArgs.from_preset("llama-3.1-8b"), PROFILES["H100-SXM"], draft, dtype_bytes=2,
                     prior_alpha=alpha)


def test_plain_decoding_at_short_context_speculation_at_long_context():
    assert controller()(fake_state(256, 512), 0) == 0  # short context, huge batch: no gain predicted
    assert controller()(fake_state(32, 32768), 0) >= 2  # long context: the bounded draft pays


def test_redecides_as_context_grows_and_uses_measured_acceptance():
    ctl = controller(alpha=0.8)
    choices = [ctl(fake_state(64, ctx), i * ctl.every) for i, ctx in enumerate([256, 1024, 8192, 65536])]
    assert choices[0] == 0 and choices[-1] > 0, choices
    # Every draft rejected for a while: the estimate drops and speculation switches off again.
    ctl2 = controller(alpha=0.8)
    ctl2(fake_state(32, 32768), 0)
    for r in range(1, 6):
        ctl2(fake_state(32, 32768, accepted=0, rounds=100 * r), r * ctl2.every)
    assert ctl2.alpha < 0.15 and ctl2.gamma == 0  # once off, alpha waits for the next probe


def test_auto_gamma_generation_is_lossless():
    """Greedy output is unchanged whatever gamma each round uses (including 0)."""
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 40))]
    engine = Engine(model, attention="torch")
    baseline = engine.generate(prompts, 40).tokens
    draft = DraftConfig(kind="self", budget=16, sink=4, gamma=3)

    class Scripted:  # a GammaController that replays a fixed sequence
        choices = frozenset({0, 1, 2, 3, 4})
        sequence = iter([3, 0, 1, 4, 2] * 20)

        def __call__(self, state, round_idx):
            return next(self.sequence)

    result = engine.generate(prompts, 40, draft=draft, gamma_controller=Scripted())
    assert result.tokens == baseline


def test_controller_reused_across_generate_calls_restarts_its_counters():
    """generate.py reuses one controller for every --bsz batch; each call's counters start at zero."""
    ctl = controller(alpha=0.8)
    ctl(fake_state(32, 32768), 0)
    ctl(fake_state(32, 32768, accepted=270, rounds=100), ctl.every)  # 3.7 tokens per round at gamma 3+
    first = ctl.alpha
    ctl(fake_state(32, 32768), 0)  # the next batch
    ctl(fake_state(32, 32768, accepted=270, rounds=100), ctl.every)
    assert first > 0.7 and abs(ctl.alpha - first) < 0.1, (first, ctl.alpha)


def test_choices_cover_every_gamma_the_controller_returns():
    """The engine captures a verification graph per element of `choices` and no others."""
    ctl = controller(alpha=0.8)
    assert ctl.choices == frozenset(range(0, 9))
    narrow = AutoGamma(ModelArgs.from_preset("llama-3.1-8b"), PROFILES["H100-SXM"],
                       DraftConfig(kind="self", budget=20, sink=16, gamma=3), dtype_bytes=2)
    assert narrow.choices == frozenset(range(0, 5))  # the 4-key window bounds gamma
    seen = set()
    for i, (batch, ctx) in enumerate([(256, 512), (64, 4096), (32, 32768), (8, 131072)] * 20):
        seen.add(ctl(fake_state(batch, ctx, accepted=0 if i > 40 else 3 * i, rounds=i), i * ctl.every))
    assert seen <= ctl.choices and len(seen) > 1, seen


def test_statistics_are_read_in_one_transfer(monkeypatch):
    """A decision reads accepted, rounds, running and context with one device-to-host copy."""
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or original(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a scalar read"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: pytest.fail("a scalar read"), raising=False)
    ctl = controller()
    ctl(fake_state(32, 32768), 0)
    assert reads == [torch.Size([4])]


def _standalone_controller(every=2):
    """--gamma auto pricing a Llama-3.1-8B target with a Llama-3.2-1B draft on an H100: a draft step
    costs a fraction of a target step, so speculation pays from the first round (the engine below
    runs tiny models; the controller only reads acceptance and lengths from it)."""
    draft = DraftConfig(kind="model", kv="full", gamma=3)
    return AutoGamma(ModelArgs.from_preset("llama-3.1-8b"), PROFILES["H100-SXM"], draft, dtype_bytes=2,
                     draft_args=ModelArgs.from_preset("llama-3.2-1b"), prior_alpha=0.7, every=every), draft


def test_auto_gamma_speculates_where_the_cost_model_says_it_pays():
    import copy

    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 40))]
    plain = Engine(model, attention="torch").generate(prompts, 40).tokens
    ctl, draft = _standalone_controller()
    result = Engine(model, draft_model=copy.deepcopy(model), attention="torch").generate(
        prompts, 40, draft=draft, gamma_controller=ctl)
    assert result.tokens == plain
    assert all(g > 0 for _, _, _, g in ctl.history) and result.stats.acceptance_rate == 1.0
    assert ctl.alpha > 0.9  # it measured the draft's perfect acceptance


def test_auto_gamma_switches_speculation_off_mid_run_when_drafts_fail():
    import copy

    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    anti = copy.deepcopy(model)
    with torch.no_grad():
        anti.output.weight.neg_()  # its argmax is the target's argmin: never accepted
    prompts = [[1, 2, 3, 4, 5], list(range(7, 40))]
    plain = Engine(model, attention="torch").generate(prompts, 60).tokens
    ctl, draft = _standalone_controller()
    result = Engine(model, draft_model=anti, attention="torch").generate(prompts, 60, draft=draft,
                                                                        gamma_controller=ctl)
    assert result.tokens == plain
    gammas = [g for _, _, _, g in ctl.history]
    assert gammas[0] > 0 and 0 in gammas, gammas  # speculated first, then decoded plainly
    assert result.stats.drafted > 0 and result.stats.accepted == 0
