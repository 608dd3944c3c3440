"""Tensor parallelism on CPU: 2 gloo processes must produce the single-process output, token for token.

Launching Python processes is the slow part here, so the distributed checks share few launches:
  * one real `torchrun --nproc_per_node 2 generate.py` (self-speculation with --compare, so the
    plain-decoding pass is checked too) on a target whose one KV head is replicated on both ranks;
  * one real torchrun launch with a one-head model, which must fail on every rank, once, no hang;
  * one torchrun launch of this file as a driver (see `_driver`) that invokes generate.py's CLI
    several times in the same process group: standalone drafts (over all ranks, over a strict
    subset with --draft-ranks, greedy and sampled) and the failure modes, recording every rank's
    exit code and output.
The sharding planner is tested directly for world sizes that would need more processes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from processes import LAUNCH_TIMEOUT_S, launch

pytestmark = pytest.mark.slow  # process launches: torchrun, 2-4 gloo ranks

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400
PROMPTS = ["--prompt", "The old house", "--prompt", "A letter came today, and it said"]
COMMON = [*PROMPTS, "--bsz", "2", "--max-new-tokens", "12", "--no-progress"]


# ---- the sharding planner ------------------------------------------------------------------------
def test_plan_splits_or_replicates_kv_heads_and_keeps_the_gqa_mapping():
    from gpt_fast_magicdec.config import ModelArgs
    from gpt_fast_magicdec.tp import plan_shards

    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, intermediate_size=64, vocab_size=16)
    split = [plan_shards(args, 2, r) for r in range(2)]
    assert [(p.q_heads, p.kv_heads, p.kv_replicas) for p in split] == [
        (range(0, 4), range(0, 1), 1), (range(4, 8), range(1, 2), 1)]
    replicated = [plan_shards(args, 4, r) for r in range(4)]
    assert [p.kv_heads for p in replicated] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    for p in split + replicated:  # every local query head reads its own KV head (GQA h -> h // 4)
        local = p.local_args
        assert local.head_dim == args.head_dim and local.intermediate_size == 64 // p.world_size
        for j, h in enumerate(p.q_heads):
            assert p.kv_heads[j // (local.n_heads // local.n_kv_heads)] == h // 4


@pytest.mark.parametrize("world, needle", [(8, "4 query heads, which 8 ranks"), (3, "4 query heads, which 3 ranks")])
def test_plan_refuses_query_heads_that_do_not_divide(world, needle):
    from gpt_fast_magicdec.config import ModelArgs
    from gpt_fast_magicdec.errors import UserError
    from gpt_fast_magicdec.tp import plan_shards

    with pytest.raises(UserError, match=needle) as err:
        plan_shards(ModelArgs.from_preset("tiny"), world)
    assert "valid sizes for the model: 1, 2, 4" in str(err.value) and "\n" not in str(err.value)


def test_plan_refuses_kv_heads_neither_split_nor_replicated():
    from gpt_fast_magicdec.config import ModelArgs
    from gpt_fast_magicdec.errors import UserError
    from gpt_fast_magicdec.tp import plan_shards

    args = ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=3, head_dim=8, intermediate_size=48, vocab_size=16)
    with pytest.raises(UserError, match="3 KV heads: 2 ranks can neither split"):
        plan_shards(args, 2)
    assert plan_shards(args, 6).kv_replicas == 2 and plan_shards(args, 3).kv_replicas == 1


@pytest.mark.parametrize("text, needle", [("0,2", "rank 2 is outside the world of 2"), ("1,1", "names a rank twice"),
                                          ("", "comma-separated"), ("a", "comma-separated"), ("-1", "rank -1")])
def test_draft_ranks_are_validated(text, needle):
    from gpt_fast_magicdec.errors import UserError
    from gpt_fast_magicdec.tp import parse_draft_ranks

    with pytest.raises(UserError, match=needle):
        parse_draft_ranks(text, 2)
    assert parse_draft_ranks("1,0", 2) == (0, 1) and parse_draft_ranks(None, 3) == (0, 1, 2)


# ---- end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Converted tiny checkpoints sharing one SentencePiece vocabulary, 4 query heads each but `bad`:
    split:      llama3, 2 KV heads (one per rank);
    replicated: qwen2 (q/k/v bias, tied embeddings), 1 KV head (on both ranks);
    bad:        1 query head, which 2 ranks cannot split;
    qwen3-window, llama-bias: the forms whose sharding differs (per-head norms, biases, windows).
    A standalone draft here is a copy of its target: it then proposes what the target would say, so
    the acceptance rate shows whether every rank verified the draft's real proposals."""
    from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint
    from hf_fixtures import make_hf_checkpoint
    from tokenizer_fixtures import make_sentencepiece_dir

    root = tmp_path_factory.mktemp("tp")
    shapes = {"split": ("llama3", dict(num_key_value_heads=2)),
              "replicated": ("qwen2", dict(num_key_value_heads=1)),
              "bad": ("llama3", dict(num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)),
              # q/k norms, an o_proj bias added once after the all-reduce, a sliding / full layer mix
              "qwen3-window": ("qwen3-window", dict(num_key_value_heads=2)),
              # gate/up biases sharded with their rows, the down_proj bias added once
              "llama-bias": ("llama-bias", dict(num_key_value_heads=2))}
    out = {}
    for name, (family, overrides) in shapes.items():
        hf = make_hf_checkpoint(root / f"hf-{name}", family, fmt="safetensors", seed=3, vocab_size=VOCAB,
                                **overrides)
        make_sentencepiece_dir(hf, vocab_size=VOCAB)
        out[name] = convert_hf_checkpoint(hf, root / name)
    return out


