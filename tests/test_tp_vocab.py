"""The vocabulary-parallel output head under tensor parallelism: each rank computes only
its slice of the logits; greedy combines (max, index) pairs, sampling gathers the full logits.

One `torchrun --nproc_per_node 2` launch runs this file as a driver on CPU (gloo). Each rank builds
the same random full model, computes the single-process reference itself, then shards the model
and generates again; the test compares the two, token for token, greedy and sampled, for an odd
vocabulary (uneven shards) with tied embeddings and an even one without.
"""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from test_tp import launch

pytestmark = pytest.mark.slow  # a torchrun launch

CASES = {  # name -> (vocab, tied embeddings)
    "odd_vocab_tied": (509, True),
    "even_vocab_untied": (512, False),
}


def checkpoint_layout(model) -> dict:
    """The model's state dict as a checkpoint stores it (q, k, v apart), which tp.shard slices."""
    args, out = model.args, {}
    sizes = [args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
    for name, t in model.state_dict().items():
        if name.endswith("attention.wqkv.weight"):
            for x, part in zip("qkv", t.split(sizes)):
                out[name.replace("wqkv", f"w{x}")] = part
        else:
            out[name] = t
    return out


def _generate_all(engine, prompts) -> dict:
    from gpt_fast_magicdec.drafting import DraftConfig
    from gpt_fast_magicdec.sampling import SamplingParams

    draft = DraftConfig(kind="self", budget=8, sink=2, gamma=3)
    sampled = SamplingParams(temperature=0.9, top_k=50)
    out = {}
    for name, kwargs in {"greedy_plain": {}, "greedy_speculative": {"draft": draft},
                         "sampled_plain": {"sampling": sampled},
                         "sampled_speculative": {"sampling": sampled, "draft": draft}}.items():
        torch.manual_seed(5)
        out[name] = engine.generate(prompts, 16, **kwargs).tokens
    return out


def _shard_checks(vocab: int, rank: int, group) -> dict:
    """VocabShard against torch on full logits, including ties across a shard boundary."""
    from gpt_fast_magicdec.tp import VocabShard

    shard = VocabShard.plan(vocab, rank, 2, group)
    full = torch.randn(3, 4, vocab, generator=torch.Generator().manual_seed(0))  # [B, T, V]
    boundary = vocab // 2  # rank 1's first row
    full[0, 0, [3, boundary + 1]] = 50.0  # a tie across ranks: the lower index wins
    full[0, 1, [boundary - 1, boundary]] = 50.0  # a tie straddling the boundary
    local = full[..., shard.start:shard.start + shard.size]
    return {"argmax": torch.equal(shard.argmax(local), full.argmax(dim=-1)),
            "gather": torch.equal(shard.gather(local), full)}


def _driver(out_dir: str) -> None:
    import torch.distributed as dist

    from gpt_fast_magicdec.config import ModelArgs
    from gpt_fast_magicdec import Engine, random_model
    from gpt_fast_magicdec.checkpoint import model_from_state_dict
    from gpt_fast_magicdec.tp import start

    torch.set_num_threads(1)
    _, tp = start("cpu")
    results = {}
    for name, (vocab, tied) in CASES.items():
        args = dataclasses.replace(ModelArgs.from_preset("tiny"), vocab_size=vocab, tie_word_embeddings=tied)
        full = random_model(args, "cpu", torch.float32, seed=3)
        with torch.no_grad():
            for pname, p in full.named_parameters():
                if "norm" not in pname:
                    p.mul_(6.0)  # peaked logits: drafts are sometimes right
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(vocab, (n,), generator=g).tolist() for n in (5, 23)]
        single = _generate_all(Engine(full, attention="torch"), prompts)
        local_args, state_dict = tp.target.shard(args, checkpoint_layout(full))
        sharded = tp.target.parallelize(model_from_state_dict(local_args, state_dict, "cpu", torch.float32))
        shard_rows = sharded.output.weight.shape[0]
        if tied:
            shares = sharded.output.weight.untyped_storage().data_ptr() == \
                sharded.tok_embeddings.weight.untyped_storage().data_ptr()
        else:
            shares = None
        results[name] = {"single": single, "tp": _generate_all(Engine(sharded, attention="torch", tp=tp), prompts),
                         "shard_rows": shard_rows, "head_is_embedding_view": shares,
                         **_shard_checks(vocab, tp.rank, dist.group.WORLD)}
    Path(out_dir, f"rank{tp.rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_vocab")
    run = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  __file__, out])
    assert run.returncode == 0, run.stdout + run.stderr
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_vocab_parallel_head_is_token_exact(ranks, case):
    vocab, tied = CASES[case]
    assert [r[case]["shard_rows"] for r in ranks] == [vocab // 2, vocab - vocab // 2]  # no rank holds it all
    for rank, r in enumerate(ranks):
        res = r[case]
        assert res["argmax"] and res["gather"], f"rank {rank}: VocabShard differs from torch on full logits"
        if tied:
            assert res["head_is_embedding_view"], f"rank {rank}: the tied head slice was copied"
        for mode, tokens in res["single"].items():
            assert res["tp"][mode] == tokens, f"rank {rank}, {mode}: TP output differs from single process"


if __name__ == "__main__":
    _driver(sys.argv[1])
