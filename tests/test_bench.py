"""bench.py end to end on a tiny random-weight model (CPU), and the prompt sources of data.py."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from gpt_fast_magicdec.cli import bench

from gpt_fast_magicdec.benchmarking import sweep
from gpt_fast_magicdec.cost_model import alpha_from_tokens_per_round, expected_tokens
from gpt_fast_magicdec.data import long_document_prompts, random_prompts, read_jsonl_prompts
from gpt_fast_magicdec.errors import UserError
from tokenizer_fixtures import SAMPLE_TEXT, make_sentencepiece_dir


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


ALPHA = 0.8
SWEEP = ["--random-weights", "tiny", "--batch-sizes", "1,4", "--prompt-lengths", "32", "--gammas", "2",
         "--budgets", "16", "--sink", "4", "--simulate-acceptance", str(ALPHA), "--max-new-tokens", "48",
         "--hardware", "H100-SXM", "--device", "cpu"]


# ---- data.py ------------------------------------------------------------------------------------------
class WordTokenizer:
    """One token per whitespace-separated word: id = the word's number (documents are 'w<i>')."""
    bos_id = 1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + [int(w[1:]) for w in text.split()]


def _documents(path: Path) -> None:
    # Document d holds words 1000*d .. 1000*d + size - 1, so every token says where it came from.
    sizes = [5, 40, 3, 100, 25]
    write_jsonl(path, [{"text": " ".join(f"w{1000 * d + i}" for i in range(n)), "id": d}
                       for d, n in enumerate(sizes)])