def single_process(args, out: Path) -> tuple[list, list]:
    """generate.py in this process -> (completion_ids per prompt, speculation summary lines)."""
    from gpt_fast_magicdec.cli import generate

    # One thread, like each torchrun rank (OMP_NUM_THREADS=1): on a busy 2-core runner, the default
    # thread pool spins against the other processes and a 0.1 s run takes seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(generate.main, [str(a) for a in [*args, "--out", out]])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return completions(out), speculation(result.output)


def completions(path: Path) -> list:
    return [json.loads(line)["completion_ids"] for line in path.read_text().splitlines()]


def speculation(output: str) -> list:
    """The acceptance lines of the summary. Greedy output is the same whatever the draft proposes,
    so equal acceptance is what shows that every rank verified the draft's real proposals."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("speculation:")]
    assert lines, output
    return lines


def torchrun(*args, timeout=LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   *args], timeout)


def test_torchrun_baseline_and_self_speculation_match_single_process(ckpts, tmp_path):
    args = ["--checkpoint", ckpts["replicated"], *COMMON, "--draft", "self", "--draft-budget", 8, "--sink", 2,
            "--gamma", 2]
    expected, accepted = single_process(args, tmp_path / "single.jsonl")
    run = torchrun("generate.py", *args, "--compare", "--out", tmp_path / "tp.jsonl")
    assert run.returncode == 0, run.stdout + run.stderr
    assert completions(tmp_path / "tp.jsonl") == expected
    assert speculation(run.stdout) == accepted
    # --compare ran plain decoding first on the same sharded model: the same tokens.
    assert run.stdout.count("greedy outputs identical: yes") == 1  # and only rank 0 printed


def test_torchrun_fails_on_every_rank_when_heads_do_not_split(ckpts, tmp_path):
    run = torchrun("generate.py", "--checkpoint", ckpts["bad"], *COMMON)
    assert run.returncode != 0
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: the target model has 1 query heads, which 2 ranks cannot split evenly (each rank "
                      "needs a whole, equal number of heads); valid sizes for the target model: 1"]


# -- data-parallel replicas -----------------------------------------------------------------------------
def prompt_file(tmp_path: Path, n: int = 7) -> Path:
    texts = ["The old house", "A letter came today, and it said", "Once upon a time", "It was late",
             "The rain fell on the roofs of the town", "She said nothing", "In the morning the ship"][:n]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("nproc, tp", [(4, 2), (2, 1)], ids=["2 replicas x TP 2", "2 replicas x TP 1"])
def test_replicas_of_tensor_parallel_groups_give_the_single_process_completions(ckpts, tmp_path, nproc, tp):
    """world = replicas x tp: each replica serves its share of the prompts with its own refill loop
    (--bsz 2 slots for 3-4 prompts), the parts are merged into one --out in input order."""
    prompts = prompt_file(tmp_path)
    args = ["--checkpoint", ckpts["split"], "--prompt-file", prompts, "--bsz", 2, "--max-new-tokens", 10,
            "--no-progress", "--draft", "self", "--draft-budget", 8, "--sink", 2, "--gamma", 2]
    expected, _ = single_process(args, tmp_path / "single.jsonl")
    out = tmp_path / "dp.jsonl"
    run = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc,
                  "generate.py", *args, "--tp", tp, "--out", out], timeout=2 * LAUNCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(7))  # one file, in input order
    assert [r["completion_ids"] for r in rows] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.jsonl", "prompts.jsonl", "single.jsonl"]  # parts merged
    assert run.stdout.count("== replica 0 of 2") == 1  # rank 0 reports its replica's share


# -- the driver: several CLI runs in one 2-rank process group --------------------------------------------
def _driver(cases_file: str, out_dir: str) -> None:
    """Under torchrun: run each case's generate.py arguments (plus its per-rank extras) through the CLI
    and record this rank's exit code and output in out_dir/rank<r>.json."""
    from gpt_fast_magicdec.cli import generate

    rank = int(os.environ["RANK"])
    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        args = case["args"] + case.get("rank_args", {}).get(str(rank), [])
        res = CliRunner().invoke(generate.main, args)
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        results[case["name"]] = {"exit_code": res.exit_code, "output": res.output,
                                 "crash": repr(res.exception) if crashed else None}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def driven(ckpts, tmp_path_factory):
    """Single-process references and the driver's per-rank results for the standalone-draft cases."""
    out = tmp_path_factory.mktemp("driven")
    split = ["--checkpoint", ckpts["split"], "--draft-checkpoint", ckpts["split"], *COMMON, "--gamma", 3]
    replicated = ["--checkpoint", ckpts["replicated"], "--draft-checkpoint", ckpts["replicated"], *COMMON,
                  "--gamma", 3]
    cases = {
        "draft_all_ranks": [*split, "--draft-kv", "snapkv", "--draft-budget", 8],
        "draft_rank_0": [*split, "--draft-budget", 8, "--sink", 2, "--draft-ranks", "0"],
        "draft_rank_1_sampled": [*replicated, "--draft-budget", -1, "--draft-ranks", "1", "--temperature", 0.9,
                                 "--top-k", 50, "--seed", 7],
        "qwen3_window_self": ["--checkpoint", ckpts["qwen3-window"], *COMMON, "--draft", "self", "--draft-kv",
                              "snapkv", "--draft-budget", 8, "--gamma", 3],
        "llama_bias_self": ["--checkpoint", ckpts["llama-bias"], *COMMON, "--draft", "self", "--draft-budget", 8,
                            "--sink", 2, "--gamma", 2],
        # re-selected every round: each rank picks for its own KV heads ...
        "pillar_self": ["--checkpoint", ckpts["split"], *COMMON, "--draft", "self", "--draft-kv", "pillar",
                        "--draft-budget", 8, "--draft-window", 4, "--reselect", 1, "--gamma", 3],
        # ... a standalone draft on rank 0 only picks from the mass of every rank's heads
        "pillar_model": [*split, "--draft-kv", "pillar", "--draft-budget", 8, "--draft-window", 4, "--reselect", 1,
                         "--draft-ranks", "0"],
    }
    expected = {name: single_process(_without_draft_ranks(args), out / f"{name}-single.jsonl")
                for name, args in cases.items()}
    specs = [{"name": name, "args": [str(a) for a in args + ["--out", out / f"{name}.jsonl"]]}
             for name, args in cases.items()]
    specs += [
        {"name": "bad_heads", "args": [str(a) for a in ["--checkpoint", ckpts["bad"], *COMMON]]},
        {"name": "draft_ranks_outside", "args": [str(a) for a in [*split, "--draft-ranks", "0,2"]]},
        {"name": "one_rank_cannot_load", "args": [str(a) for a in split[2:]],
         "rank_args": {"0": ["--checkpoint", str(ckpts["split"])], "1": ["--checkpoint", str(out / "missing")]}},
    ]
    (out / "cases.json").write_text(json.dumps(specs))
    run = torchrun(__file__, out / "cases.json", out)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, expected, ranks


