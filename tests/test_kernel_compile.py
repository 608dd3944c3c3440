"""Ahead-of-time compile of every decode-attention kernel variant the engine launches (the attention
mass of a scoring verification included), for sm_90 and
sm_80, with no GPU: compilation must succeed and ptxas must report no register spills.

The launches come from `launch_plan` (the function `decode_attention_triton` launches through) on
meta tensors, and are bound by triton's own launcher binder, so the pointer dtypes, the integer
specialisations (== 1, % 16) and the constexprs compiled here are the ones a real launch compiles.
Triton's interpreter (TRITON_INTERPRET=1, set for the other tests on CPU) replaces the compiler, so
the compile runs in a child process without it: `python tests/test_kernel_compile.py` prints the
table this test checks.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles every Triton launch the engine makes

pytest.importorskip("triton", reason="triton is not installed")

ARCHS = (90, 80)
S_MAX = 8192  # cache length: only the divisibility of the strides matters here
DRAFT = dict(n_sel=64, window=448)  # a 512-key sparse budget: selected slots + sliding window
# name: (H, H_kv, D, roles, sliding window); roles say which (view, T) the engine launches for that
# model; a sliding-window model compiles the kernel's layer bound on the selected keys too.
MODELS = {
    "llama3.1-8b": (32, 8, 128, "target draft", None),
    "llama3.2-1b": (32, 8, 64, "draft full-draft", None),
    "llama3.1-70b-tp8": (8, 1, 128, "target draft", None),
    "qwen2.5-7b": (28, 4, 128, "target draft", None),
    "mistral-7b-v0.1": (32, 8, 128, "target draft", 4096),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY_T = range(2, 17)  # gamma + 1 for gamma 1..15 (--gamma auto picks 1..8)


def engine_launches(batch: int = 4):
    """(name, dtype, view, T, model dims) for every launch the engine makes."""
    for name, (H, H_kv, D, roles, sliding_window) in MODELS.items():
        for dtype in (torch.bfloat16, torch.float16):
            ts = []
            if "target" in roles:
                ts += [("full", t) for t in (1, *VERIFY_T)]  # plain decode / self-draft, verify
            if "full-draft" in roles:
                ts += [("full", t) for t in (1, 2)]  # a standalone draft over its whole cache
            if "draft" in roles.split():
                ts += [(view, t) for view in ("sparse", "compact") for t in (1, 2)]
            for view, T in ts:
                yield f"{name} {view} T={T}", dtype, view, T, (batch, H, H_kv, D, sliding_window)


def plan_for(dtype, view, T, dims, num_splits, mass=False):
    """launch_plan on meta tensors laid out as the engine lays them out (mass: with the attention
    mass output of a re-selecting draft's scoring verification)."""
    from gpt_fast_magicdec.kernels.decode_attention import launch_plan

    B, H, H_kv, D, sliding_window = dims
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, T, H, D, **meta).transpose(1, 2)  # [B, H, T, D] from the [B, T, H*D] projection
    k = torch.empty(B, H_kv, S_MAX, D, **meta)
    cache_len = torch.empty(B, device="meta", dtype=torch.long)
    sparse = {}
    if view != "full":
        sparse = dict(sel_pos=torch.empty(B, H_kv, DRAFT["n_sel"], device="meta", dtype=torch.long),
                      window=DRAFT["window"])
    if view == "compact":
        sparse.update(sel_k=torch.empty(B, H_kv, DRAFT["n_sel"], D, **meta),
                      sel_v=torch.empty(B, H_kv, DRAFT["n_sel"], D, **meta))
    if mass:
        sparse["mass_out"] = torch.empty(B, H_kv, S_MAX, device="meta", dtype=torch.float32)
    return launch_plan(q, k, k, cache_len, scale=D ** -0.5, num_splits=num_splits, sliding_window=sliding_window,
                       **sparse)


def bind(fn, call, arch):
    """What triton's launcher compiles for `call`: (signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*call.args, **call.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, call.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, dict(num_warps=options.num_warps, num_stages=options.num_stages)


def compile_one(job):
    """Compile one variant; n_regs / spills parsed from ptxas' -v log (a CompiledKernel only learns
    its register count when loaded onto a GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gpt_fast_magicdec.kernels import decode_attention as KD

    kname, arch, (signature, constexprs, attrs, options) = job
    src = ASTSource(getattr(KD, f"_{kname}_kernel"), signature, constexprs, attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True  # printed to stdout, captured above
        triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(n_regs=int(regs.group(1)), n_spills=int(spills.group(1)) + int(spills.group(2)),
                shared=kernel.metadata.shared)


def compile_table(workers: int):
    """One row per (launch, kernel, arch); identical compile inputs are compiled once."""
    from gpt_fast_magicdec.kernels import decode_attention as KD

    rows, jobs = [], {}
    for name, dtype, view, T, dims in engine_launches():
        for splits in (1, 3):  # SPLIT_OUT false / true; the count itself is a runtime int
            plan = plan_for(dtype, view, T, dims, splits)
            calls = [("split", KD._split_kernel, plan.split), ("combine", KD._combine_kernel, plan.combine)]
            if view == "full" and T in VERIFY_T and splits > 1:  # a scoring verification adds the mass pass
                calls.append(("mass", KD._mass_kernel, plan_for(dtype, view, T, dims, splits, mass=True).mass))
            for kname, fn, call in calls:
                if call is None:
                    continue
                for arch in ARCHS:
                    bound = bind(fn, call, arch)
                    key = repr((kname, arch, bound))  # dicts keep insertion order: stable for one run
                    jobs.setdefault(key, (kname, arch, bound))
                    rows.append(dict(launch=f"{name} {str(dtype)[6:]} splits={splits}", kernel=kname, arch=arch,
                                     key=key, tile=plan.config()))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = dict(zip(jobs, pool.map(compile_one, jobs.values())))
    for row in rows:
        row.update(results[row.pop("key")])
    return rows, len(jobs)


def test_every_engine_launch_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what triton 3.9 does by default, minus a warning
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    assert len(rows) > 100  # the whole matrix, not an empty loop
    spilled = [r for r in rows if r["n_spills"]]
    assert not spilled, "\n".join(f"{r['launch']} {r['kernel']} sm_{r['arch']}: {r['n_spills']} B spilled, "
                                  f"{r['n_regs']} regs, tile {r['tile']}" for r in spilled)


if __name__ == "__main__":
    t0 = time.time()
    sys.path.insert(0, ROOT)  # this checkout's kernels/, not an installed copy
    table, n_compiled = compile_table(workers=min(4, os.cpu_count() or 1))
    if "--json" in sys.argv:
        print(json.dumps(table))
    else:
        seen = set()
        for r in table:
            t = r["tile"]
            k = (r["kernel"], r["arch"], t["block_m"], t["block_n"], t["block_d"], t["num_warps"], t["num_stages"],
                 r["n_regs"], r["n_spills"])
            if k not in seen:
                seen.add(k)
                print(f"{r['kernel']:8s} sm_{r['arch']} M{t['block_m']:<3d} N{t['block_n']:<3d} D{t['block_d']:<3d} "
                      f"w{t['num_warps']} s{t['num_stages']}: {r['n_regs']:3d} regs {r['n_spills']:5d} B spilled "
                      f"smem {r['shared']}  e.g. {r['launch']}")
    print(f"{n_compiled} distinct compiles for {len(table)} launches in {time.time() - t0:.0f} s", file=sys.stderr)
