"""First light on a GPU: one prepared command that proves the CUDA path inside one short device lease.

    python -m benchmarks.gpu_first_light --out-dir $OUT --budget-s 500 --commit SHA    # the device run
    python -m benchmarks.gpu_first_light --out-dir /tmp/first-light --dry-run          # CPU rehearsal (CI)
    python -m benchmarks.gpu_first_light --list                                        # the plan only

Stages, in this order (each a subprocess of the stable CLIs, each under its own time limit; see
benchmarks/lease.py for the budget rules and what is written after every stage):
  env               GPU, driver, versions; measured copy bandwidth and bf16 matmul rate (the ceilings)
  gpu-tests         pytest -m gpu -x, per-test timeout
  cuda-cpu-tests    the CPU tests that take another path on a CUDA machine
  lossless-bundled  the bundled model in bf16 with CUDA graphs: self streaming, SnapKV, the bundled draft
  lossless-8b       random llama-3.1-8b bf16, batch 8, 4K prompt
  headline          random llama-3.1-8b bf16, 16K prompt, batch 1 / 32 / the largest that fits, gamma 3,
                    streaming budget 512, simulated acceptance 0.82: T_T, T_V/T_T, T_D/T_T, bandwidth, speedup
  kernels           the Triton decode kernels against SDPA and the torch reference, two batches x two contexts
  roofline          plain batch-1 decoding with compiled steps (eager steps if the compile cannot fit)

Compile or not, per stage: torch.compile with the engine's inductor settings costs ~0.5-1 minute per
step shape for a 32-layer model before any GPU tuning (measured on CPU, benchmarks/README.md), and
public reports put an 8B model at one to two minutes per shape on a GPU. A speculative bench point
has three shapes (decode, verify, draft) and every new batch size recompiles, so every stage runs
eager steps captured as CUDA graphs (--no-compile), except the roofline row: one shape, where the
launch gaps of eager kernels matter most.

`--stages figures` is the second lease's set (benchmarks/gpu_figures.py).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
import shlex
import signal
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import click
import torch

from benchmarks.lease import ROOT, CommandFailed, Lease, Outcome, Stage, StageRun
from gpt_fast_magicdec.benchmarking.report import git_commit, utc_now
from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.cost_model import param_count, params_touched, weight_bytes
from gpt_fast_magicdec.memory import kv_bytes_per_token
from gpt_fast_magicdec.errors import UserError

PY = sys.executable

# ---- planning numbers for one H200 (sources: benchmarks/README.md, "First light") -----------------
COPY_BW = 4.3e12  # B/s, device-to-device copy counting read + write, measured on this workplace's H200s
PREFILL_FLOPS = 600e12  # FLOP/s a long prefill's GEMMs reach: ~75% of the measured 790 TFLOP/s bf16 matmul
ATTN_FLOPS = 400e12  # FLOP/s of causal flash attention (SDPA) in prefill, bf16, head_dim 128
DECODE_FRAC = 0.85  # decode steps read their bytes at the target fraction of copy bandwidth
START_S = 20.0  # a fresh process: torch import, CUDA context, random 8B weights built on the GPU, ceilings
CAPTURE_S = 5.0  # Triton JIT + CUDA-graph capture of one batch size's eager steps
COMPILE_S = 120.0  # torch.compile of one 8B step shape with coordinate-descent tuning, cold cache
KV_HEADROOM = 0.85  # of GPU memory for weights + KV: the rest is prefill activations and graph pools
TIMEOUT_PER_TEST_S = 120  # pytest-timeout, where installed (the device image has it)
MIN_SELF_ACCEPTANCE = 0.9  # the bundled model's self streaming draft on its README passage (1.00 on the CPU)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one mode: the device run, or the dry run's tiny CPU stand-ins."""
    device: str
    dtype: str
    model: str  # the random-weight preset of the big stages
    bundled_prompt: str
    bundled_new: int
    lossless: tuple  # (batch, prompt length, new tokens)
    headline_prompt: int
    headline_batches: tuple  # besides the largest that fits (device only)
    budget: int  # the draft's KV budget (sink 16 + window)
    headline_new: int
    kernel_batches: tuple
    kernel_contexts: tuple
    roofline: tuple  # (prompt length, new tokens)
    gpu_tests: str  # where `pytest -m gpu` looks: every test file on the device, the GPU file alone in the dry run
    hardware: str  # bench.py's profile: measured on the device; a preset in the dry run (measuring a CPU is slow)
    dry: bool