def _without_draft_ranks(args: list) -> list:
    i = args.index("--draft-ranks") if "--draft-ranks" in args else None
    return args if i is None else args[:i] + args[i + 2:]


@pytest.mark.parametrize("case", ["draft_all_ranks", "draft_rank_0", "draft_rank_1_sampled", "qwen3_window_self",
                                  "llama_bias_self", "pillar_self", "pillar_model"])
def test_standalone_draft_and_every_model_form_match_single_process(driven, case):
    out, expected, ranks = driven
    for rank in ranks:
        assert rank[case]["exit_code"] == 0 and rank[case]["crash"] is None, rank[case]
    assert ranks[1][case]["output"] == ""  # only rank 0 prints
    tokens, accepted = expected[case]
    assert completions(out / f"{case}.jsonl") == tokens
    assert speculation(ranks[0][case]["output"]) == accepted


@pytest.mark.parametrize("case, message", [
    ("bad_heads", "error: the target model has 1 query heads, which 2 ranks cannot split evenly"),
    ("draft_ranks_outside", "error: --draft-ranks 0,2: rank 2 is outside the world of 2 ranks (0..1)"),
    ("one_rank_cannot_load", "error: rank 1: checkpoint directory "),
])
def test_errors_fail_every_rank_with_one_message(driven, case, message):
    _, _, ranks = driven
    assert [r[case]["exit_code"] for r in ranks] == [1, 1] and not any(r[case]["crash"] for r in ranks)
    lines = ranks[0][case]["output"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), ranks[0][case]["output"]
    assert ranks[1][case]["output"] == ""


