"""Engine-level behaviour: chunked ragged prefill, batching independence, bookkeeping."""
import pytest
import torch
import transformers

from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec import Engine, load_model, random_model
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.sampling import SamplingParams
from gpt_fast_magicdec.steps import CAPTURE_SCRATCH, StepGraphs, StepSpec, copy_into_shared
from gpt_fast_magicdec.errors import UserError
from hf_fixtures import make_hf_checkpoint


@pytest.mark.parametrize("chunk", [7, 16, 64])  # several chunks, chunk <= 16 uses the decode path
def test_chunked_ragged_prefill_matches_transformers(tmp_path, chunk):
    from gpt_fast_magicdec.prefill import prefill

    hf_dir = make_hf_checkpoint(tmp_path / "hf", "qwen2", fmt="safetensors", seed=5)
    model = load_model(convert_hf_checkpoint(hf_dir, tmp_path / "engine"), "cpu", torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    lens = [45, 9, 30]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(model.args.vocab_size, (n,), generator=g) for n in lens]
    tokens = torch.zeros(3, max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    model.setup_caches(5, 64)
    rows = torch.tensor([4, 0, 2])  # into chosen rows of a bigger cache, as a refill does
    last = prefill(model, tokens, torch.tensor(lens), "torch", chunk, rows=rows)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            expected = hf(p[None]).logits[0, -1]
            torch.testing.assert_close(last[b], expected, atol=2e-4, rtol=1e-4)


def test_ragged_batch_equals_each_prompt_alone():
    model = random_model(ModelArgs.from_preset("tiny-llama3"), "cpu", torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(512, (n,), generator=g).tolist() for n in (3, 37, 12, 20)]
    engine = Engine(model, attention="torch")
    together = engine.generate(prompts, 16, prefill_chunk=8).tokens
    alone = [engine.generate([p], 16, prefill_chunk=8).tokens[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 16 for t in together)


def test_first_token_eos_and_limit_one():
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = Engine(model, attention="torch")
    first = engine.generate([[5, 6, 7], [8, 9]], 1).tokens
    assert [len(t) for t in first] == [1, 1]
    out = engine.generate([[5, 6, 7], [8, 9]], 10, eos_ids=[first[0][0]])
    assert out.tokens[0] == first[0] and len(out.tokens[1]) >= 1
    assert out.stats.latency_s[0] <= out.stats.latency_s[1]


def test_prompt_too_long_is_user_error():
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    with pytest.raises(UserError, match="does not fit max_seq_len 20"):
        Engine(model, attention="torch").generate([[1] * 15], 10, max_seq_len=20)
    with pytest.raises(UserError, match="at least one token"):
        Engine(model, attention="torch").generate([[]], 10)


def test_profile_rounds_compares_exact_round_counts():
    """Forced rejection makes every round emit one token, so the two runs differ by `extra` rounds."""
    from gpt_fast_magicdec.profiling import profile_rounds

    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    draft = DraftConfig(kind="self", budget=8, sink=2, gamma=2)
    counts = profile_rounds(Engine(model, attention="torch"), [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], draft,
                            short=4, extra=6)
    assert counts["rounds_compared"] == 6 and counts["gamma"] == 2
    assert counts["host_syncs"] == 0.0  # CPU: nothing to synchronise with


def test_plain_and_speculative_runs_share_one_cache():
    """--compare and bench switch draft configs on one engine: the KV cache (most of the memory at
    long context) is reused, not reallocated, and outputs stay exact."""

    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = Engine(model, attention="torch")
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    plain = engine.generate(prompts, 12).tokens
    cache = model.layers[0].attention.kv_cache.k_cache
    for draft in (DraftConfig(kind="self", budget=8, sink=2, gamma=2),
                  DraftConfig(kind="self", kv="snapkv", budget=8, window=4, gamma=3)):
        assert engine.generate(prompts, 12, draft=draft).tokens == plain
        assert model.layers[0].attention.kv_cache.k_cache is cache
    engine.generate(prompts, 600)  # a longer run needs a bigger cache: reallocated
    assert model.layers[0].attention.kv_cache.k_cache is not cache


def test_cache_bytes_is_what_generate_allocates():
    """bench asks the engine how big a cache will be instead of re-deriving the slot rule."""
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = Engine(model, draft_model=random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32),
                    attention="torch")
    assert engine.cache_slots(1) == engine.cache_slots(256) == 256 + CAPTURE_SCRATCH
    engine.generate([[1, 2, 3]], 300)
    allocated = sum(layer.attention.kv_cache.k_cache.nbytes * 2 for m in (model, engine.draft_model)
                    for layer in m.layers)
    assert allocated == engine.cache_bytes(1, 3 + 300 + 1)  # prompt + new tokens + one round's room
    assert engine.why_not_fits(1, 10**6) is None  # 4 GB of caches for this tiny model: fits
    assert "KV cache for 10 slots" in engine.why_not_fits(10, 10**9)  # beyond any RAM: said before allocating


class FakeStep:
    """Stands in for CapturedStep on CPU: runs the step eagerly but keeps its contract (its output
    is one static buffer, rewritten by every replay; sampling logits land in the shared buffer and
    are valid until the next step) and records its pool."""

    def __init__(self, step, batch, n_tokens, scratch_pos, device, pool, logits):
        self.step, self.pool, self.logits, self.copy = step, pool, logits, copy_into_shared
        self.output = None

    def __call__(self, tokens, cache_len):
        out = self.step(tokens, cache_len)
        if self.output is None:
            self.output = torch.empty_like(out)
        self.output.copy_(out)  # as a replay rewrites the graph's output in place
        return self.copy(self.output, self.logits)


class FakePool:
    """A graph pool handle that can be garbage collected, so a test can see it released."""


def draft_spec(draft, n_tokens, greedy=True):
    """The StepSpec of a self-draft step through `draft`'s sparse view."""
    return StepSpec("draft", n_tokens, draft.view_window, draft.n_selected, last_only=True, greedy=greedy)


def graph_engine(model):
    engine = Engine(model, attention="torch")
    engine.runner.use_graphs = True  # the graph path, with the capture replaced by FakeStep
    engine.runner.graphs = StepGraphs(capture=FakeStep, new_pool=FakePool)
    return engine


def captured_specs(engine):
    return sorted((s.spec for s in engine.graphs.captured), key=repr)


def test_graph_pool_is_released_with_the_graphs_on_resetup():
    """A new (batch, seq_len) drops every captured step *and* their pool, so the next capture never
    goes into a pool whose graphs are gone; a second draft view keeps both and adds its own step."""
    import gc
    import weakref

    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = graph_engine(model)
    draft = DraftConfig(kind="self", budget=8, sink=2, gamma=2)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    first = engine.generate(prompts, 10, draft=draft).tokens
    TARGET_3, DRAFT_1 = StepSpec("target", 3), draft_spec(draft, 1)
    assert captured_specs(engine) == sorted([TARGET_3, DRAFT_1], key=repr)
    pool = weakref.ref(engine.graphs.pool)
    target_graph = next(g for s, g in engine.graphs.captured.items() if s.spec == TARGET_3)
    # Another draft view, same cache shape: its drafter captures its own step into the same pool;
    # the target's graph and the first drafter's are kept (a sweep alternates between them).
    other = DraftConfig(kind="self", budget=10, sink=2, gamma=2)
    engine.generate(prompts, 10, draft=other)
    assert captured_specs(engine) == sorted([TARGET_3, DRAFT_1, draft_spec(other, 1)], key=repr)
    assert next(g for s, g in engine.graphs.captured.items() if s.spec == TARGET_3) is target_graph
    assert engine.graphs.pool is pool()
    del target_graph
    # A third prompt (another batch size): everything re-captured into a fresh pool, the old one freed.
    third = engine.generate(prompts + [[4, 4, 4]], 10, draft=draft).tokens
    gc.collect()
    assert pool() is None, "the old graph pool outlived its graphs"
    assert {step.pool for step in engine.graphs.captured.values()} == {engine.graphs.pool}
    eager = Engine(model, attention="torch")
    assert first == eager.generate(prompts, 10).tokens == third[:2]


def test_sampling_through_graph_steps_sharing_one_logits_buffer_equals_eager():
    """Every sampling step's logits go through one shared buffer, reused by the next step; the
    draws must be exactly those of eager steps with fresh tensors (same seed)."""
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    draft = DraftConfig(kind="self", budget=8, sink=2, gamma=3)
    params = SamplingParams(temperature=0.8, top_k=50)
    graphed = graph_engine(model)
    outputs = [engine.generate([[1, 2, 3, 4, 5, 6], [7, 8, 9]], 12, params, draft, seed=11).tokens
               for engine in (graphed, Engine(model, attention="torch"))]
    assert outputs[0] == outputs[1]
    assert graphed.graphs.logits.shape == (2, 4, 512)  # [B, gamma + 1, V]: one buffer for all steps
    assert captured_specs(graphed) == sorted([StepSpec("target", 4, greedy=False), draft_spec(draft, 1, greedy=False)],
                                             key=repr)


def test_kv_bucket_keeps_tokens_exact_and_shapes_stable(monkeypatch):
    """Eager steps attend over a key range rounded up to a bucket. Outputs do not depend
    on the bucket, and with a 256-key bucket a short run sees one key range, not one per step."""
    from gpt_fast_magicdec.steps import bucketed_kv_limit

    assert bucketed_kv_limit(torch.tensor([3, 300]), 4, 1000, 256) == 512
    assert bucketed_kv_limit(torch.tensor([900]), 4, 1000, 256) == 1000  # capped at the cache
    assert bucketed_kv_limit(torch.tensor([7]), 2, 1000, 1) == 9
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=1)
    draft = DraftConfig(kind="self", budget=8, sink=2, gamma=2)
    prompts = [[1, 2, 3, 4, 5, 6], list(range(10, 40))]
    results = {}
    for bucket in (1, 256):
        engine = Engine(model, attention="torch", kv_bucket=bucket)
        limits = set()
        step = engine.runner.step_fn
        engine.runner.step_fn = lambda *a: limits.add(a[6]) or step(*a)  # a[6]: kv_limit
        results[bucket] = (engine.generate(prompts, 20, draft=draft).tokens, engine.generate(prompts, 20).tokens)
        assert (len(limits) == 1) == (bucket == 256), limits
    assert results[1] == results[256]
    assert results[1][0] == results[1][1]


def test_drafts_survive_the_replays_that_follow_them():
    """A captured step returns its graph's static output buffer, which the next replay rewrites:
    drafts held as views of it would all read the last draft. With graphs emulated faithfully, a
    draft that is the target itself must still be accepted every time."""
    import copy

    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    for draft in (DraftConfig(kind="model", kv="full", gamma=3), DraftConfig(kind="self", budget=128, sink=4, gamma=3)):
        engine = graph_engine(model)
        engine.draft_model = copy.deepcopy(model)
        stats = engine.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], 20, draft=draft).stats
        assert stats.acceptance_rate == 1.0, (draft.kind, stats.acceptance_rate)
