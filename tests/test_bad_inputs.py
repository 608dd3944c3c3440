"""Hostile inputs to generate.py and bench.py: each is one `error:` line (or click's own usage
error), a non-zero exit, no traceback, and nothing run or written first. Plus the defaults a user
relies on: the plain command speculates, ignored options are said, outputs are written atomically.
(The converter's matrix is in test_convert.py and test_convert_safety.py.)"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt_fast_magicdec.cli import bench
from gpt_fast_magicdec.cli import generate
from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint
from gpt_fast_magicdec.data import check_prompt_text, looks_like_jsonl, read_jsonl_prompts
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.errors import UserError
from hf_fixtures import make_hf_checkpoint
from tokenizer_fixtures import SAMPLE_TEXT, make_sentencepiece_dir

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400


def _checkpoint(root, model_vocab=VOCAB, text=SAMPLE_TEXT, seed=2):
    hf = make_hf_checkpoint(root / "hf", "llama3", fmt="safetensors", seed=seed, vocab_size=model_vocab)
    make_sentencepiece_dir(hf, text=text, vocab_size=VOCAB)
    return convert_hf_checkpoint(hf, root / "engine")


def _edited(ckpt, root, name, **changes):
    """A copy of `ckpt` whose engine_config.json was edited afterwards."""
    copy = Path(shutil.copytree(ckpt, root / name))
    config = json.loads((copy / "engine_config.json").read_text())
    (copy / "engine_config.json").write_text(json.dumps({**config, **changes}))
    return copy


def _padded(ckpt, root):
    """A copy of `ckpt` (embedding 512 rows, tokenizer 400 pieces) whose head prefers the 112 rows
    without a piece: every greedy token is an id the tokenizer cannot decode."""
    copy = Path(shutil.copytree(ckpt, root / "padded"))
    path = copy / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["output.weight"][:VOCAB] = 0.0  # logits 0 for every id with a piece; the max of the rest > 0
    save_file(tensors, path, metadata=metadata)
    return copy


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    ok = _checkpoint(root / "ok", model_vocab=512)
    llama3_rope = json.loads((ok / "engine_config.json").read_text())["rope_scaling"]
    return {"ok": ok,
            # same vocabulary size, different tokens: a draft that cannot speculate for "ok"
            "other_tok": _checkpoint(root / "other", model_vocab=512, text=SAMPLE_TEXT[::-1], seed=5),
            # a tokenizer with ids the model has no embedding for
            "small_vocab": _checkpoint(root / "small", model_vocab=300),
            # twice the heads of half the size: every tensor keeps its shape
            "regrouped": _edited(ok, root, "regrouped", n_heads=8, n_kv_heads=4, head_dim=8),
            "zero_low_freq": _edited(ok, root, "zero_low_freq", rope_scaling=dict(llama3_rope, low_freq_factor=0)),
            "padded": _padded(ok, root)}


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, needle, code=1):
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert result.exit_code == code, result.output
    prefix = "error:" if code == 1 else "Error:"
    errors = [line for line in result.output.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert "Traceback" not in result.output and "--- [" not in result.output  # nothing was generated


def _files(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "empty_text.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "half an emoji \\ud83d"}\n')
    (tmp_path / "low_surrogate.jsonl").write_text('{"text": "\\udc00\\ud800 reversed pair"}\n')
    engine_cfg = tmp_path / "badcfg"
    engine_cfg.mkdir()
    (engine_cfg / "engine_config.json").write_text("{oops")


GENERATE = {  # name -> (arguments, substring of the one error line, exit code)
    "temperature nan": (["--temperature", "nan"], "--temperature must be a finite number", 1),
    "temperature inf": (["--temperature", "inf"], "--temperature must be a finite number", 1),
    "negative temperature": (["--temperature", "-1"], "--temperature", 1),
    "top-p nan": (["--temperature", "1", "--top-p", "nan"], "--top-p", 1),
    "max-seq-len 0": (["--max-seq-len", "0"], "--max-seq-len", 2),
    "max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens", 2),
    "bsz 0": (["--bsz", "0"], "--bsz", 1),
    "gamma negative": (["--gamma", "-2"], "--gamma must be >= 1", 1),
    "gamma word": (["--gamma", "many"], "--gamma must be an integer or 'auto'", 1),
    "gamma 0 with a draft": (["--gamma", "0", "--draft", "self"], "--gamma 0 means plain decoding", 1),
    "compare without a draft": (["--gamma", "0", "--compare"], "--compare", 1),
    "snapkv window over budget": (["--draft-kv", "snapkv", "--draft-budget", "16", "--draft-window", "40"],
                                  "--draft-window 40 is larger than --draft-budget 16", 1),
    "streaming budget too small": (["--draft-budget", "18", "--sink", "16"], "sink + gamma = 19", 1),
    "out in a missing directory": (["--out", "{tmp}/nope/out.jsonl"], "does not exist", 1),
    "out under a file": (["--out", "{tmp}/afile/out.jsonl"], "is not a directory", 1),
    "out is a directory": (["--out", "{tmp}"], "is a directory", 2),
    "bogus device": (["--device", "gpu0"], "is not a device name", 1),
    "unsupported device": (["--device", "meta"], "only cpu and cuda", 1),
    "non-utf8 prompt file": (["--prompt-file", "{tmp}/latin1.txt"], "is not UTF-8", 1),
    "empty prompt file": (["--prompt-file", "{tmp}/empty.txt"], "is empty", 1),
    "blank jsonl": (["--prompt-file", "{tmp}/blank.jsonl"], "is empty", 1),
    "broken jsonl line": (["--prompt-file", "{tmp}/broken.jsonl"], "line 2: not JSON", 1),
    "empty text field": (["--prompt-file", "{tmp}/empty_text.jsonl"], "empty 'text'", 1),
    "unpaired surrogate escape": (["--prompt-file", "{tmp}/surrogate.jsonl"],
                                  "surrogate.jsonl line 2: 'text' holds an unpaired surrogate U+D83D", 1),
    "reversed surrogate pair": (["--prompt-file", "{tmp}/low_surrogate.jsonl"], "unpaired surrogate U+DC00", 1),
    "prompt file missing": (["--prompt-file", "{tmp}/none.txt"], "does not exist", 2),
    "invalid engine_config": (["--checkpoint", "{tmp}/badcfg"], "cannot read", 1),
    "checkpoint is its weights file": (["--checkpoint", "{ok}/model.safetensors"],
                                       "is a file, not a directory: pass the converted checkpoint's directory", 1),
    "checkpoint is its config file": (["--checkpoint", "{ok}/engine_config.json"], "is a file, not a directory", 1),
    "engine_config regrouped against its weights": (["--checkpoint", "{regrouped}"],
                                                    "no longer matches the weights it was converted with", 1),
    "engine_config rope divides by zero": (["--checkpoint", "{zero_low_freq}"],
                                           "low_freq_factor must be a positive number, got 0", 1),
    "tokenizer beyond vocab": (["--checkpoint", "{small_vocab}"], "does not belong to this model", 1),
    "draft with another tokenizer": (["--draft-checkpoint", "{other_tok}"], "differs from the target's", 1),
    "text with random weights": (["--checkpoint", None, "--random-weights", "tiny", "--prompt", "x"],
                                 "--random-weights has no tokenizer", 1),
    "unknown hardware": (["--gamma", "auto", "--hardware", "tpu"], "--hardware", 2),
    # Memory, estimated before anything is allocated (on the CPU: MemAvailable, a cgroup limit).
    "a 70B model on a CPU": (["--checkpoint", None, "--random-weights", "llama-3.1-70b"],
                             "loading llama-3.1-70b needs 262.8 GiB", 1),
    "a KV cache beyond RAM": (["--bsz", "200000", "--max-new-tokens", "200"], "use fewer --bsz", 1),
}
if torch.cuda.is_available():
    GENERATE.pop("unsupported device")
else:
    GENERATE["cuda without a GPU"] = (["--device", "cuda"], "no CUDA GPU", 1)


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate_bad_input(case, ckpts, tmp_path):
    _files(tmp_path)
    args, needle, code = GENERATE[case]
    args = [a.format(tmp=tmp_path, **ckpts) if a else a for a in args]
    base = ["--checkpoint", ckpts["ok"], "--prompt", "hi", "--max-new-tokens", 2, "--no-progress"]
    if "--checkpoint" in args:
        i = args.index("--checkpoint")
        base = base[2:] + ([] if args[i + 1] is None else ["--checkpoint", args[i + 1]])
        args = args[:i] + args[i + 2:]
    if "--prompt-file" in args or "--random-weights" in args:
        base = [a for a in base if a not in ("--prompt", "hi")]
    assert_one_line_error(invoke(generate.main, *base, *args), needle, code)


def test_ids_beyond_the_tokenizer_do_not_lose_the_completions(ckpts, tmp_path):
    """A padded embedding (512 rows, 400 pieces) whose every greedy token has no piece: generation
    finishes, the text is what can be decoded, and the ids stay in --out."""
    out = tmp_path / "o.jsonl"
    run_ok("--checkpoint", ckpts["padded"], "--prompt", "the river", "--max-new-tokens", 4, "--ignore-eos",
           "--out", out, "--no-progress")
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["completion_ids"]) == 4 and min(row["completion_ids"]) >= VOCAB
    assert isinstance(row["completion"], str)


def test_out_is_checked_before_the_model_loads(ckpts, tmp_path, monkeypatch):
    def no_loading(*_a, **_k):
        raise AssertionError("loaded the model before checking --out")

    monkeypatch.setattr(generate, "load_engine", no_loading)
    result = invoke(generate.main, "--checkpoint", ckpts["ok"], "--out", tmp_path / "missing" / "o.jsonl")
    assert_one_line_error(result, "does not exist")


# ---- defaults and notices --------------------------------------------------------------------------
def run_ok(*args):
    result = invoke(generate.main, *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_default_command_speculates_and_gamma_0_does_not(ckpts, tmp_path):
    base = ["--checkpoint", ckpts["ok"], "--prompt", SAMPLE_TEXT[:300], "--max-new-tokens", 6, "--no-progress"]
    out = run_ok(*base)
    assert "== draft: self, streaming" in out and "gamma 3" in out and "speculation:" in out
    plain = run_ok(*base, "--gamma", 0)
    assert "== plain decoding" in plain and "speculation:" not in plain
    assert "memory bandwidth" not in plain  # only with --compare or --verbose: it measures the machine
    assert "memory bandwidth" in run_ok(*base, "--draft", "none", "--verbose")


def test_headline_command_speculates_on_the_bundled_model(tmp_path, monkeypatch):
    """`python generate.py --prompt-file tests/data/long_passage.txt --compare` (the README quick
    start, shortened): self-speculation with the default 512-key streaming view over ~5K tokens,
    lossless."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = run_ok("--prompt-file", ROOT / "tests" / "data" / "long_passage.txt", "--max-new-tokens", 8, "--compare",
                 "--no-progress")
    assert "== draft: self, streaming, budget 512 (window 496), gamma 3" in out, out
    assert "greedy outputs identical: yes" in out and "speculation: gamma 3" in out


