"""The decode steps compile as one graph each (torch.compile(..., fullgraph=True) makes a graph break
an error): dynamo's explain finds none in any step the engine captures, on the torch path."""
import copy

import pytest
import torch

from gpt_fast_magicdec import Engine, random_model
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.sampling import SamplingParams
from gpt_fast_magicdec.steps import StepGraphs, forward_step
from test_engine import FakePool, FakeStep

DRAFTS = [DraftConfig(kind="self", budget=16, sink=4, gamma=3),
          DraftConfig(kind="self", kv="snapkv", budget=16, window=8, gamma=2),
          DraftConfig(kind="model", kv="streaming", budget=16, sink=4, gamma=2),
          DraftConfig(kind="model", kv="full", gamma=4),
          DraftConfig(kind="lookup+self", kv="recent", budget=12, gamma=3),
          DraftConfig(kind="self", kv="pillar", budget=16, window=8, gamma=3, reselect=1)]  # + scoring verifications


def captured_steps():
    """Every Step the engine captures for the drafts above, greedy and sampled, on CPU with the
    capture replaced by FakeStep (which runs the step as the graph would)."""
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = Engine(model, draft_model=copy.deepcopy(model), attention="torch")
    engine.runner.use_graphs = True
    engine.runner.graphs = StepGraphs(capture=FakeStep, new_pool=FakePool)
    steps = {}  # a sampled run with a longer verification grows the logits buffer: all re-captured
    for draft in DRAFTS:
        for sampling in (SamplingParams(), SamplingParams(temperature=0.8)):
            engine.generate([[1, 2, 3, 4, 5, 6], [7, 8, 9]], 6, sampling, draft)
            steps.update(engine.graphs.captured)
    unique = {}  # one step per spec (and scoring or not): the others differ only in which buffers they read
    for step in steps:
        unique.setdefault((step.spec, step.scores is not None), step)
    return list(unique.values()), engine


@pytest.mark.slow
def test_every_captured_step_is_one_graph():
    steps, engine = captured_steps()
    specs = {s.spec for s in steps}
    assert any(s.scores is not None for s in steps)
    assert len(specs) >= 10 and {s.role for s in specs} == {"target", "draft"}
    assert {s.greedy for s in specs} == {True, False} and {s.n_tokens for s in specs} >= {1, 2, 3, 4, 5}
    B = 2
    for step in steps:
        tokens = torch.zeros(B, step.spec.n_tokens, dtype=torch.long)
        cache_len = torch.full((B,), 5)
        for kv_limit in (None, 256):  # as graphed on a GPU, and as an eager CPU step bucketed to 256 keys
            with torch.no_grad():  # as the engine runs every step
                report = torch._dynamo.explain(forward_step)(step.model, step.spec, tokens, cache_len, step.selection,
                                                              "torch", kv_limit, step.scores)
            assert report.graph_break_count == 0, (step.spec, report.break_reasons)
            assert report.graph_count == 1, step.spec
            torch._dynamo.reset()