DEVICE = Shapes(device="cuda", dtype="bfloat16", model="llama-3.1-8b", bundled_prompt="tests/data/long_passage.txt",
                bundled_new=64, lossless=(8, 4096, 64), headline_prompt=16384, headline_batches=(1, 32), budget=512,
                headline_new=128, kernel_batches=(8, 32), kernel_contexts=(4096, 16384), roofline=(128, 256),
                gpu_tests="tests", hardware="measure", dry=False)
DRY = Shapes(device="cpu", dtype="float32", model="tiny-llama3", bundled_prompt="tests/data/tiny_passage.txt",
             bundled_new=8, lossless=(2, 128, 8), headline_prompt=256, headline_batches=(1, 2), budget=64,
             headline_new=8, kernel_batches=(1,), kernel_contexts=(256,), roofline=(32, 16),
             gpu_tests="tests/test_gpu.py", hardware="H200", dry=True)
SINK, GAMMA, ALPHA = 16, 3, 0.82


# ---- planning ---------------------------------------------------------------------------------------
def prefill_s(args, batch: int, length: int) -> float:
    """Seconds to prefill batch x length tokens: the GEMMs (2 FLOPs per parameter per token) plus
    causal attention (QK^T and PV over length^2 / 2 pairs per head)."""
    gemm = 2 * params_touched(args) * batch * length / PREFILL_FLOPS
    attn = 2 * 2 * length * length / 2 * args.n_heads * args.head_dim * args.n_layers * batch / ATTN_FLOPS
    return gemm + attn


def step_s(args, batch: int, context: int) -> float:
    """Seconds of one plain decode step: weights + live KV at DECODE_FRAC of copy bandwidth."""
    return (weight_bytes(args) + batch * context * kv_bytes_per_token(args)) / (DECODE_FRAC * COPY_BW)


def bench_estimate_s(args, batches, length: int, new: int, runs: int = 3) -> float:
    """bench.py with --warmup 0 --repeats 1 and one speculative configuration: A B A, each run with its
    own prefill; a speculative run decodes in ~60% of a plain one at acceptance 0.82."""
    per_batch = [runs * prefill_s(args, b, length) + (2 + 0.6) * new * step_s(args, b, length) + CAPTURE_S
                 for b in batches]
    return START_S + sum(per_batch)