def test_short_prompt_speculates_with_a_clipped_budget(tmp_path, monkeypatch):
    """The same command on a 609-token prompt: the default budget is clipped to a quarter of it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = run_ok("--prompt-file", ROOT / "tests" / "data" / "tiny_passage.txt", "--max-new-tokens", 8, "--compare",
                 "--no-progress")
    assert "== draft: self, streaming, budget 152 (window 136), gamma 3" in out, out
    assert "greedy outputs identical: yes" in out and "speculation: gamma 3" in out


def test_default_budget_is_clipped_to_a_short_context():
    cfg = DraftConfig(kind="self")
    assert cfg.budget is None  # decided by the job
    assert cfg.for_context(4000).budget == 512  # long context: the default
    short = cfg.for_context(600)
    assert (short.budget, short.sink, short.view_window) == (150, 16, 134)
    tiny = cfg.for_context(10)  # never below what the view needs
    assert tiny.budget == 16 + 4 * 3 and tiny.view_window >= tiny.gamma
    snap = DraftConfig(kind="self", kv="snapkv").for_context(600)
    assert snap.budget == 150 and snap.view_window == 37
    assert DraftConfig(kind="none").for_context(10).kind == "none"
    chosen = DraftConfig(kind="self", budget=256)
    assert chosen.for_context(600) is chosen  # a budget given is used as is
    windowed = DraftConfig(kind="self", kv="snapkv", window=100).for_context(600)  # a window given: not clipped
    assert (windowed.budget, windowed.view_window) == (512, 100)


def test_explicit_budget_is_respected(ckpts):
    out = run_ok("--checkpoint", ckpts["ok"], "--prompt", "hi", "--max-new-tokens", 3, "--draft-budget", 24,
                 "--sink", 4, "--no-progress")
    assert "budget 24 (window 20)" in out


NOTICES = {
    "sink with plain decoding": (["--draft", "none", "--sink", "4"], "--sink is ignored with plain decoding"),
    "budget with gamma 0": (["--gamma", "0", "--draft-budget", "64"], "--draft-budget is ignored"),
    "gamma with draft none": (["--draft", "none", "--gamma", "4"], "--gamma is ignored"),
    "top-p when greedy": (["--gamma", "0", "--top-p", "0.9"], "--top-p is ignored with greedy"),
    "prompt-length with a checkpoint": (["--gamma", "0", "--prompt-length", "9"], "--prompt-length is ignored"),
    "sink with snapkv": (["--draft-kv", "snapkv", "--sink", "4"], "--sink is ignored with --draft-kv snapkv"),
    "hardware without auto": (["--gamma", "0", "--hardware", "H100-SXM"], "--hardware is ignored"),
}


@pytest.mark.parametrize("case", sorted(NOTICES))
def test_ignored_options_are_said(case, ckpts):
    args, needle = NOTICES[case]
    out = run_ok("--checkpoint", ckpts["ok"], "--prompt", "hi", "--max-new-tokens", 2, "--no-progress", *args)
    notices = [line for line in out.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and notices[0].startswith(f"notice: {needle}"), out


def test_gamma_auto_says_what_it_chose(ckpts):
    out = run_ok("--checkpoint", ckpts["ok"], "--prompt", SAMPLE_TEXT[:200], "--max-new-tokens", 10,
                 "--gamma", "auto", "--hardware", "H100-SXM", "--no-progress")
    lines = [line for line in out.splitlines() if line.startswith("== gamma auto")]
    assert len(lines) == 1 and "from round 0 (context" in lines[0], out
    assert "gamma" in lines[0].split(":", 1)[1] or "plain decoding" in lines[0]


def test_ignore_eos_and_out_in_input_order(ckpts, tmp_path):
    out = tmp_path / "o.jsonl"
    run_ok("--checkpoint", ckpts["ok"], "--prompt", "hi", "--prompt", "there", "--max-new-tokens", 5,
           "--ignore-eos", "--gamma", 0, "--out", out, "--no-progress")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and [r["prompt"] for r in rows] == ["hi", "there"]
    assert [r["new_tokens"] for r in rows] == [5, 5] and {r["finish_reason"] for r in rows} == {"length"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]  # no temporary or part file left


BOM = "\ufeff"


@pytest.mark.parametrize("layout", ["jsonl", "jsonl after blank lines", "joined files", "plain text"])
def test_a_byte_order_mark_is_not_part_of_the_prompts(tmp_path, layout):
    rows = '{"text": "a"}\n{"text": "b"}\n'
    content = {"jsonl": BOM + rows, "jsonl after blank lines": BOM + "\n\n" + rows,
               "joined files": BOM + rows + BOM + '{"text": "c"}\n', "plain text": BOM + "Once upon a time"}[layout]
    (tmp_path / "p.txt").write_bytes(content.encode("utf-8"))
    want = {"joined files": ["a", "b", "c"], "plain text": ["Once upon a time"]}.get(layout, ["a", "b"])
    assert read_jsonl_prompts(tmp_path / "p.txt") == want


def test_check_prompt_text():
    assert check_prompt_text("caf\u00e9 \U0001F600", "--prompt") == "caf\u00e9 \U0001F600"  # pairs are fine
    for text, needle in [("\ud800", "U+D800 at character 0 (a lone \\ud800 escape)"),
                         ("ab\udcff", "U+DCFF at character 2 (a lone \\udcff escape, or the byte 0xff that is not UTF-8)"),
                         ("\udfff\ud800", "U+DFFF at character 0")]:
        with pytest.raises(UserError, match=re.escape(needle)) as err:
            check_prompt_text(text, "--prompt")
        assert str(err.value).startswith("--prompt holds an unpaired surrogate")
    # What a shell passes for `--prompt $'caf\xe9'` (latin-1 bytes): Python keeps the byte as U+DCE9.
    argv_like = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(UserError, match="the byte 0xe9 that is not UTF-8"):
        check_prompt_text(argv_like, "--prompt")


def test_prompt_files_are_read_by_content(tmp_path):
    (tmp_path / "rows.txt").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_jsonl_prompts(tmp_path / "rows.txt") == ["a", "b"]
    (tmp_path / "story.jsonl").write_text("{curly} braces in a story\n")
    assert read_jsonl_prompts(tmp_path / "story.jsonl") == ["{curly} braces in a story\n"]
    assert not looks_like_jsonl("Once upon a time\n{\"text\": 1}") and looks_like_jsonl('\n {"a": 1}')
    with pytest.raises(UserError, match="not UTF-8"):
        (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
        read_jsonl_prompts(tmp_path / "bin.txt")


# ---- bench.py --------------------------------------------------------------------------------------
def _results_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "results.json").write_text('{"meta": ')
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.json").write_text('{"meta": {}, "rows": [], "skipped": []}')
    (tmp_path / "listy").mkdir()
    (tmp_path / "listy" / "results.json").write_text("[1, 2]")


BENCH = {
    "merge without results": (["--merge", "{tmp}/empty"], "does not exist", 1),
    "merge corrupt results": (["--merge", "{tmp}/corrupt"], "is not valid JSON", 1),
    "merge foreign json": (["--merge", "{tmp}/foreign"], "not a complete bench.py results file", 1),
    "merge a list": (["--merge", "{tmp}/listy"], "not a complete bench.py results file", 1),
    "merge a missing dir": (["--merge", "{tmp}/nope"], "--merge", 2),
    "merge over earlier results": (["--merge", "{tmp}/foreign", "--out-dir", "{tmp}/listy"],
                                   "--out-dir {tmp}/listy already holds results.json from an earlier run", 1),
    "bogus device": (["--random-weights", "tiny", "--device", "gpu0"], "is not a device name", 1),
    "draft with another tokenizer": (["--checkpoint", "{ok}", "--draft-checkpoint", "{other_tok}"],
                                     "differs from the target's", 1),
    "draft checkpoint is a file": (["--checkpoint", "{ok}", "--draft-checkpoint", "{tmp}/afile"],
                                   "is a file, not a directory", 1),
    "tokenizer beyond vocab": (["--checkpoint", "{small_vocab}", "--prompts-file", "{tmp}/docs.jsonl"],
                               "does not belong to this model", 1),
    # Every input is read before the first run (the sweep below is never reached).
    "prompts file not utf-8": (["--checkpoint", "{ok}", "--prompts-file", "{tmp}/latin1.txt"], "is not UTF-8", 1),
    "prompts file empty": (["--checkpoint", "{ok}", "--prompts-file", "{tmp}/empty.txt"], "is empty", 1),
    "prompts file with a lone surrogate": (["--checkpoint", "{ok}", "--prompts-file", "{tmp}/surrogate.jsonl"],
                                           "line 2: 'text' holds an unpaired surrogate", 1),
    "too few windows for the longest prompt": (["--checkpoint", "{ok}", "--prompts-file", "{tmp}/docs.jsonl",
                                                "--prompt-lengths", "16,4096"], "windows of 4096 tokens", 1),
    "random weights, prompts, no tokenizer": (["--random-weights", "tiny", "--prompts-file", "{tmp}/docs.jsonl"],
                                              "needs --tokenizer DIR", 1),
    "tokenizer dir without a tokenizer": (["--random-weights", "tiny", "--prompts-file", "{tmp}/docs.jsonl",
                                           "--tokenizer", "{tmp}/empty"], "no tokenizer in", 1),
    "out-dir under a file": (["--random-weights", "tiny", "--out-dir", "{tmp}/afile/out"], "is not a directory", 1),
    "out-dir with earlier results": (["--random-weights", "tiny", "--out-dir", "{tmp}/corrupt"],
                                     "already holds results.json from an earlier run; pass --overwrite", 1),
    "kernels over earlier results": (["--kernels", "--out-dir", "{tmp}/kernels"], "already holds kernels.json", 1),
}


def _no_sweep(*_a, **_k):
    raise AssertionError("the sweep started before every input was checked")


@pytest.mark.parametrize("case", sorted(BENCH))
def test_bench_bad_input(case, ckpts, tmp_path, monkeypatch):
    _files(tmp_path)
    _results_dirs(tmp_path)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "kernels.json").write_text("{}")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": SAMPLE_TEXT}) + "\n")
    monkeypatch.setattr(bench, "sweep", _no_sweep)
    args, needle, code = BENCH[case]
    args = [a.format(tmp=tmp_path, **ckpts) for a in args]
    result = invoke(bench.main, "--batch-sizes", 1, "--prompt-lengths", 16, "--max-new-tokens", 2,
                    "--hardware", "H100-SXM", "--out-dir", tmp_path / "out", *args)  # the case's options win
    assert_one_line_error(result, needle.format(tmp=tmp_path), code)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "corrupt" / "results.json").read_text() == '{"meta": '


TINY_SWEEP = ["--random-weights", "tiny", "--batch-sizes", 1, "--prompt-lengths", 16, "--gammas", 2, "--budgets", 12,
              "--sink", 4, "--max-new-tokens", 3, "--warmup", 0, "--drafts", "self-streaming", "--hardware",
              "H100-SXM", "--device", "cpu"]


def bench_ok(*args):
    result = invoke(bench.main, *TINY_SWEEP, *args)
    assert result.exit_code == 0, result.output
    return result.output


def test_bench_default_out_dir_is_new_every_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench_ok()
    bench_ok()
    runs = sorted((tmp_path / "bench_results").iterdir())
    assert len(runs) == 2 and all((r / "results.json").is_file() for r in runs)


def test_bench_overwrite_replaces_only_when_asked(tmp_path):
    out = tmp_path / "out"
    bench_ok("--out-dir", out)
    first = (out / "results.json").read_text()
    result = invoke(bench.main, *TINY_SWEEP, "--out-dir", out)
    assert_one_line_error(result, "pass --overwrite")
    assert (out / "results.json").read_text() == first
    bench_ok("--out-dir", out, "--overwrite")
    assert json.loads((out / "results.json").read_text())["meta"]["date"]  # a complete, new results.json


def test_bench_unwritable_out_dir_is_refused_before_the_sweep(unwritable_dir, monkeypatch):
    monkeypatch.setattr(bench, "sweep", _no_sweep)
    for out in (unwritable_dir / "bench", unwritable_dir / "a" / "b"):
        assert_one_line_error(invoke(bench.main, *TINY_SWEEP, "--out-dir", out), "cannot write into")


def _fail_writing(monkeypatch, how, out):
    """Make the final write fail after a finished sweep, one way or another."""
    import errno

    from gpt_fast_magicdec.benchmarking import sweep_report

    if how == "disk full":
        def full(path, text):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(sweep_report, "_write_atomic", full)
        return
    real_sweep = bench.sweep

    def then_break(*a, **k):
        done = real_sweep(*a, **k)
        if how == "out-dir became a file":
            out.write_text("x")
        else:  # another run with the same --out-dir finished first
            out.mkdir()
            (out / "results.json").write_text("theirs")
        return done

    monkeypatch.setattr(bench, "sweep", then_break)


@pytest.mark.parametrize("how", ["disk full", "out-dir became a file", "results appeared meanwhile"])
def test_bench_results_survive_a_failed_final_write(tmp_path, monkeypatch, how):
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(tmp_path))
    out = tmp_path / "out"
    _fail_writing(monkeypatch, how, out)
    result = invoke(bench.main, *TINY_SWEEP, "--out-dir", out)
    assert_one_line_error(result, "the results are kept in")
    kept = Path(re.search(r"kept in (\S+)$", result.output.strip().splitlines()[-1]).group(1))
    rows = json.loads(kept.read_text())["rows"]
    assert [r["draft"] for r in rows] == ["baseline", "self-streaming"]
    assert "| batch |" in result.output  # the table was printed too
    if how == "results appeared meanwhile":
        assert (out / "results.json").read_text() == "theirs"


def test_bench_refuses_weights_beyond_memory_before_loading(monkeypatch):
    from gpt_fast_magicdec import memory

    monkeypatch.setattr(memory, "available", lambda device: (8 * 2**30, "available (MemAvailable)"))
    monkeypatch.setattr(bench, "load_engine", _no_sweep)
    result = invoke(bench.main, "--random-weights", "llama-3.1-70b", "--device", "cpu", "--hardware", "H100-SXM",
                    "--batch-sizes", 1, "--prompt-lengths", 16)
    assert_one_line_error(result, "the model llama-3.1-70b needs 262.8 GiB but 8.0 GiB are available")


def test_bench_skips_cpu_points_beyond_memory(tmp_path, monkeypatch):
    """On the CPU, as on a GPU, a (batch, prompt length) whose caches cannot fit is skipped with its
    reason instead of meeting the OOM killer; the points that fit still run."""
    from gpt_fast_magicdec import memory

    monkeypatch.setattr(memory, "available", lambda device: (4 * 2**20, "available (MemAvailable)"))
    out = bench_ok("--batch-sizes", "1,64", "--out-dir", tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["batch"] for r in data["rows"]} == {1}
    (skip,) = data["skipped"]
    assert skip["batch"] == 64 and skip["reason"].startswith("the KV cache for 64 slots x ") and "needs" in skip["reason"]
    assert "skipped batch 64, prompt 16: the KV cache" in out
