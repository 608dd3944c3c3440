"""bench.py's outputs: results.json, results.md (the same rows and numbers) and speedup_vs_batch.png,
and --merge, which combines earlier runs' results.json into one."""
from __future__ import annotations

import errno
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import click

from ..errors import UserError

SIMULATED = "SIMULATED"


# ---- outputs --------------------------------------------------------------------------------------------
# (JSON key, markdown header); a markdown cell is str() of the JSON value, so the two agree exactly.
COLUMNS = [
    ("batch", "batch"), ("prompt_len", "prompt"), ("draft", "draft"), ("gamma", "γ"), ("budget", "budget"),
    ("tokens_per_s", "tok/s"), ("tokens_per_s_min", "tok/s min"), ("tokens_per_s_max", "tok/s max"),
    ("spread", "spread"), ("ms_per_token", "ms/tok/seq"), ("speedup", "speedup"),
    ("speedup_pred_measured_T", "pred. (meas. T)"), ("speedup_pred_cost_model", "pred. (cost model)"),
    ("alpha", "α"), ("tokens_per_round", "tok/round"), ("T_T_ms", "T_T ms"),
    ("verify_ratio", "T_V/T_T"), ("verify_ratio_pred", "T_V/T_T pred."),
    ("draft_ratio", "T_D/T_T"), ("draft_ratio_pred", "T_D/T_T pred."),
    ("bandwidth_GBps", "GB/s"), ("bandwidth_frac", "of HW BW"), ("peak_memory_GiB", "peak GiB"),
    ("prefill_s", "prefill s"), ("capture_s", "compile+capture s"), ("flags", "flags"),
]


