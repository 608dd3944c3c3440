"""Engine-level behaviour: chunked ragged prefill, batching independence, bookkeeping."""
import pytest
import torch
import transformers

from convert.convert_hf_checkpoint import convert_hf_checkpoint
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.engine import Engine, load_model, random_model
from gpt_fast_magicdec.errors import UserError
from hf_fixtures import make_hf_checkpoint


@pytest.mark.parametrize("chunk", [7, 16, 64])  # several chunks, chunk <= 16 uses the decode path
def test_chunked_ragged_prefill_matches_transformers(tmp_path, chunk):
    hf_dir = make_hf_checkpoint(tmp_path / "hf", "qwen2", fmt="safetensors", seed=5)
    model = load_model(convert_hf_checkpoint(hf_dir, tmp_path / "engine"), "cpu", torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    lens = [45, 9, 30]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(model.args.vocab_size, (n,), generator=g) for n in lens]
    tokens = torch.zeros(3, max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    model.setup_caches(3, 64)
    last = Engine(model, attention="torch").prefill(model, tokens, torch.tensor(lens), chunk, progress=False)
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
    from gpt_fast_magicdec.drafting import DraftConfig
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
    from gpt_fast_magicdec.drafting import DraftConfig

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
