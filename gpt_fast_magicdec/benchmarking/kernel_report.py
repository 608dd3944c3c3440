"""The decode-attention micro-benchmark's report: kernels.json, kernels.md, kernels.png, and the
entry point of bench.py --kernels. The measurement itself is in kernels.py."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import kernels
from .kernels import METHODS, SPARSE_FLAT_TOL, TARGET_FRAC, TARGET_MIN_BATCH, TARGET_MIN_CONTEXT
from .report import device_name, git_commit, sig, utc_now


def kernel_meta(device, dtype: torch.dtype, *, command: Optional[str] = None, copy_bandwidth: float,
                bandwidth_source: str = "measured copy", **params) -> dict:
    """meta for `write_kernel_report`: command line, git commit, device, versions, date, parameters."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    device = torch.device(device)
    return dict(command=command or " ".join(sys.argv), git_commit=git_commit(), device=str(device),
                device_name=device_name(device), torch_version=torch.__version__, triton_version=triton_version,
                date=utc_now(),
                dtype=str(dtype).removeprefix("torch."), copy_bandwidth_GBps=sig(copy_bandwidth / 1e9),
                timing=("CUDA graph replays (eager if capture fails), CUDA events, L2 evicted before each rep, "
                        "median" if device.type == "cuda" else "perf_counter per call, median"),
                bandwidth_source=bandwidth_source, **params)


def summarize(rows: list) -> dict:
    """The two kernel targets: the full-view bandwidth target, and sparse time flat in context."""
    region = [r for r in rows if r["meets_target"] is not None]
    target = dict(rows=len(region), meeting=sum(r["meets_target"] for r in region),
                  lowest_frac=min((r["frac_copy_bw"] for r in region), default=None))
    series = {}  # Triton sparse rows at contexts where the view reads the same keys (context >= budget)
    for r in rows:
        if r["view"] == "sparse" and r["method"].startswith("triton") and r["time_us"] is not None:
            series.setdefault((r["batch"], r["n_queries"], r["method"], r["keys_per_seq"]), []).append(r)
    flat = []
    for (B, T, method, keys), rs in series.items():
        times = [r["time_us"] for r in rs]
        spread = sig(max(times) / min(times), 3)
        flat.append(dict(batch=B, n_queries=T, method=method, keys_per_seq=keys, contexts=[r["context"] for r in rs],
                         time_us=times, spread=spread, flat=spread <= SPARSE_FLAT_TOL if len(rs) > 1 else None))
    return dict(target=target, sparse_flat=flat)


# (row key, markdown header); a cell is str() of the JSON value, except the marks below
COLUMNS = [("batch", "batch"), ("context", "context"), ("n_queries", "T"), ("method", "method"),
           ("keys_per_seq", "keys/seq"), ("MB", "MB"), ("time_us", "µs"), ("bandwidth_GBps", "GB/s"),
           ("frac_copy_bw", "of copy BW"), ("meets_target", "≥80% target"), ("max_abs_err", "max |Δ|"),
           ("reps", "reps"), ("graphed", "graph"), ("num_splits", "splits")]
MARKS = {True: "✅", False: "❌", None: "–"}


def _cell(key: str, value) -> str:
    if key == "meets_target" or value is None:
        return MARKS[value]
    if key == "graphed":
        return "yes" if value else "no"
    return str(value)