def markdown(meta: dict, rows: list, skipped: list) -> str:
    alpha = meta["simulated_acceptance"]
    lines = [f"# bench: {meta['model']} on {meta['device_name']}", ""]
    if alpha is not None:
        lines += [f"**{SIMULATED} ACCEPTANCE α = {alpha}**: random weights; every draft token is accepted "
                  f"with probability {alpha} independently of the model. Step times are real; acceptance "
                  "and speedups are not those of a trained model.", ""]
    lines += [f"- {key}: `{meta[key]}`" for key in
              ("command", "git_commit", "device_name", "torch_version", "date", "dtype", "attention", "compile",
               "cuda_graphs", "draft_model")]
    lines += [f"- merged from: `{c}`" for c in meta.get("merged_from", [])]
    hw = meta["hardware_profile"]
    lines += [f"- hardware profile: {hw['name']}, {hw['mem_bandwidth'] / 1e9:.0f} GB/s, "
              f"{hw['matmul_flops'] / 1e12:.1f} TFLOP/s"]
    lines += [f"- prompts: {meta['prompts']}; max new tokens {meta['max_new_tokens']}; warm-up {meta['warmup']} "
              f"per configuration, then {meta['repeats']} interleaved repeat(s) A B A C ... A (A: plain decoding)", "",
              "Each speculative run sits between two plain runs, its paired baselines: tok/s is the median of a "
              "configuration's runs (min, max beside it; spread = (max - min) / median), and speedup, T_T and the "
              "ratios come from its median and its paired baselines' median. flags: `unstable` when its or its "
              "baselines' spread exceeds 10 %; `T_V<T_T` when verifying γ + 1 tokens took less than one plain "
              "step; `T_D>T_T` when a self-draft over a budget below the context took longer than a target step. "
              "Such rows are not to be trusted.", "",
              "T_T: plain decode time per round (paired baselines); T_V: verify phase per round; T_D: draft "
              "phase per round / γ. "
              "pred. (meas. T) = Ω(γ, α)·T_T / (γ·T_D + T_V) from the measured times; pred. (cost model) uses "
              "roofline times. α is fitted so that Ω(γ, α) = tokens per round. GB/s: bytes of one plain decode "
              "step (cost model) / T_T, and its fraction of the hardware profile's bandwidth.", ""]
    headers = [h + (f" ({SIMULATED})" if alpha is not None and key in ("alpha", "tokens_per_round", "speedup")
                    else "") for key, h in COLUMNS]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("–" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS) + " |")
    profiled = [r for r in rows if "host_syncs_per_round" in r]
    if profiled:
        lines += ["", "Per round (torch.profiler, two runs of different length subtracted): expected with CUDA "
                  "graphs: γ + 1 graph launches and 1 host sync (the all-done check).", "",
                  "| batch | prompt | draft | γ | graph launches | host syncs | DtoH copies |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['prompt_len']} | {r['draft']} | {r['gamma']} | {r['graph_launches_per_round']:.2f} "
                  f"| {r['host_syncs_per_round']:.2f} | {r['dtoh_copies_per_round']:.2f} |" for r in profiled]
    if skipped:
        lines += ["", "Skipped:"] + [f"- batch {s['batch']}, prompt {s['prompt_len']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list, path: Path) -> None:
    """Speedup vs batch size (log2), one panel per draft, one line per prompt length; each point
    is the best gamma/budget there (labelled), dashed: the cost model's prediction for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = [r for r in rows if r["gamma"] is not None]
    drafts = list(dict.fromkeys(r["draft"] for r in spec))
    fig, axes = plt.subplots(1, max(len(drafts), 1), figsize=(5.5 * max(len(drafts), 1), 4.2), squeeze=False,
                             sharey=True)
    for ax, draft in zip(axes[0], drafts):
        for i, length in enumerate(sorted({r["prompt_len"] for r in spec})):
            best = {}
            for r in spec:
                if r["draft"] == draft and r["prompt_len"] == length and \
                        r["speedup"] > best.get(r["batch"], {"speedup": -1})["speedup"]:
                    best[r["batch"]] = r
            if not best:
                continue
            xs = sorted(best)
            color = f"C{i}"
            ax.plot(xs, [best[x]["speedup"] for x in xs], "o-", color=color, label=f"prompt {length}")
            if all("speedup_pred_cost_model" in best[x] for x in xs):  # lookup drafts have no cost model
                ax.plot(xs, [best[x]["speedup_pred_cost_model"] for x in xs], "--", color=color, alpha=0.7)
            for x in xs:
                ax.annotate(f"γ{best[x]['gamma']}", (x, best[x]["speedup"]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7, color=color)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.margins(y=0.15)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in spec})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_title(draft, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="solid: measured, dashed: cost model", title_fontsize=7)
    axes[0][0].set_ylabel("speedup over plain decoding")
    title = f"MagicDec speedup vs batch size: {meta['model']}, {meta['device_name']}"
    if meta["simulated_acceptance"] is not None:
        title += f"\n{SIMULATED} acceptance α = {meta['simulated_acceptance']} (random weights)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=150, metadata={"Title": title.replace("α", "alpha")})  # PNG tEXt: greppable
    plt.close(fig)


RESULT_FILES = ("results.json", "results.md", "speedup_vs_batch.png")


def default_out_dir() -> Path:
    """A new directory per run, so that the default never replaces an earlier run's results."""
    base = Path("bench_results") / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():  # two runs started within one second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_out_dir(out_dir: Path, names=RESULT_FILES, overwrite: bool = False) -> None:
    """Before any work: `out_dir` must be a directory (or creatable as one) that can be written, and
    hold none of `names` from an earlier run unless `overwrite`. Tried with a probe file in it or in
    its nearest existing parent (removed again), not judged from permission bits, which root ignores."""
    existing = Path(os.path.abspath(out_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out-dir {out_dir}: {existing} is not a directory; choose another --out-dir")
    earlier = [n for n in names if (existing / n).exists()] if existing == Path(os.path.abspath(out_dir)) else []
    if earlier and not overwrite:
        raise UserError(f"--out-dir {out_dir} already holds {earlier[0]} from an earlier run; pass --overwrite to "
                        "replace it, or choose another --out-dir")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".bench-write-probe-")
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise UserError(f"--out-dir {out_dir}: cannot write into {existing} ({err.strerror}); choose another "
                        "--out-dir") from None


def _claim(out_dir: Path) -> Path:
    """`out_dir`, or `out_dir-2`, `-3`, ...: the first that this call creates (for default_out_dir)."""
    for k in itertools.count(1):
        path = out_dir if k == 1 else out_dir.with_name(f"{out_dir.name}-{k}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


def write_outputs(result: dict, out_dir: Path, overwrite: bool = True, new_dir: bool = False) -> None:
    """Print the table and write results.json, results.md and the plot into `out_dir` (with new_dir,
    into a directory of that name created for this run). An earlier results.json is replaced only
    with `overwrite`. When the write fails (disk full, the directory gone read-only, results that
    appeared meanwhile), the results are kept in a temporary file named in the one-line error."""
    table = markdown(result["meta"], result["rows"], result["skipped"])
    click.echo(table)
    text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
    target = out_dir / "results.json"
    try:
        if new_dir:
            out_dir = _claim(out_dir)
            target = out_dir / "results.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        if not overwrite and target.exists():  # another run with this --out-dir finished first
            raise FileExistsError(errno.EEXIST, "written by another run meanwhile")
        _write_atomic(target, text)  # an earlier results.json survives a failed write
        _write_atomic(out_dir / "results.md", table)
        if result["rows"]:
            plot(result["meta"], result["rows"], out_dir / "speedup_vs_batch.png")
    except OSError as err:
        raise UserError(f"cannot write {target} ({err.strerror or err}); {keep_results(text)}") from None
    click.echo(f"wrote {target}, {out_dir / 'results.md'}, {out_dir / 'speedup_vs_batch.png'}")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def keep_results(text: str) -> str:
    """Save `text` (a results.json that could not be written where asked) in the temporary directory;
    returns the clause saying where it went."""
    try:
        fd, path = tempfile.mkstemp(prefix="bench-results-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return f"the results are kept in {path}"
    except OSError:
        click.echo(text)
        return "the results are printed above as JSON"


def read_results(path: Path) -> dict:
    """An earlier run's results.json, refused with one line when missing or not bench.py's."""
    if not path.is_file():
        raise UserError(f"--merge: {path} does not exist; give directories that earlier bench.py runs wrote "
                        "with --out-dir")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"--merge: {path} is not valid JSON ({' '.join(str(err).split())}); re-run that "
                        "benchmark") from None
    ok = (isinstance(result, dict) and isinstance(result.get("meta"), dict)
          and isinstance(result.get("rows"), list) and isinstance(result.get("skipped"), list)
          and all(isinstance(r, dict) and {"prompt_len", "batch"} <= set(r) for r in result["rows"]))
    try:  # the table is what --merge writes: a file it cannot render is not a results file
        ok = ok and bool(markdown(result["meta"], result["rows"], result["skipped"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"--merge: {path} is not a complete bench.py results file; re-run that benchmark")
    return result


def merge_results(dirs, command: str) -> dict:
    """One result from several runs of the same model, device and simulated acceptance."""
    parts = [read_results(Path(d) / "results.json") for d in dirs]
    for key in ("model", "device_name", "simulated_acceptance"):
        if len({json.dumps(p["meta"].get(key)) for p in parts}) > 1:
            raise UserError(f"--merge: the runs differ in {key}; merge only runs of one setup")
    meta = dict(parts[0]["meta"], command=command, merged_from=[p["meta"].get("command") for p in parts])
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: (r["prompt_len"], r["batch"]))  # stable
    return dict(meta=meta, simulated_acceptance=meta.get("simulated_acceptance"), rows=rows,
                skipped=[s for p in parts for s in p["skipped"]])