def largest_batch(total_memory: int, args, seq_len: int, multiple: int = 8) -> int:
    """The largest batch (a multiple of 8) whose KV cache and weights fit KV_HEADROOM of the GPU."""
    per_seq = kv_bytes_per_token(args) * (seq_len + 256 + 16)  # the engine rounds slots up to 256, + scratch
    fits = int((KV_HEADROOM * total_memory - 2 * param_count(args)) // per_seq)
    return fits // multiple * multiple


# ---- reading the CLIs' outputs ------------------------------------------------------------------------
PREFILL = re.compile(r"prefill: (\d+) tokens in ([\d.]+) s(?: \(\+ ([\d.]+) s compiling and capturing CUDA graphs\))?")
DECODE = re.compile(r"decode:\s+(\d+) tokens in ([\d.]+) s = ([\d.]+) tokens/s")
ACCEPTANCE = re.compile(r"acceptance rate ([\d.]+)")
SPEEDUP = re.compile(r"== speedup over plain decoding: ([\d.]+)x")
LOSSLESS = re.compile(r"greedy outputs identical: (.*)")
DIVERGENCE = re.compile(r"sequence \d+: first divergence at .*")
BANDWIDTH = re.compile(r"([\d.]+) GB/s achieved per rank = (\d+)% of measured copy bandwidth \(([\d.]+) GB/s\)")


def _num(match, group: int = 1) -> Optional[float]:
    return float(match.group(group)) if match and match.group(group) is not None else None


def parse_generate(text: str) -> dict:
    """generate.py's summary: per run (== plain decoding / == draft: ...) prefill, compile + capture and
    decode seconds, tokens/s and acceptance; then the speedup, the lossless verdict and bandwidth."""
    runs = []
    for block in re.split(r"^(?=== )", text, flags=re.M):
        head = re.match(r"== (plain decoding|draft: .*)", block)
        if head is None:
            continue
        prefill, decode = PREFILL.search(block), DECODE.search(block)
        runs.append(dict(run=head.group(1).strip(), prefill_s=_num(prefill, 2),
                         capture_s=_num(prefill, 3) or (0.0 if prefill else None),
                         decode_s=_num(decode, 2), tokens_per_s=_num(decode, 3),
                         acceptance=_num(ACCEPTANCE.search(block))))
    lossless, bandwidth = LOSSLESS.search(text), BANDWIDTH.search(text)
    return dict(runs=runs, speedup=_num(SPEEDUP.search(text)), lossless=lossless.group(1) if lossless else None,
                divergences=DIVERGENCE.findall(text), bandwidth_GBps=_num(bandwidth),
                bandwidth_frac=_num(bandwidth, 2) / 100 if bandwidth else None, copy_GBps=_num(bandwidth, 3))


def parse_junit(path: Path) -> dict:
    """pytest's --junitxml: counts and the ids of failed tests."""
    if not path.is_file():
        return dict(tests=None)
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname', '')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return dict(**{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
                seconds=float(suite.get("time", 0)), failed=failed)


# ---- stages -----------------------------------------------------------------------------------------------
def env_stage(run: StageRun, s: Shapes) -> Outcome:
    out = run.path("env.json")
    cmd = run.sh([PY, "-m", "gpt_fast_magicdec.benchmarking.environment", "--device", s.device, "--out", out])
    env = json.loads(out.read_text())
    run.meta.update(device_name=env["device_name"], torch=env["torch"], triton=env.get("triton"),
                    driver=(env.get("nvidia_smi") or {}).get("driver_version"))
    return Outcome(None, cmd.output.strip().splitlines()[-1], env)


def pytest_command(junit: Path, *args) -> list:
    argv = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout") is not None:  # on the device image; not a test dependency
        argv += ["--timeout", str(TIMEOUT_PER_TEST_S)]
    return argv + list(args)


def pytest_outcome(run: StageRun, argv: list, junit: Path) -> Outcome:
    """Run pytest; the counts from its junit file, failed test ids in the result line."""
    cmd = run.sh(argv, check=False)
    counts = parse_junit(junit)
    if counts["tests"] is None:
        raise CommandFailed(f"pytest exit {cmd.rc}, no report written", dict(rc=cmd.rc))
    line = (f"{counts['tests']} tests: {counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} "
            f"passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped "
            f"in {counts['seconds']:.0f} s")
    if cmd.rc != 0:
        raise CommandFailed(line + "; failed: " + ", ".join(counts["failed"][:6]), dict(counts, rc=cmd.rc))
    return Outcome(True, line, dict(counts, rc=cmd.rc))


def gpu_tests_stage(run: StageRun, s: Shapes) -> Outcome:
    junit = run.path("junit.xml")
    return pytest_outcome(run, pytest_command(junit, "-m", "gpu", "-x", s.gpu_tests), junit)