def kernels_markdown(rows: list, meta: dict, summary: dict) -> str:
    lines = [f"# Decode-attention kernels on {meta['device_name']}", ""]
    lines += [f"- {key}: `{meta[key]}`" for key in meta]
    lines += ["", "Bytes: K+V of the keys the view reads (`keys/seq` per sequence and KV head) + q + output; the "
              "torch paths are charged the same bytes (effective bandwidth). `of copy BW`: achieved bytes/s over "
              f"the {meta.get('bandwidth_source', 'measured copy')} bandwidth ({meta['copy_bandwidth_GBps']} GB/s). "
              "Timing: see `timing` above. `max |Δ|`: full view vs torch_sdpa (else the reference), "
              "compact vs triton_sparse.", "", "Methods:"]
    lines += [f"- `{m}`: {desc}" for m, (_, desc) in METHODS.items() if any(r["method"] == m for r in rows)]
    t = summary["target"]
    lines += ["", "## Targets", ""]
    if t["rows"]:
        ok = "✅" if t["meeting"] == t["rows"] else "❌"
        lines.append(f"- {ok} full view (triton_full) ≥ {TARGET_FRAC:.0%} of copy bandwidth at batch ≥ "
                     f"{TARGET_MIN_BATCH} and context ≥ {TARGET_MIN_CONTEXT}: {t['meeting']} of {t['rows']} rows "
                     f"(lowest {t['lowest_frac']})")
    else:
        lines.append(f"- full view target (batch ≥ {TARGET_MIN_BATCH}, context ≥ {TARGET_MIN_CONTEXT}): "
                     "no measured row in that region")
    flat = [s for s in summary["sparse_flat"] if s["flat"] is not None]
    if flat:
        n_flat = sum(s["flat"] for s in flat)
        lines.append(f"- {'✅' if n_flat == len(flat) else '❌'} sparse view time independent of context "
                     f"(max/min ≤ {SPARSE_FLAT_TOL} over the contexts where it reads the same keys): "
                     f"{n_flat} of {len(flat)} series")
        contexts = sorted({c for s in flat for c in s["contexts"]})
        lines += ["", "### Sparse view time (µs) vs context", "",
                  "| batch | T | method | " + " | ".join(map(str, contexts)) + " | max/min |",
                  "|" + "---|" * (len(contexts) + 4)]
        for s in sorted(flat, key=lambda s: (s["method"], s["batch"], s["n_queries"])):
            by_ctx = dict(zip(s["contexts"], s["time_us"]))
            cells = [str(by_ctx.get(c, "–")) for c in contexts]
            lines.append(f"| {s['batch']} | {s['n_queries']} | {s['method']} | " + " | ".join(cells)
                         + f" | {s['spread']} {MARKS[s['flat']]} |")
    measured = [r for r in rows if not r["skipped"]]
    lines += ["", "## All measured rows", "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(key, r[key]) for key, _ in COLUMNS) + " |" for r in measured]
    skipped = [r for r in rows if r["skipped"]]
    if skipped:  # grouped by (method, reason); points as batch/context/T
        groups: dict = {}
        for r in skipped:
            groups.setdefault((r["method"], r["skipped"]), []).append(f"{r['batch']}/{r['context']}/{r['n_queries']}")
        lines += ["", "## Skipped (batch/context/T)", ""]
        lines += [f"- {method}: {reason}: {', '.join(points)}" for (method, reason), points in groups.items()]
    return "\n".join(lines) + "\n"


_LINE_STYLES = ["-", "--", ":", "-."]  # one per T when a panel shows several


def _plot_lines(ax, measured: list, colour: dict, method: str, key: str, t_list: Sequence[int],
                style: Optional[str] = None, label_fmt: str = "B={b}{t}", alpha: float = 1.0) -> None:
    """One line of row[key] vs context per (batch, T in t_list) of method; colour by batch, and the
    style by T unless one is given."""
    for b in colour:
        for j, T in enumerate(t_list):
            pts = sorted((r["context"], r[key]) for r in measured
                         if r["method"] == method and r["batch"] == b and r["n_queries"] == T)
            if pts:
                tl = f", T={T}" if len(t_list) > 1 else ""
                ax.plot(*zip(*pts), style or _LINE_STYLES[j % len(_LINE_STYLES)], color=colour[b], marker="o",
                        ms=3, alpha=alpha, label=label_fmt.format(b=b, t=tl))


def _plot_fractions(axes_row, measured: list, colour: dict, ts: list, contexts: list, meta: dict) -> None:
    """Top row: fraction of the copy bandwidth vs context, Triton full view | sparse view."""
    for ax, method, title in ((axes_row[0], "triton_full", "Triton full view"),
                              (axes_row[1], "triton_sparse", "Triton sparse view")):
        _plot_lines(ax, measured, colour, method, "frac_copy_bw", ts)
        ax.axhline(TARGET_FRAC, color="grey", ls="--", lw=0.8)
        ax.set_ylabel(f"achieved / copy bandwidth ({meta['copy_bandwidth_GBps']} GB/s)")
        ax.set_title(f"{title}: fraction of copy bandwidth" + (f" (solid T={ts[0]}, dashed T={ts[1]})"
                                                               if len(ts) > 1 else ""), fontsize=9)
    if contexts and contexts[-1] >= TARGET_MIN_CONTEXT:
        axes_row[0].axvspan(TARGET_MIN_CONTEXT, contexts[-1] * 1.2, color="green", alpha=0.05,
                            label=f"target region (batch ≥ {TARGET_MIN_BATCH})")
    for ax in axes_row:
        top = max([r["frac_copy_bw"] for r in measured if r["method"].startswith("triton")] + [1.0])
        ax.set_ylim(0, 1.05 * top)


def _plot_times(axes_row, measured: list, colour: dict, ts: list) -> None:
    """Bottom row at the smallest T: full-view time, Triton vs the torch paths | sparse kernels' time."""
    t0 = ts[:1]
    _plot_lines(axes_row[0], measured, colour, "triton_full", "time_us", t0, "-", "B={b} triton")
    _plot_lines(axes_row[0], measured, colour, "torch_sdpa", "time_us", t0, "--", "B={b} sdpa", alpha=0.6)
    _plot_lines(axes_row[0], measured, colour, "torch_reference", "time_us", t0, ":", "B={b} reference", alpha=0.6)
    axes_row[0].set_title(f"Full view time, T={t0[0] if t0 else '?'} (solid Triton, dashed SDPA, dotted reference)",
                          fontsize=9)
    _plot_lines(axes_row[1], measured, colour, "triton_sparse", "time_us", t0, "-", "B={b}")
    _plot_lines(axes_row[1], measured, colour, "triton_sparse_compact", "time_us", t0, "--", "B={b} compact",
                alpha=0.6)
    axes_row[1].set_title(f"Sparse view time, T={t0[0] if t0 else '?'}: flat in context "
                          "(solid cache, dashed compact)", fontsize=9)
    for ax in axes_row:
        ax.set_yscale("log")
        ax.set_ylabel("µs per call (median)")


def _context_axes(axes, contexts: list) -> None:
    """Every panel: log2 context axis ticked at the measured contexts (as 4K, 16K, ...), grid, legend."""
    for ax in (a for row in axes for a in row):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 and c % 1024 == 0 else str(c) for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)


