"""The decode-attention micro-benchmark on tiny shapes, and bench.py --kernels wiring.

Without a GPU the Triton rows run in the interpreter (tests/conftest.py sets TRITON_INTERPRET).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from gpt_fast_magicdec.cli import bench
from gpt_fast_magicdec.benchmarking import kernel_report as kr
from gpt_fast_magicdec.benchmarking import kernels as kb
from gpt_fast_magicdec.benchmarking.report import sig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter (tests/conftest.py)
SHAPE = dict(head_dim=16, n_heads=4, n_kv_heads=2, budget=16, sink=4)  # G = 2, window = 12
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_bytes_by_hand():
    # Full view: every live key. Sparse: window keys of all T tokens + the visible selected ones.
    assert kb.keys_read(64, 4) == 68
    assert kb.keys_read(64, 4, window=12, selected=range(4)) == (64 + 4 - 53) + 4  # 53 = 64 - 12 + 1
    assert kb.keys_read(1000, 1, window=12, selected=[0, 1, -1, 995]) == 12 + 2  # -1 and in-window: not read
    assert kb.keys_read(5, 2, window=12, selected=range(4)) == 7  # window covers everything: no selected
    # 2 seqs x 68 keys x 2 KV heads x 16 dims x (K, V) x 4 bytes, + q and out: 2 x 4 heads x 4 tokens x 16 x 4
    assert kb.bytes_moved(2, 68, 4, 4, 2, 16, 4) == 2 * 68 * 2 * 16 * 2 * 4 + 2 * (2 * 4 * 4 * 16 * 4)


def _table(md: str, header: str) -> list[list[str]]:
    lines = md[md.index(header):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| batch"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


@pytest.mark.slow
@needs_triton
def test_kernel_benchmark_smoke(tmp_path):
    copy_bw = 1e10  # given: the fractions are then checkable by hand
    rows = kb.run_kernel_benchmark(DEVICE, torch.float32, [1, 2], [32, 64], n_queries=(1, 4), reps=1, warmup=0,
                                   progress=False, copy_bandwidth=copy_bw, **SHAPE)
    assert len(rows) == 2 * 2 * 2 * len(kb.DEFAULT_METHODS)
    assert all(r["skipped"] is None and r["time_us"] > 0 and r["reps"] == 1 for r in rows), \
        [r["skipped"] for r in rows if r["skipped"]]
    by = {(r["batch"], r["context"], r["n_queries"], r["method"]): r for r in rows}

    # One row by hand: batch 2, context 64, T 4, full view, fp32.
    r = by[2, 64, 4, "triton_full"]
    want = 2 * 68 * 2 * 16 * 2 * 4 + 2 * (2 * 4 * 4 * 16 * 4)
    assert r["keys_per_seq"] == 68 and r["bytes"] == want
    assert r["bandwidth_GBps"] == sig(want / (r["time_us"] * 1e-6) / 1e9, 4) or \
        abs(r["bandwidth_GBps"] / (want / (r["time_us"] * 1e-6) / 1e9) - 1) < 2e-3  # time_us is rounded
    assert abs(r["frac_copy_bw"] - r["bandwidth_GBps"] * 1e9 / copy_bw) <= 0.01 * r["frac_copy_bw"]
    # Sparse view: sink 4 + window 12 + T - 1 keys at both contexts; the full view grows with context.
    for T in (1, 4):
        for B in (1, 2):
            for m in ("triton_sparse", "triton_sparse_compact"):
                assert by[B, 32, T, m]["keys_per_seq"] == by[B, 64, T, m]["keys_per_seq"] == 4 + 12 + T - 1
                assert by[B, 32, T, m]["bytes"] == by[B, 64, T, m]["bytes"]
            assert by[B, 64, T, "triton_full"]["bytes"] > by[B, 32, T, "triton_full"]["bytes"]
            assert by[B, 64, T, "torch_sdpa"]["bytes"] == by[B, 64, T, "triton_full"]["bytes"]
    # The kernels computed the right thing (fp32): against SDPA, and compact against cache-read.
    for r in rows:
        if r["method"] in ("triton_full", "torch_reference", "triton_sparse_compact"):
            assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-4, r
        assert r["meets_target"] is None  # batch < 8: outside the target region (batch >= 8, context >= 16K)

    meta = kr.kernel_meta(DEVICE, torch.float32, command="pytest", copy_bandwidth=copy_bw, **SHAPE)
    paths = kr.write_kernel_report(rows, tmp_path, meta)
    assert set(paths) == {"json", "md", "png"} and all(p.exists() for p in paths.values())
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == rows and data["meta"]["command"] == "pytest"
    for key in ("git_commit", "device_name", "torch_version", "triton_version", "date"):
        assert key in data["meta"]
    flat = data["summary"]["sparse_flat"]
    assert {(s["batch"], s["n_queries"], s["method"]) for s in flat} == \
        {(B, T, m) for B in (1, 2) for T in (1, 4) for m in ("triton_sparse", "triton_sparse_compact")}
    assert all(s["contexts"] == [32, 64] for s in flat)

    md = paths["md"].read_text()
    table = _table(md, "## All measured rows")
    keys = [k for k, _ in kr.COLUMNS]
    assert len(table) == len(rows)
    for cells in table:
        assert len(cells) == len(keys)
        row = by[int(cells[0]), int(cells[1]), int(cells[2]), cells[3]]
        assert cells == [kr._cell(k, row[k]) for k in keys]
        assert cells[keys.index("time_us")] == str(row["time_us"])
        assert cells[keys.index("MB")] == str(sig(row["bytes"] / 1e6))
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000


def _fake_rows(frac_ok: float, frac_low: float) -> list[dict]:
    rows = []
    for B, L, frac, method in [(8, 16384, frac_ok, "triton_full"), (16, 32768, frac_low, "triton_full"),
                               (4, 32768, 0.5, "triton_full"), (8, 16384, 0.1, "torch_sdpa"),
                               (8, 16384, 0.01, "triton_sparse"), (8, 32768, 0.01, "triton_sparse")]:
        keys = kb.keys_read(L, 1, 496, range(16)) if "sparse" in method else kb.keys_read(L, 1)
        nbytes = kb.bytes_moved(B, keys, 1, 32, 8, 128, 2)
        row = dict(batch=B, context=L, n_queries=1, method=method, view=kb.METHODS[method][0], keys_per_seq=keys,
                   bytes=nbytes, MB=sig(nbytes / 1e6), time_us=sig(nbytes / (frac * 3e12) * 1e6),
                   bandwidth_GBps=sig(frac * 3e3), frac_copy_bw=frac, reps=10, graphed=True, num_splits=2,
                   max_abs_err=None, meets_target=None, skipped=None)
        row["meets_target"] = kb.meets_target(row)
        rows.append(row)
    rows.append(dict(rows[0], batch=64, context=131072, time_us=None, bandwidth_GBps=None, frac_copy_bw=None,
                     meets_target=None, skipped="out of memory"))
    return rows


def test_report_marks_target_rows(tmp_path):
    rows = _fake_rows(0.85, 0.7)
    assert [r["meets_target"] for r in rows] == [True, False, None, None, None, None, None]
    meta = kr.kernel_meta("cpu", torch.bfloat16, command="x", copy_bandwidth=3e12, **SHAPE)
    paths = kr.write_kernel_report(rows, tmp_path, meta)
    md = paths["md"].read_text()
    assert ("❌ full view (triton_full) ≥ 80% of copy bandwidth at batch ≥ 8 and context ≥ 16384: "
            "1 of 2 rows") in md
    table = _table(md, "## All measured rows")
    target = [k for k, _ in kr.COLUMNS].index("meets_target")
    assert [c[target] for c in table] == ["✅", "❌", "–", "–", "–", "–"]
    assert "- triton_full: out of memory: 64/131072/1" in md
    summary = json.loads(paths["json"].read_text())["summary"]
    assert summary["target"] == dict(rows=2, meeting=1, lowest_frac=0.7)
    assert [s["flat"] for s in summary["sparse_flat"]] == [True]  # same time at both contexts
    md_ok = kr.write_kernel_report(_fake_rows(0.85, 0.81), tmp_path / "ok", meta)["md"].read_text()
    assert "✅ full view (triton_full)" in md_ok and "2 of 2 rows" in md_ok


def test_bench_kernels_flag(tmp_path, monkeypatch):
    """bench.py --kernels passes the sweep to run_kernel_benchmark and writes the report."""
    seen = {}

    def fake(device, dtype, batch_sizes, contexts, **kw):
        seen.update(device=device, dtype=dtype, batch_sizes=batch_sizes, contexts=contexts, **kw)
        return _fake_rows(0.9, 0.9)

    monkeypatch.setattr(kb, "run_kernel_benchmark", fake)
    out = tmp_path / "k"
    res = CliRunner().invoke(bench.main, ["--kernels", "--batch-sizes", "8,16", "--prompt-lengths", "16384,32768",
                                          "--gammas", "3", "--budgets", "512", "--sink", "16", "--device", "cpu",
                                          "--dtype", "bfloat16", "--hardware", "H100-SXM", "--out-dir", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert seen["batch_sizes"] == [8, 16] and seen["contexts"] == [16384, 32768]
    assert seen["n_queries"] == [1, 4] and seen["budget"] == 512 and seen["sink"] == 16
    assert seen["dtype"] == torch.bfloat16 and seen["copy_bandwidth"] == 3.35e12
    data = json.loads((out / "kernels.json").read_text())
    assert data["meta"]["command"].startswith("python bench.py") and "--kernels" in data["meta"]["command"]
    assert data["meta"]["bandwidth_source"] == "H100-SXM"
    assert (out / "kernels.md").exists() and (out / "kernels.png").exists()
    assert not (out / "kernels.partial.json").exists()