def cuda_aware_test_files() -> list[str]:
    """Test files, besides the GPU-only one, that call torch.cuda.is_available(): their tests take
    another path (compiled Triton, CUDA graphs, the CUDA default device) on a machine with a GPU."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if p.name != "test_gpu.py" and "torch.cuda.is_available()" in p.read_text())


def cuda_cpu_tests_stage(run: StageRun, s: Shapes) -> Outcome:
    junit, files = run.path("junit.xml"), cuda_aware_test_files()
    argv = pytest_command(junit, "-m", "not gpu", "--maxfail", "10", *files)
    if s.dry:  # CI runs these tests itself: the rehearsal collects them, with the device run's arguments
        cmd = run.sh([*argv, "--collect-only"])
        n = sum(int(x) for x in re.findall(r"^tests/\S+\.py: (\d+)$", cmd.output, re.M))
        return Outcome(None, f"dry run: {n} tests in {len(files)} files collected, not run", dict(files=files))
    outcome = pytest_outcome(run, argv, junit)
    outcome.data["files"] = files
    return outcome


def generate_command(s: Shapes, *args) -> list:
    return [PY, "generate.py", "--device", s.device, "--dtype", s.dtype, "--no-progress", *args]


def lossless_verdict(name: str, parsed: dict, rc: int) -> str:
    """`name: identical (1 sequence), acceptance 0.95, 1.2x, compile+capture 0.8 s`, or why not."""
    spec = parsed["runs"][-1] if parsed["runs"] else {}
    capture = sum(r["capture_s"] or 0 for r in parsed["runs"])
    verdict = f"identical: {parsed['lossless']}" if parsed["lossless"] else f"no verdict (exit {rc})"
    extra = [f"acceptance {spec['acceptance']:.2f}" if spec.get("acceptance") is not None else None,
             f"{parsed['speedup']:.2f}x" if parsed["speedup"] is not None else None,
             f"compile+capture {capture:.1f} s"]
    return f"{name}: {verdict}; " + ", ".join(x for x in extra if x)


def lossless_runs(run: StageRun, runs: dict) -> Outcome:
    """Each name -> generate.py --compare argv; all run, then the stage fails if any diverged."""
    data, lines, failed = {}, [], []
    for name, argv in runs.items():
        cmd = run.sh(argv, check=False)
        parsed = parse_generate(cmd.output)
        data[name] = dict(parsed, rc=cmd.rc)
        lines.append(lossless_verdict(name, parsed, cmd.rc))
        if cmd.rc != 0 or parsed["lossless"] is None:
            failed.append(name)
    if failed:
        raise CommandFailed(f"{', '.join(failed)} failed: " + "; ".join(lines), data)
    return Outcome(True, "; ".join(lines), data)


def lossless_bundled_stage(run: StageRun, s: Shapes) -> Outcome:
    base = ["--prompt-file", s.bundled_prompt, "--max-new-tokens", s.bundled_new, "--ignore-eos", "--compare",
            "--no-compile"]
    variants = {"self streaming": [], "self snapkv": ["--draft-kv", "snapkv"],
                "bundled draft": ["--draft-checkpoint", "bundled-draft"]}
    outcome = lossless_runs(run, {name: generate_command(s, *base, *extra) for name, extra in variants.items()})
    # Lossless holds even when the drafts are wrong (verification rejects them), so a draft step that
    # proposes the wrong tokens on the device shows only as acceptance: the self-draft accepts every
    # draft of this passage on the CPU (README, quick start).
    accepted = outcome.data["self streaming"]["runs"][-1]["acceptance"]
    if not s.dry and accepted is not None and accepted < MIN_SELF_ACCEPTANCE:
        outcome.ok = False
        outcome.result = (f"missed: self streaming accepted {accepted:.2f} of its drafts (>= {MIN_SELF_ACCEPTANCE} "
                          "expected: 1.00 on the CPU); " + outcome.result)
    return outcome


def lossless_8b_stage(run: StageRun, s: Shapes) -> Outcome:
    batch, length, new = s.lossless
    argv = generate_command(s, "--random-weights", s.model, "--bsz", batch, "--prompt-length", length,
                            "--max-new-tokens", new, "--ignore-eos", "--compare", "--no-compile")
    return lossless_runs(run, {f"{s.model} batch {batch} x {length}": argv})


def headline_batches(run: StageRun, s: Shapes) -> list[int]:
    """The stage's batch sizes and the largest that fits the GPU the env stage found."""
    batches = list(s.headline_batches)
    memory = run.earlier.get("env", {}).get("total_memory_bytes")
    if memory:
        batches.append(largest_batch(memory, ModelArgs.from_preset(s.model), s.headline_prompt + s.headline_new))
    return sorted(set(batches))


def bench_command(s: Shapes, out_dir: Path, *args) -> list:
    return [PY, "bench.py", "--device", s.device, "--dtype", s.dtype, "--hardware", s.hardware, "--out-dir", out_dir,
            *args]