def plot_kernels(rows: list, meta: dict, path: Path) -> None:
    """2 x 2: fraction of copy bandwidth vs context (full | sparse, Triton), time vs context (full:
    Triton vs torch paths at the smallest T | sparse kernels: flat). One colour per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["time_us"] is not None]
    batches = sorted({r["batch"] for r in measured})
    ts = sorted({r["n_queries"] for r in measured})
    contexts = sorted({r["context"] for r in measured})
    colour = {b: f"C{i % 10}" for i, b in enumerate(batches)}  # batch -> colour, in batch order
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    _plot_fractions(axes[0], measured, colour, ts, contexts, meta)
    _plot_times(axes[1], measured, colour, ts)
    _context_axes(axes, contexts)
    title = (f"Decode attention: {meta['device_name']}, {meta['dtype']}, H={meta.get('n_heads')} "
             f"H_kv={meta.get('n_kv_heads')} D={meta.get('head_dim')}, budget {meta.get('budget')} "
             f"(sink {meta.get('sink')})")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})
    plt.close(fig)


def write_kernel_report(rows: list, out_dir, meta: dict) -> dict:
    """kernels.json ({meta, summary, rows}), kernels.md and kernels.png (if any row was measured) in
    out_dir. Returns {name: path} of the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = dict(json=out_dir / "kernels.json", md=out_dir / "kernels.md")
    paths["json"].write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1,
                                        ensure_ascii=False) + "\n")
    paths["md"].write_text(kernels_markdown(rows, meta, summary))
    if any(r["time_us"] is not None for r in rows):
        paths["png"] = out_dir / "kernels.png"
        plot_kernels(rows, meta, paths["png"])
    return paths


def kernel_bench_cli(out_dir, command: str, device: torch.device, dtype: torch.dtype, batch_sizes: Sequence[int], contexts: Sequence[int], gammas: Sequence[int], budget: int,
                     sink: int, hardware: str = "measure", deadline_s: float = 480.0) -> dict:
    """bench.py --kernels: T = 1 and gamma + 1 for each gamma; the report goes to out_dir. Rows so far
    are kept in out_dir/kernels.partial.json while it runs; after deadline_s no new point starts."""
    from gpt_fast_magicdec.cost_model import get_profile

    hw = get_profile(hardware, device)
    n_queries = sorted({1, *(g + 1 for g in gammas)})
    shape = dict(n_heads=32, n_kv_heads=8, head_dim=128, budget=budget, sink=sink)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / "kernels.partial.json"
    rows = kernels.run_kernel_benchmark(device, dtype, batch_sizes, contexts, n_queries=n_queries,
                                        copy_bandwidth=hw.mem_bandwidth, deadline_s=deadline_s,
                                        checkpoint_path=partial, **shape)
    meta = kernel_meta(device, dtype, command=command, copy_bandwidth=hw.mem_bandwidth,
                       bandwidth_source=hw.name, window=budget - sink, n_queries=n_queries, **shape)
    paths = write_kernel_report(rows, out_dir, meta)
    with contextlib.suppress(OSError):
        partial.unlink()
    md = paths["md"].read_text()
    print(md[md.index("## Targets"):md.index("## All measured rows")].rstrip())  # the full table: in the file
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths
