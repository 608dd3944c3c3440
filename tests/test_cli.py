"""generate.py end to end on a converted HF checkpoint, and its one-line errors for bad input."""
import json
import shutil

import pytest
from click.testing import CliRunner

from gpt_fast_magicdec.cli import generate
from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint
from hf_fixtures import make_hf_checkpoint
from tokenizer_fixtures import make_sentencepiece_dir

VOCAB = 400


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = make_hf_checkpoint(root / "hf", "llama3", fmt="safetensors", seed=2, vocab_size=VOCAB)
    make_sentencepiece_dir(hf, vocab_size=VOCAB)
    return convert_hf_checkpoint(hf, root / "engine")


def run(*args):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_generate_writes_jsonl_and_summary(checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run("--checkpoint", checkpoint, "--prompt", "The old house", "--prompt", "A letter came today, and",
                 "--max-new-tokens", 12, "--draft", "self", "--draft-budget", 8, "--sink", 2, "--gamma", 2,
                 "--compare", "--out", out)
    assert result.exit_code == 0, result.output
    assert "greedy outputs identical: yes" in result.output
    assert "acceptance rate" in result.output and "tokens/s" in result.output and "peak memory" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The old house", "A letter came today, and"]
    for r in rows:
        assert r["new_tokens"] == len(r["completion_ids"]) and 1 <= r["new_tokens"] <= 12
        assert r["finish_reason"] in ("eos", "length")



def test_compare_repeats_alternates_and_reports_the_spread(checkpoint):
    result = run("--checkpoint", checkpoint, "--prompt", "The old house", "--max-new-tokens", 6, "--draft", "self",
                 "--draft-budget", 8, "--sink", 2, "--gamma", 2, "--compare", "--repeats", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.count("== plain decoding") == 1  # the median run of each mode is shown once
    assert "== speedup over plain decoding: " in result.output
    assert "== tokens/s, median of 2 alternating runs after warm-up: plain " in result.output
    assert "greedy outputs identical: yes" in result.output

def test_prompt_file_jsonl_and_batches(checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two two", "three three three"]) + "\n")
    out = tmp_path / "out.jsonl"
    result = run("--checkpoint", checkpoint, "--prompt-file", prompts, "--bsz", 2, "--max-new-tokens", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3


def test_budget_covering_context_warns(checkpoint):
    result = run("--checkpoint", checkpoint, "--prompt", "hi", "--max-new-tokens", 4, "--draft", "self",
                 "--draft-budget", 512, "--gamma", 2)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "covers the whole context" in result.output


@pytest.fixture(scope="module")
def other_vocab_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    hf = make_hf_checkpoint(root / "hf", "llama3", fmt="safetensors", seed=4, vocab_size=512)
    make_sentencepiece_dir(hf, vocab_size=VOCAB)
    return convert_hf_checkpoint(hf, root / "engine")


BAD_INPUTS = {
    "missing checkpoint": (["--checkpoint", "{missing}"], "does not exist"),
    "gamma < 0": (["--draft", "self", "--gamma", "-1"], "--gamma must be >= 1"),
    "gamma 0 with a draft": (["--draft", "self", "--gamma", "0"], "--gamma 0 means plain decoding"),
    "gamma too large": (["--draft", "self", "--gamma", "16"], "--gamma must be <= 15"),
    "gamma not a number": (["--draft", "self", "--gamma", "three"], "--gamma must be an integer"),
    "sink larger than budget": (["--draft", "self", "--draft-budget", "8", "--sink", "9"], "--sink 9"),
    "budget below sink + gamma": (["--draft", "self", "--draft-budget", "10", "--sink", "9", "--gamma", "3"],
                                  "sink + gamma"),
    "prompt does not fit": (["--max-seq-len", "8", "--prompt", "a long prompt that is longer than eight tokens"],
                            "does not fit --max-seq-len 8"),
    "draft ranks without TP": (["--draft-ranks", "0,1"], "--draft-ranks"),
    "simulated acceptance refused": (["--simulate-acceptance", "0.8"], "benchmark-only"),
    "draft vocabulary differs": (["--draft-checkpoint", "{other}"], "vocabulary"),
    "full budget self draft": (["--draft", "self", "--draft-budget", "-1"], "standalone draft"),
    "full policy self draft": (["--draft-kv", "full"], "standalone draft"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(case, checkpoint, other_vocab_checkpoint, tmp_path):
    args, needle = BAD_INPUTS[case]
    args = [a.format(missing=tmp_path / "nope", other=other_vocab_checkpoint) for a in args]
    result = run("--checkpoint", checkpoint, "--max-new-tokens", 4, *args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert "Traceback" not in result.output


def test_partial_checkpoint_is_one_line_error(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").unlink()
    result = run("--checkpoint", broken, "--prompt", "hi")
    assert result.exit_code == 1 and result.output.count("error:") == 1, result.output


def test_draft_kv_choices_and_help_come_from_the_policy_registry(checkpoint):
    from gpt_fast_magicdec.policies import POLICIES

    help_text = " ".join(run("--help").output.split())
    for name, policy in POLICIES.items():
        assert name in help_text and " ".join(policy.help.split()) in help_text
    result = run("--checkpoint", checkpoint, "--prompt", "The old house", "--max-new-tokens", 8, "--draft-kv", "recent",
                 "--draft-budget", 8, "--gamma", 2, "--compare")
    assert result.exit_code == 0, result.output
    assert "recent, budget 8" in result.output and "greedy outputs identical: yes" in result.output