def headline_stage(run: StageRun, s: Shapes) -> Outcome:
    out = run.path("bench")
    batches = headline_batches(run, s)
    run.sh(bench_command(s, out, "--random-weights", s.model, "--batch-sizes", ",".join(map(str, batches)),
                         "--prompt-lengths", s.headline_prompt, "--drafts", "self-streaming", "--budgets", s.budget,
                         "--sink", SINK, "--gammas", GAMMA, "--simulate-acceptance", ALPHA,
                         "--max-new-tokens", s.headline_new, "--warmup", 0, "--repeats", 1, "--no-compile"))
    results = json.loads((out / "results.json").read_text())
    run.keep(out / "speedup_vs_batch.png", "headline_speedup.png")
    return judge_headline(results, judged_batch=32, largest=max(batches), judge=not s.dry)


def judge_headline(results: dict, judged_batch: int, largest: int, judge: bool = True) -> Outcome:
    """Issue targets on bench's rows: at batch 32 plain decoding >= 85% of copy bandwidth, T_V/T_T <=
    1.10 and T_D/T_T <= 0.25; at the largest batch speedup >= 1.8x, within 10% of the speedup that
    its measured step times predict."""
    rows = results["rows"]
    plain = {r["batch"]: r for r in rows if r["gamma"] is None}
    spec = {r["batch"]: r for r in rows if r["gamma"] is not None}
    checks, parts = [], []
    for b in sorted(spec):
        p, r = plain[b], spec[b]
        capture = (p.get("capture_s") or 0) + (r.get("capture_s") or 0)
        parts.append(f"B{b}: T_T {p['T_T_ms']} ms, BW {p.get('bandwidth_frac')}, T_V/T_T {r['verify_ratio']}, "
                     f"T_D/T_T {r['draft_ratio']}, speedup {r['speedup']}x (pred. {r['speedup_pred_measured_T']} "
                     f"meas. T, {r['speedup_pred_cost_model']} model), compile+capture {capture:.1f} s")
    if judged_batch in spec:
        p, r = plain[judged_batch], spec[judged_batch]
        checks += [("BW", p.get("bandwidth_frac") is not None and p["bandwidth_frac"] >= 0.85),
                   ("T_V/T_T", r["verify_ratio"] <= 1.10), ("T_D/T_T", r["draft_ratio"] <= 0.25)]
    else:
        checks.append((f"batch {judged_batch} measured", False))
    if largest in spec:
        r = spec[largest]
        pred = r["speedup_pred_measured_T"]
        checks += [("speedup", r["speedup"] >= 1.8), ("vs prediction", abs(r["speedup"] / pred - 1) <= 0.10)]
    else:
        checks.append((f"batch {largest} measured", False))
    skipped = [f"B{x['batch']} skipped ({x['reason']})" for x in results.get("skipped", [])]
    missed = [name for name, ok in checks if not ok]
    if not judge:
        verdict, ok = "dry run: targets not judged", None
    else:
        verdict, ok = ("all targets met" if not missed else "missed: " + ", ".join(missed)), not missed
    return Outcome(ok, "; ".join([verdict, *parts, *skipped]), dict(rows=rows, skipped=results.get("skipped", []),
                                                                    checks=dict(checks)))


def kernels_stage(run: StageRun, s: Shapes) -> Outcome:
    out = run.path("kernels")
    run.sh(bench_command(s, out, "--kernels", "--batch-sizes", ",".join(map(str, s.kernel_batches)),
                         "--prompt-lengths", ",".join(map(str, s.kernel_contexts)), "--gammas", GAMMA,
                         "--budgets", s.budget, "--sink", SINK))
    report = json.loads((out / "kernels.json").read_text())
    run.keep(out / "kernels.png", "kernels.png")
    return judge_kernels(report, judge=not s.dry)