# -- leaving the process group: no SIGABRT at interpreter exit -------------------------------------------
EXIT_LOOPS = int(os.environ.get("MAGICDEC_TP_EXIT_LOOPS", "4"))  # raise it to hunt a rarer abort


def _two_ranks(args) -> list:
    """-> [(returncode, stdout, stderr)] of both ranks of a 2-process gloo world started as torchrun
    starts its workers (the same environment, the rendezvous store hosted outside the ranks, here in
    this process), without torchrun's agent process: the abort happens in a rank's own interpreter
    exit, and skipping the agent makes each launch much cheaper."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
        procs.append(subprocess.Popen([sys.executable, "generate.py", *map(str, args)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    del store
    return [(p.returncode, *out) for p, out in zip(procs, outs)]


def test_every_exit_path_leaves_the_process_group_cleanly(ckpts):
    """A refusal (UserError on both ranks) and a success, each EXIT_LOOPS real 2-process launches:
    every rank must exit with its own code, never SIGABRT ("terminate called without an active
    exception" from gloo objects destroyed during interpreter teardown; see tp.run_cli). Before the
    fix this failed in about 1 run in 5 on a loaded 2-core machine, so 2 x 4 launches x 2 ranks
    catch it with high probability there; a rarer abort needs MAGICDEC_TP_EXIT_LOOPS raised."""
    cases = [(["--checkpoint", ckpts["bad"], "--prompt", "hi", "--max-new-tokens", 2], 1),
             (["--checkpoint", ckpts["split"], "--prompt", "hi", "--max-new-tokens", 2, "--gamma", 0], 0)]
    for _ in range(EXIT_LOOPS):
        for args, code in cases:
            ranks = _two_ranks([*args, "--no-progress"])
            for rank, (returncode, _, stderr) in enumerate(ranks):
                assert returncode == code and "terminate called" not in stderr, (rank, returncode, stderr)
            assert ranks[0][1 + code].count("error:" if code else "== plain decoding") == 1, ranks[0]


if __name__ == "__main__":
    import functools

    from gpt_fast_magicdec.tp import run_cli

    # Leave the process group the way generate.py does (barrier, destroy, os._exit): the draft
    # subgroups created by the driven runs would otherwise abort the driver at interpreter exit.
    run_cli(functools.partial(_driver, *sys.argv[1:]))