def test_long_document_prompts_exact_length_deterministic(tmp_path):
    path = tmp_path / "docs.jsonl"
    _documents(path)
    tok = WordTokenizer()
    prompts = long_document_prompts(path, tok, n=3, length=21, seed=0)
    assert len(prompts) == 3 and all(len(p) == 21 and p[0] == tok.bos_id for p in prompts)
    assert prompts == long_document_prompts(path, tok, n=3, length=21, seed=0)
    # One window per long-enough document (docs 1, 3, 4 have >= 20 words), contiguous text.
    assert sorted(p[1] // 1000 for p in prompts) == [1, 3, 4]
    assert all(p[1:] == list(range(p[1], p[1] + 20)) for p in prompts)
    assert long_document_prompts(path, tok, n=3, length=21, seed=1) != prompts
    # More prompts than documents: further non-overlapping windows (40 // 20 + 100 // 20 + 25 // 20).
    many = long_document_prompts(path, tok, n=8, length=21, seed=0)
    assert len({tuple(p) for p in many}) == 8 and all(len(p) == 21 for p in many)
    with pytest.raises(UserError, match="windows"):
        long_document_prompts(path, tok, n=9, length=21, seed=0)


def test_prompt_files_and_random_prompts(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b\nc"}])
    assert read_jsonl_prompts(tmp_path / "p.jsonl") == ["a", "b\nc"]
    (tmp_path / "p.txt").write_text("one\nprompt")
    assert read_jsonl_prompts(tmp_path / "p.txt") == ["one\nprompt"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="text"):
        read_jsonl_prompts(tmp_path / "bad.jsonl")
    r = random_prompts(50, 3, 7, seed=5)
    assert r == random_prompts(50, 3, 7, seed=5) and len(r) == 3
    assert all(len(p) == 7 and 0 <= min(p) and max(p) < 50 for p in r)


# ---- simulated acceptance ---------------------------------------------------------------------------
def test_simulated_acceptance_is_iid_per_token():
    gamma = 3
    n = sweep.simulated_acceptance(ALPHA, gamma, "cpu", seed=0)(torch.zeros(200_000, dtype=torch.long))
    assert 0 <= int(n.min()) and int(n.max()) == gamma
    # P(n >= k) = alpha^k; tokens per round = Omega(gamma, alpha).
    for k in range(1, gamma + 1):
        assert abs(float((n >= k).float().mean()) - ALPHA ** k) < 0.01
    assert abs(alpha_from_tokens_per_round(gamma, 1 + float(n.float().mean())) - ALPHA) < 0.01
    assert abs(alpha_from_tokens_per_round(2, expected_tokens(2, 0.6)) - 0.6) < 1e-6


# ---- the sweep end to end ---------------------------------------------------------------------------
def _md_rows(md: str) -> dict:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        rows[(cells["batch"], cells["prompt"], cells["draft"], cells["γ"], cells["budget"])] = cells
    return rows


def test_bench_sweep_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(bench.main, SWEEP + ["--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    png = (out / "speedup_vs_batch.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    # 2 points x (baseline + self-streaming + self-snapkv), the same rows in JSON and markdown.
    rows = data["rows"]
    assert len(rows) == 2 * 3 and not data["skipped"]
    table = _md_rows(md)
    assert len(table) == len(rows)
    speedup_header = next(h for h in next(iter(table.values())) if h.startswith("speedup"))
    for row in rows:
        key = tuple("–" if row[k] is None else str(row[k])
                    for k in ("batch", "prompt_len", "draft", "gamma", "budget"))
        assert table[key][speedup_header] == str(row["speedup"])
        assert table[key]["tok/s"] == str(row["tokens_per_s"])
    for meta_key in ("command", "git_commit", "device_name", "torch_version", "date"):
        assert meta_key in data["meta"]
    assert data["meta"]["command"].startswith("python bench.py --random-weights tiny")

    # Simulated runs are marked everywhere; acceptance follows alpha (loose: ~100 sequence-rounds).
    assert data["simulated_acceptance"] == ALPHA
    assert "SIMULATED ACCEPTANCE" in md and "(SIMULATED)" in speedup_header
    assert b"SIMULATED acceptance alpha = 0.8" in png
    spec = [r for r in rows if r["draft"] != "baseline"]
    assert {r["draft"] for r in spec} == {"self-streaming", "self-snapkv"}
    for r in spec:  # batch 4: ~80 sequence-rounds; batch 1: ~20
        assert r["simulated_acceptance"] == ALPHA
        assert abs(r["alpha"] - ALPHA) < (0.1 if r["batch"] == 4 else 0.2), r
        assert r["speedup_pred_cost_model"] > 0 and r["speedup_pred_measured_T"] > 0
    base = [r for r in rows if r["draft"] == "baseline"]
    assert all(r["speedup"] == 1.0 and r["bandwidth_GBps"] > 0 for r in base)
    # Paired timing: every speculative run between two plain ones (A B A C A), median within min..max.
    assert all(r["timed_runs"] == (3 if r["draft"] == "baseline" else 1) for r in rows)
    for r in rows:
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"] and "flags" in r
        assert table[tuple("–" if r[k] is None else str(r[k]) for k in ("batch", "prompt_len", "draft", "gamma",
                                                                        "budget"))]["flags"] == str(r["flags"] or "–")

    # --merge re-renders earlier runs (here: one) without running anything.
    merged = CliRunner().invoke(bench.main, ["--merge", str(out), "--out-dir", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    again = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert again["rows"] == rows and again["meta"]["merged_from"] == [data["meta"]["command"]]
    assert (tmp_path / "merged" / "speedup_vs_batch.png").exists()


def test_bench_standalone_draft_and_errors(tmp_path):
    runner = CliRunner()
    # model-* drafts need a draft model; simulation needs random weights.
    result = runner.invoke(bench.main, ["--random-weights", "tiny", "--drafts", "model-full"])
    assert result.exit_code == 1 and "--draft-checkpoint" in result.output
    result = runner.invoke(bench.main, ["--random-weights", "tiny", "--drafts", "self-bogus"])
    assert result.exit_code == 2 and "self-bogus" in result.output
    # A random-weight standalone draft (model-streaming and model-full are added by default), on
    # prompts cut from a JSONL of documents with a real (tiny SentencePiece) tokenizer.
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [{"text": SAMPLE_TEXT * (1 + i)} for i in range(3)])
    tokenizer = make_sentencepiece_dir(tmp_path / "tok")
    args = ["--random-weights", "tiny", "--draft-random-weights", "tiny", "--batch-sizes", "2",
            "--prompts-file", str(docs), "--tokenizer", str(tokenizer),
            "--prompt-lengths", "24", "--gammas", "2", "--budgets", "12", "--sink", "4", "--max-new-tokens", "6",
            "--warmup", "0", "--hardware", "A100-80G", "--device", "cpu", "--out-dir", str(tmp_path / "out")]
    result = runner.invoke(bench.main, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "docs.jsonl" in data["meta"]["prompts"]
    assert [r["draft"] for r in data["rows"]] == ["baseline", "self-streaming", "self-snapkv", "model-streaming",
                                                  "model-full"]
    assert data["simulated_acceptance"] is None and "SIMULATED" not in (tmp_path / "out" / "results.md").read_text()
    assert next(r for r in data["rows"] if r["draft"] == "model-full")["budget"] == -1