def judge_kernels(report: dict, judge: bool = True) -> Outcome:
    """The full-view bandwidth target, sparse time flat in context, and Triton's time against SDPA's."""
    target, rows = report["summary"]["target"], report["rows"]
    times = {(r["batch"], r["context"], r["n_queries"], r["method"]): r["time_us"] for r in rows if r["time_us"]}
    ratios = [times[(b, c, t, "torch_sdpa")] / us for (b, c, t, m), us in times.items()
              if m == "triton_full" and (b, c, t, "torch_sdpa") in times]
    flat = [f for f in report["summary"]["sparse_flat"] if f["flat"] is not None]
    no_triton = sorted({r["skipped"] for r in rows if r["method"].startswith("triton") and r["time_us"] is None})
    parts = [f"no Triton row measured ({'; '.join(no_triton)})" if no_triton and not ratios else None,
             f"full view >= 80% of copy BW: {target['meeting']} of {target['rows']} rows (lowest "
             f"{target['lowest_frac']})" if target["rows"] else "no row in the full-view target region",
             f"SDPA time / Triton full-view time: {min(ratios):.2f}-{max(ratios):.2f}" if ratios else None,
             f"sparse time flat in context: {sum(f['flat'] for f in flat)} of {len(flat)}" if flat else None]
    ok = (target["meeting"] == target["rows"] and all(f["flat"] for f in flat)) if judge and target["rows"] else None
    return Outcome(ok, "; ".join(p for p in parts if p), dict(summary=report["summary"], rows=rows))


def roofline_stage(run: StageRun, s: Shapes, compile: bool) -> Outcome:
    length, new = s.roofline
    cmd = run.sh(generate_command(s, "--random-weights", s.model, "--bsz", 1, "--prompt-length", length,
                                  "--draft", "none", "--max-new-tokens", new, "--ignore-eos", "--verbose",
                                  "--compile" if compile else "--no-compile"))
    parsed = parse_generate(cmd.output)
    plain = parsed["runs"][0] if parsed["runs"] else {}
    frac = parsed["bandwidth_frac"]
    line = (f"{'compiled' if compile else 'eager'} steps{'' if s.dry else ' in CUDA graphs'}: "
            f"{plain.get('tokens_per_s')} tokens/s, "
            f"{parsed['bandwidth_GBps']} GB/s = {frac} of copy BW ({parsed['copy_GBps']} GB/s); "
            f"compile+capture {plain.get('capture_s')} s")
    ok = None if s.dry or frac is None else frac >= 0.85
    return Outcome(ok, line, parsed)


