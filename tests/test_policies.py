"""The KV selection policy registry, and `recent` as the example of adding a static policy."""
import copy

import pytest
import torch

from gpt_fast_magicdec import drafters
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec import Engine
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.policies import POLICIES, SPARSE_POLICIES, policy_help
from test_speculative import NEW, baseline, prompts, target  # noqa: F401 - the fixtures


def test_registry_is_the_list_of_choices_and_help():
    assert {"streaming", "snapkv", "recent", "full"} <= set(POLICIES)
    assert "full" not in SPARSE_POLICIES and "recent" in SPARSE_POLICIES
    assert all(p.name == name and p.help for name, p in POLICIES.items())
    assert all(f"{name}:" in policy_help() for name in POLICIES)
    with pytest.raises(UserError, match="^kv must be one of"):  # the Python API names its parameter
        DraftConfig(kind="self", kv="h2o")


def test_full_cache_is_a_named_policy():
    named = DraftConfig(kind="model", kv="full")
    assert named.full and named.view_window is None and named.n_selected == 0
    assert named.describe() == "standalone model, full cache, gamma 3"
    with pytest.raises(UserError, match="standalone draft"):
        DraftConfig(kind="self", kv="full")
    with pytest.raises(UserError, match="^budget must be positive"):  # the CLI's -1 spelling is the CLI's
        DraftConfig(kind="model", budget=-1)


def test_recent_reads_a_window_of_the_whole_budget():
    cfg = DraftConfig(kind="self", kv="recent", budget=16, gamma=3)
    assert (cfg.view_window, cfg.n_selected) == (16, 0)
    with pytest.raises(UserError, match="must equal budget"):
        DraftConfig(kind="self", kv="recent", budget=16, window=8)
    assert DraftConfig(kind="self", kv="recent", gamma=3).for_context(40).budget == 12  # 4 * gamma


@pytest.mark.parametrize("gamma", [1, 4])
def test_recent_is_lossless(target, baseline, gamma):
    draft = DraftConfig(kind="self", kv="recent", budget=16, gamma=gamma)
    result = Engine(target, attention="torch").generate(prompts(), NEW, draft=draft)
    assert result.tokens == baseline
    assert 0 < result.stats.acceptance_rate < 1  # a 16-key window over 48+ tokens: a real draft


def test_recent_proposes_what_streaming_without_sinks_proposes(target, monkeypatch):
    """recent reads only its window: the same keys as a streaming view with sink 0."""
    proposals = {}
    step = drafters.ModelDrafter.run_step

    def recording(self, tokens, cache_len, greedy):
        out = step(self, tokens, cache_len, greedy)
        proposals.setdefault(self.config.kv, []).append(out.clone())
        assert all(sel.shape[-1] == 0 for sel in self.selection)  # no selected keys, window only
        return out

    monkeypatch.setattr(drafters.ModelDrafter, "run_step", recording)
    for kv, sink in (("recent", 16), ("streaming", 0)):
        draft = DraftConfig(kind="self", kv=kv, budget=12, sink=sink, gamma=3)
        Engine(target, attention="torch").generate(prompts(), NEW, draft=draft)
    assert len(proposals["recent"]) == len(proposals["streaming"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(proposals["recent"], proposals["streaming"]))


def test_every_sparse_policy_drives_a_standalone_draft(target, baseline):
    for kv in SPARSE_POLICIES:
        draft = DraftConfig(kind="model", kv=kv, budget=16, sink=4, gamma=2)
        engine = Engine(target, draft_model=copy.deepcopy(target), attention="torch")
        assert engine.generate(prompts(), NEW, draft=draft).tokens == baseline, kv