def first_light_stages(s: Shapes) -> list[Stage]:
    """The stages in their planned order, with planned seconds and hard limits."""
    model = ModelArgs.from_preset(s.model)
    batches = [*s.headline_batches, 48]  # 48: the largest batch that fits an H200 at 16K (planning only)
    headline_s = bench_estimate_s(model, batches, s.headline_prompt, s.headline_new)
    batch, length, new = s.lossless
    lossless_8b_s = START_S + 2 * prefill_s(model, batch, length) + 3 * new * step_s(model, batch, length) + 10
    roofline_eager_s = START_S + 2 * s.roofline[1] * step_s(model, 1, s.roofline[0]) + 5
    stages = [
        Stage("env", "GPU name, driver, torch and triton versions; measured copy bandwidth and bf16 matmul rate "
              "(the ceilings every later figure is divided by)", 25, 90, functools.partial(env_stage, s=s)),
        Stage("gpu-tests", "`pytest -m gpu -x tests` with a per-test timeout: CUDA graph replay == eager, re-capture "
              "after shape changes, one host sync per round, bf16 speculative == plain up to near-ties, fp32 LM "
              "head, Triton == reference on the device. Target: all pass", 90, 180,
              functools.partial(gpu_tests_stage, s=s)),
        Stage("cuda-cpu-tests", "the CPU tests that take another path on a CUDA machine (test files that call "
              "torch.cuda.is_available()). Target: all pass", 60, 120, functools.partial(cuda_cpu_tests_stage, s=s)),
        Stage("lossless-bundled", f"bundled model, {s.dtype}, eager steps in CUDA graphs: self streaming, self "
              "SnapKV and the bundled draft, `generate.py --compare`. Targets: greedy speculative == plain except at "
              "reported near-ties; self streaming accepts >= 0.9 of its drafts (1.00 on the CPU)", 45, 120,
              functools.partial(lossless_bundled_stage, s=s)),
        Stage("lossless-8b", f"random {s.model} {s.dtype}, batch {batch}, {length}-token prompts, self streaming: "
              "the same target", round(lossless_8b_s), 120, functools.partial(lossless_8b_stage, s=s)),
        Stage("headline", f"random {s.model} {s.dtype}, {s.headline_prompt}-token prompts, batch "
              f"{', '.join(map(str, s.headline_batches))} and the largest that fits; self streaming budget "
              f"{s.budget}, gamma {GAMMA}, simulated acceptance {ALPHA}; eager steps "
              "in CUDA graphs. Targets: plain decoding >= 85% of copy BW, T_V/T_T <= 1.10 and T_D/T_T <= 0.25 at "
              "batch 32; speedup >= 1.8x at the largest batch, within 10% of the prediction from measured step "
              "times", round(headline_s), round(1.3 * headline_s), functools.partial(headline_stage, s=s)),
        Stage("kernels", "`bench.py --kernels`: Triton full and sparse views against SDPA and the torch reference, "
              f"batch {'/'.join(map(str, s.kernel_batches))} x context {'/'.join(map(str, s.kernel_contexts))}, "
              "T 1 and 4. Target: full view >= 80% of copy BW at batch >= 8 and context >= 16K", 45, 120,
              functools.partial(kernels_stage, s=s)),
        Stage("roofline-compiled", f"plain batch-1 decoding of random {s.model}, compiled steps (one step shape) in "
              "CUDA graphs. Target: >= 85% of copy BW; records what the compile costs",
              round(START_S + COMPILE_S + roofline_eager_s), 300, functools.partial(roofline_stage, s=s, compile=True),
              fallback=Stage("roofline-eager", "plain batch-1 decoding, eager steps in CUDA graphs (the compiled "
                             "run did not fit). Target: >= 85% of copy BW", round(roofline_eager_s), 90,
                             functools.partial(roofline_stage, s=s, compile=False))),
    ]
    if s.dry:  # tiny shapes on a CPU: seconds each; the limits leave room for a slow CI machine
        return [dataclasses.replace(st, estimate_s=10, limit_s=120, fallback=None) for st in stages[:-1]] + [
            dataclasses.replace(stages[-1].fallback, estimate_s=10, limit_s=120)]
    return stages


# ---- the command ----------------------------------------------------------------------------------------
def stage_sets() -> dict:
    """--stages name -> (report name, stage builder). The figures set builds on this module's helpers."""
    from benchmarks.gpu_figures import figures_stages

    return {"first-light": ("first_light", first_light_stages), "figures": ("figures", figures_stages)}


def select(stages: list[Stage], only: Optional[str]) -> list[Stage]:
    """--only NAME,...: those stages (a fallback's name runs the fallback itself), in the set's order."""
    if not only:
        return stages
    names = {n.strip() for n in only.split(",") if n.strip()}
    known = {st.name: st for st in stages} | {st.fallback.name: st.fallback for st in stages if st.fallback}
    unknown = sorted(names - set(known))
    if unknown or not names:
        raise UserError(f"--only: unknown stage(s) {', '.join(unknown) or '(none given)'}; the stages are "
                        f"{', '.join(known)}")
    return [st for name, st in known.items() if name in names]


def recorded_command(argv: list[str]) -> str:
    """This command as the report records it: the --out-dir value as $OUT (a machine path)."""
    shown, hide = [], False
    for arg in argv:
        shown.append("OUT_DIR" if hide else "--out-dir=OUT_DIR" if arg.startswith("--out-dir=") else arg)
        hide = arg == "--out-dir"
    return shlex.join(["python", "-m", "benchmarks.gpu_first_light", *shown]).replace("OUT_DIR", "$OUT")


def plan_lines(stages: list[Stage], budget_s: float) -> list[str]:
    total = sum(st.estimate_s for st in stages)
    lines = [f"{'stage':<18} {'est. s':>6} {'limit s':>7}  checks"]
    for st in stages:
        lines.append(f"{st.name:<18} {st.estimate_s:>6.0f} {st.limit_s:>7.0f}  {st.checks}")
        if st.fallback is not None:
            fb = st.fallback
            lines.append(f"  or {fb.name:<15} {fb.estimate_s:>6.0f} {fb.limit_s:>7.0f}  (when {st.name} does not fit)")
    lines.append(f"estimates sum to {total:.0f} s against a budget of {budget_s:.0f} s: a stage whose estimate "
                 "exceeds what is left when its turn comes is skipped")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the report goes: NAME.md (one row per stage), NAME.json (every stage's raw result), "
                   "NAME.log (each command's output tail) and a few plots; rewritten after every stage. "
                   "Keep it small: it is what comes back from the device machine.")
@click.option("--budget-s", type=click.FloatRange(min=1), default=500, show_default=True,
              help="Seconds the whole run may take. A stage starts only if its estimate fits in what is left, "
                   "and its time limit is cut to what is left.")
@click.option("--stages", "stage_set", type=click.Choice(["first-light", "figures"]), default="first-light",
              show_default=True,
              help="Which stage set: first-light (the CUDA path, lossless, the headline figure, kernels, the "
                   "roofline row), or figures (speedup vs batch at 4K/16K/32K, the kernel sweep, where speculation "
                   "loses, the bundled draft, the cost model on the device: the lease after first light).")
@click.option("--only", default=None, metavar="NAME,...",
              help="Run only these stages of the set (e.g. to re-run one after a fix); see --list for the names.")
@click.option("--dry-run", is_flag=True,
              help="Rehearse on the CPU: the same stages and commands at tiny shapes (the bundled model in fp32, "
                   "random tiny-llama3), in about a minute on two cores, so an argument, import or path error shows "
                   "in CI.")
@click.option("--commit", default=None,
              help="The commit being measured, recorded in every output. Default: this checkout's git HEAD; give "
                   "it when the tree was copied without its .git directory (as on the device machine).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch directory for the stages' full outputs (bench results, test reports). Default: a new "
                   "temporary directory.")
@click.option("--list", "list_only", is_flag=True,
              help="Print the stages with their estimates and limits; run nothing.")
def main(out_dir, budget_s, stage_set, only, dry_run, commit, work_dir, list_only):
    """Run the first-light stages in order, each under its own time limit and within --budget-s,
    writing each stage's result into --out-dir as it completes, and print the short table last."""
    signal.signal(signal.SIGTERM, _stopped)  # a stopped run still kills its command and writes its report
    try:
        failed = run(out_dir, budget_s, stage_set, only, dry_run, commit, work_dir, list_only)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    sys.exit(1 if failed else 0)


def _stopped(signum, frame):
    raise SystemExit(128 + signum)


def run(out_dir, budget_s, stage_set, only, dry_run, commit, work_dir, list_only) -> bool:
    """-> whether a stage failed, timed out or crashed (a missed target is a result, not a failure)."""
    name, build = stage_sets()[stage_set]
    stages = select(build(DRY if dry_run else DEVICE), only)
    if list_only:
        click.echo("\n".join(plan_lines(stages, budget_s)))
        return False
    if out_dir is None:
        raise UserError("--out-dir is required (or --list to see the plan)")
    if not dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible here: run this on the device machine, or rehearse it with --dry-run")
    meta = dict(command=recorded_command(sys.argv[1:]), commit=commit or git_commit() or "unknown (pass --commit)",
                device_name=None, date=utc_now(), stage_set=stage_set, dry_run=dry_run)
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix=f"{name}-"))
    # The rehearsal hides any GPU from its commands (it runs the CPU path on every machine, CI's or a
    # GPU's) and gives each one thread: its tiny steps gain nothing from more, and on a busy machine
    # OpenMP threads waiting for each other made them ~20x slower.
    rehearsal = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if dry_run else None
    lease = Lease(name, stages, budget_s, out_dir, work_dir, meta, child_env=rehearsal)
    try:
        entries = lease.run()
    finally:
        lease.meta["finished"] = utc_now()
        lease.write()
    return any(e["status"] in ("failed", "timeout", "crashed") for e in entries)


if __name__ == "__main__":
    main()
