"""Plain decoding vs MagicDec speculative decoding: a sweep over batch size, prompt length, draft,
budget and gamma, with measured and predicted speedups side by side.

  python bench.py --random-weights llama-3.1-8b --simulate-acceptance 0.8 \\
      --batch-sizes 1,8,32 --prompt-lengths 4096,16384 --gammas 2,3,4 --budgets 512
  python bench.py --checkpoint ckpt/llama-3.1-8b --prompts-file pg19_test.jsonl --drafts self-streaming

For each (batch, prompt length) it runs plain decoding once and then every speculative
configuration on the same prompts, after untimed warm-up runs at the same static shapes. Writes
results.json, results.md (the same rows and numbers) and speedup_vs_batch.png into --out-dir.

Measured step times, per round:  T_T = plain decode time / rounds;  T_V = verify phase / rounds;
T_D = draft phase / rounds / gamma. The speedup they predict, Omega(gamma, alpha) * T_T /
(gamma * T_D + T_V), is shown beside the roofline cost model's prediction and the measured one.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import click
import torch
from tqdm.auto import tqdm

from gpt_fast_magicdec.cli import resolve_device
from gpt_fast_magicdec.config import PRESETS, ModelArgs
from gpt_fast_magicdec.cost_model import (
    PROFILES, HardwareProfile, alpha_from_tokens_per_round, decode_step_cost, expected_tokens, get_profile,
    predict_times, predicted_speedup,
)
from gpt_fast_magicdec.data import long_document_prompts, random_prompts
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.profiling import profile_rounds as profile_round_counts
from gpt_fast_magicdec.engine import (
    CAPTURE_SCRATCH, Engine, GenerationStats, load_model, random_model, set_compiler_flags,
)
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.tokenizer import check_same_tokenizer, check_tokenizer_fits, load_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# --drafts names -> (DraftConfig.kind, DraftConfig.kv, full cache?)
DRAFTS = {
    "self-streaming": ("self", "streaming", False),
    "self-snapkv": ("self", "snapkv", False),
    "model-streaming": ("model", "streaming", False),
    "model-snapkv": ("model", "snapkv", False),
    "model-full": ("model", "streaming", True),
}
WARMUP_TOKENS = 4  # new tokens of a warm-up run: enough for a few full rounds of every captured step
SIMULATED = "SIMULATED"


# ---- configurations -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    draft_name: str  # a DRAFTS key, or "baseline"
    draft: DraftConfig

    @property
    def gamma(self) -> Optional[int]:
        return self.draft.gamma if self.draft.enabled else None

    @property
    def budget(self) -> Optional[int]:
        return self.draft.budget if self.draft.enabled else None


def build_configs(drafts: list[str], gammas: list[int], budgets: list[int], sink: int) -> list[Config]:
    """Every speculative configuration of the sweep; DraftConfig validates each one up front."""
    configs = []
    for name in drafts:
        kind, kv, full = DRAFTS[name]
        for budget in [-1] if full else budgets:
            for gamma in gammas:
                try:
                    draft = DraftConfig(kind=kind, kv=kv, budget=budget, sink=sink, gamma=gamma)
                except UserError as err:  # DraftConfig speaks generate.py's flag names
                    raise UserError(f"{name}, budget {budget}, gamma {gamma}: {err}") from None
                configs.append(Config(name, draft))
    return configs


# ---- simulated acceptance -----------------------------------------------------------------------------
def simulated_acceptance(alpha: float, gamma: int, device, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """accept_override for random weights: each draft token is accepted with probability alpha,
    independently of the model, from a seeded generator on the device (no host sync)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def override(n: torch.Tensor) -> torch.Tensor:  # n [B] real accepted counts, ignored
        u = torch.rand(n.shape[0], gamma, generator=gen, device=n.device)  # [B, gamma]
        return (u < alpha).long().cumprod(dim=1).sum(dim=1)  # [B] accepted prefix length

    return override


# ---- running ------------------------------------------------------------------------------------------
def timed_generate(engine: Engine, prompts: list, max_new: int, cfg: Config, warmup: int, repeats: int,
                   alpha: Optional[float], seed: int, prefill_chunk: int) -> GenerationStats:
    """Warm-up runs, then `repeats` timed runs; the stats of the run with the median decode time.

    Warm-up prompts are longer by max_new - WARMUP_TOKENS, so a warm-up allocates the same cache
    and captures the same graphs as the timed run while decoding only a few tokens."""
    def run(batch: list, n_new: int) -> GenerationStats:
        override = None
        if alpha is not None and cfg.draft.enabled:
            override = simulated_acceptance(alpha, cfg.draft.gamma, engine.device, seed)
        stats = engine.generate(batch, n_new, draft=cfg.draft, prefill_chunk=prefill_chunk,
                                accept_override=override).stats
        if override is not None:
            stats.simulated_acceptance = alpha
        return stats

    few = min(WARMUP_TOKENS, max_new)
    warm_prompts = [_lengthen(p, len(p) + max_new - few) for p in prompts]
    for _ in range(warmup):
        run(warm_prompts, few)
    runs = sorted((run(prompts, max_new) for _ in range(repeats)), key=lambda s: s.decode_s)
    return runs[(len(runs) - 1) // 2]


def _lengthen(prompt: list, length: int) -> list:
    return (prompt * (length // len(prompt) + 1))[:length]


def fits_in_memory(engine: Engine, batch: int, seq_len: int) -> Optional[str]:
    """None, or why a (batch, seq_len) KV cache cannot fit on the GPU (checked before allocating)."""
    if engine.device.type != "cuda":
        return None
    models = [m for m in (engine.model, engine.draft_model) if m is not None]
    slots = -(-seq_len // 256) * 256 + CAPTURE_SCRATCH  # as Engine allocates them
    kv = sum(m.args.n_layers * 2 * m.args.n_kv_heads * m.args.head_dim for m in models) * batch * slots
    kv *= engine.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    total = torch.cuda.get_device_properties(engine.device).total_memory
    if weights + kv > 0.92 * total:  # leave room for activations, logits and graph pools
        return f"KV cache {kv / 2**30:.1f} GiB + weights {weights / 2**30:.1f} GiB > 92% of {total / 2**30:.0f} GiB"
    return None


# ---- one result row ------------------------------------------------------------------------------------
def _sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """x rounded to `digits` significant digits: JSON and markdown print the same value."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def make_row(cfg: Config, batch: int, prompt_len: int, max_new: int, stats: GenerationStats,
             base: GenerationStats, args: ModelArgs, draft_args: Optional[ModelArgs], hw: HardwareProfile,
             dtype_bytes: int, alpha_sim: Optional[float]) -> dict:
    """One table row. Predictions use the mean context of the decode: prompt + max_new / 2."""
    context = prompt_len + max_new // 2
    T_T = base.decode_s / max(base.rounds, 1)
    row = dict(batch=batch, prompt_len=prompt_len, draft=cfg.draft_name, gamma=cfg.gamma, budget=cfg.budget,
               tokens_per_s=_sig(stats.tokens_per_s),
               ms_per_token=_sig(1e3 * stats.decode_s * batch / max(sum(stats.new_tokens), 1)),
               speedup=_sig(stats.tokens_per_s / base.tokens_per_s),
               T_T_ms=_sig(1e3 * T_T))
    if not cfg.draft.enabled:
        step = decode_step_cost(args, batch, context, 1, dtype_bytes)
        bandwidth = step.bytes / T_T
        row.update(rounds=stats.rounds, bandwidth_GBps=_sig(bandwidth / 1e9),
                   bandwidth_frac=_sig(bandwidth / hw.mem_bandwidth, 3))
    else:
        gamma, rounds = cfg.draft.gamma, max(stats.rounds, 1)
        T_V = stats.phase_s.get("verify", 0.0) / rounds
        T_D = stats.phase_s.get("draft", 0.0) / rounds / gamma
        alpha = alpha_from_tokens_per_round(gamma, stats.mean_accepted_per_round)
        pred = predict_times(args, hw, batch, context, gamma, cfg.draft.budget, dtype_bytes, draft_args=draft_args)
        row.update(rounds=stats.rounds, alpha=_sig(alpha, 3),
                   accepted_per_drafted=_sig(stats.acceptance_rate, 3),
                   tokens_per_round=_sig(stats.mean_accepted_per_round, 3),
                   T_V_ms=_sig(1e3 * T_V), T_D_ms=_sig(1e3 * T_D),
                   verify_ratio=_sig(T_V / T_T, 3), verify_ratio_pred=_sig(pred.verify_ratio, 3),
                   draft_ratio=_sig(T_D / T_T, 3), draft_ratio_pred=_sig(pred.draft_ratio, 3),
                   speedup_pred_measured_T=_sig(expected_tokens(gamma, alpha) * T_T / (gamma * T_D + T_V)),
                   speedup_pred_cost_model=_sig(predicted_speedup(pred, gamma, alpha)),
                   pred_ms=dict(T_T=_sig(1e3 * pred.T_T), T_V=_sig(1e3 * pred.T_V), T_D=_sig(1e3 * pred.T_D)),
                   simulated_acceptance=alpha_sim)
    row["peak_memory_GiB"] = _sig(stats.peak_memory_bytes / 2**30, 3)
    return row


# ---- outputs --------------------------------------------------------------------------------------------
# (JSON key, markdown header); a markdown cell is str() of the JSON value, so the two agree exactly.
COLUMNS = [
    ("batch", "batch"), ("prompt_len", "prompt"), ("draft", "draft"), ("gamma", "γ"), ("budget", "budget"),
    ("tokens_per_s", "tok/s"), ("ms_per_token", "ms/tok/seq"), ("speedup", "speedup"),
    ("speedup_pred_measured_T", "pred. (meas. T)"), ("speedup_pred_cost_model", "pred. (cost model)"),
    ("alpha", "α"), ("tokens_per_round", "tok/round"), ("T_T_ms", "T_T ms"),
    ("verify_ratio", "T_V/T_T"), ("verify_ratio_pred", "T_V/T_T pred."),
    ("draft_ratio", "T_D/T_T"), ("draft_ratio_pred", "T_D/T_T pred."),
    ("bandwidth_GBps", "GB/s"), ("bandwidth_frac", "of HW BW"), ("peak_memory_GiB", "peak GiB"),
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
    lines += [f"- prompts: {meta['prompts']}; max new tokens {meta['max_new_tokens']}; warm-up {meta['warmup']}, "
              f"repeats {meta['repeats']} (median)", "",
              "T_T: plain decode time per round; T_V: verify phase per round; T_D: draft phase per round / γ. "
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
    is the best gamma/budget there (labelled), dotted: the cost model's prediction for it."""
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
            ax.plot(xs, [best[x]["speedup_pred_cost_model"] for x in xs], ":", color=color, alpha=0.7)
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
        ax.legend(fontsize=8, title="solid: measured, dotted: cost model", title_fontsize=7)
    axes[0][0].set_ylabel("speedup over plain decoding")
    title = f"MagicDec speedup vs batch size: {meta['model']}, {meta['device_name']}"
    if meta["simulated_acceptance"] is not None:
        title += f"\n{SIMULATED} acceptance α = {meta['simulated_acceptance']} (random weights)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=150, metadata={"Title": title.replace("α", "alpha")})  # PNG tEXt: greppable
    plt.close(fig)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---- CLI --------------------------------------------------------------------------------------------------
def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not items or min(items) < 1:
        raise click.BadParameter("expected positive integers")
    return list(dict.fromkeys(items))  # drop repeats, keep the order


def _draft_list(ctx, param, value):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in DRAFTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown draft(s) {unknown}; choose from {', '.join(DRAFTS)}")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Converted target checkpoint directory. Give this or --random-weights.")
@click.option("--random-weights", type=click.Choice(sorted(PRESETS)), default=None,
              help="Benchmark a preset shape with random weights (pair with --simulate-acceptance).")
@click.option("--draft-checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Standalone draft checkpoint: adds model-streaming and model-full to the default --drafts.")
@click.option("--draft-random-weights", type=click.Choice(sorted(PRESETS)), default=None,
              help="A standalone draft of this preset shape with random weights (e.g. llama-3.2-1b); "
                   "like --draft-checkpoint.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_int_list, metavar="N,N,...",
              help="Comma-separated batch sizes.")
@click.option("--prompt-lengths", default="4096,16384", show_default=True, callback=_int_list, metavar="N,N,...",
              help="Comma-separated prompt lengths in tokens (every prompt of a run has exactly this length).")
@click.option("--gammas", default="2,3,4", show_default=True, callback=_int_list, metavar="N,N,...",
              help="Comma-separated draft lengths (tokens drafted per round).")
@click.option("--budgets", default="512", show_default=True, callback=_int_list, metavar="N,N,...",
              help="Comma-separated draft KV budgets (keys read per draft query: selected + window). "
                   "model-full ignores it.")
@click.option("--sink", type=int, default=16, show_default=True,
              help="Streaming drafts: attention-sink positions kept (window = budget - sink).")
@click.option("--drafts", default=None, callback=_draft_list, metavar="NAME,...",
              help=f"Comma-separated drafts from: {', '.join(DRAFTS)}. Default: self-streaming,self-snapkv, plus "
                   "model-streaming,model-full with a standalone draft.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PG-19-style JSONL (a 'text' field per line): prompts are token windows cut from its "
                   "documents. Default: random token ids.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, path_type=Path), default=None,
              help="Tokenizer for --prompts-file with --random-weights (default: the checkpoint's).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True,
              help="New tokens per sequence in each timed run (EOS is ignored so every run emits them all).")
@click.option("--device", default=None, help="cuda, cuda:1, cpu... Default: cuda if available.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Weights and KV dtype. Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--attention", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
              help="Decode attention: Triton kernels (auto on CUDA) or the plain-torch reference.")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the decode steps. Default: on for CUDA (with CUDA graphs), off on CPU.")
@click.option("--prefill-chunk", type=int, default=2048, show_default=True,
              help="Prompt tokens per prefill forward pass.")
@click.option("--hardware", default="measure", show_default=True,
              type=click.Choice(["measure", *PROFILES], case_sensitive=False),
              help="Hardware profile of the cost model's predictions and the bandwidth column: a preset, or "
                   "'measure' (copy bandwidth and matmul rate measured on --device).")
@click.option("--simulate-acceptance", "alpha", type=click.FloatRange(0.0, 1.0), default=None, metavar="ALPHA",
              help="Random weights only: run the real draft and verify passes, but accept each draft token with "
                   "probability ALPHA (seeded, independent of the model). Every output is marked SIMULATED.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed warm-up runs per configuration (a few tokens at the timed run's shapes: compile, "
                   "graph capture, allocator).")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Timed runs per configuration; the one with the median decode time is reported.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random weights, prompts and simulated acceptance.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench_results"),
              show_default=True, help="Where results.json, results.md and speedup_vs_batch.png are written.")
@click.option("--merge", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="Run nothing: combine the results.json of earlier --out-dir runs (e.g. one per prompt length, "
                   "to keep each command short) into one table and plot in --out-dir. Repeatable.")
@click.option("--profile-rounds", is_flag=True, default=False,
              help="Also profile each speculative configuration (torch.profiler, two runs differenced) and "
                   "report CUDA-graph launches, host syncs and device-to-host copies per round.")
@click.option("--kernels", is_flag=True, default=False,
              help="Run the attention kernel micro-benchmark instead of the end-to-end sweep, using --batch-sizes "
                   "and --prompt-lengths as the contexts (T = 1 and gamma + 1 per --gammas; sparse view from the "
                   "first --budgets and --sink): writes kernels.json, kernels.md and kernels.png into --out-dir.")
def main(**opts):
    """Benchmark plain decoding against MagicDec speculative decoding over a sweep of batch sizes,
    prompt lengths, drafts, budgets and gammas. Reports tokens/s, speedup, acceptance, measured
    vs predicted step-time ratios and speedups, and achieved memory bandwidth."""
    warnings.showwarning = lambda message, *a, **k: tqdm.write(f"warning: {message}", file=sys.stderr)
    try:
        run(**opts)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


def command_line(opts: dict) -> str:
    """The equivalent command with every option explicit (defaults included), for the record."""
    parts = ["python", "bench.py"]
    for key, value in opts.items():
        flag = "--" + ("simulate-acceptance" if key == "alpha" else
                       "tokenizer" if key == "tokenizer_dir" else key.replace("_", "-"))
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, tuple):  # a repeatable option
            parts += [x for item in value for x in (flag, str(item))]
        else:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(parts)


def run(checkpoint, random_weights, draft_checkpoint, draft_random_weights, batch_sizes, prompt_lengths, gammas,
        budgets, sink, drafts, prompts_file, tokenizer_dir, max_new_tokens, device, dtype, attention, compile,
        prefill_chunk, hardware, alpha, warmup, repeats, seed, out_dir, merge, profile_rounds=False, kernels=False):
    opts = {key: value for key, value in locals().items() if key not in ("kernels", "profile_rounds") or value}
    device = resolve_device(device) if not merge else None  # a bad device fails before any work
    if kernels:  # no model: kernels/benchmark.py times the attention kernels alone
        from kernels.benchmark import kernel_bench_cli
        kernel_bench_cli(out_dir, command_line(opts), device, dtype and DTYPES[dtype], batch_sizes, prompt_lengths,
                         gammas, budgets[0], sink, hardware)
        return
    if merge:
        write_outputs(merge_results(merge, command_line(dict(merge=merge, out_dir=out_dir))), out_dir)
        return
    if (checkpoint is None) == (random_weights is None):
        raise UserError("give exactly one of --checkpoint DIR or --random-weights PRESET")
    if draft_checkpoint is not None and draft_random_weights is not None:
        raise UserError("give at most one of --draft-checkpoint and --draft-random-weights")
    if alpha is not None and random_weights is None:
        raise UserError("--simulate-acceptance is for --random-weights runs; a checkpoint's acceptance is real, "
                        "measure it")
    if max_new_tokens < 2:
        raise UserError("--max-new-tokens must be >= 2 (the first token comes from prefill)")
    has_draft_model = draft_checkpoint is not None or draft_random_weights is not None
    drafts = drafts or (["self-streaming", "self-snapkv"] + (["model-streaming", "model-full"] if has_draft_model
                                                              else []))
    if not has_draft_model and any(DRAFTS[d][0] == "model" for d in drafts):
        raise UserError("model-* drafts need --draft-checkpoint or --draft-random-weights")
    configs = build_configs(drafts, gammas, budgets, sink)
    dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        set_compiler_flags()
    hw = get_profile(hardware, device)  # before the weights, while the memory is free

    if random_weights:
        model = random_model(ModelArgs.from_preset(random_weights), device, dtype, seed)
    else:
        model = load_model(checkpoint, device, dtype)
    draft_model = None
    if draft_checkpoint is not None:
        if checkpoint is not None:  # the same check as generate.py: one vocabulary, token for token
            check_same_tokenizer(load_tokenizer(checkpoint), load_tokenizer(draft_checkpoint), draft_checkpoint)
        draft_model = load_model(draft_checkpoint, device, dtype)
    elif draft_random_weights is not None:
        draft_model = random_model(ModelArgs.from_preset(draft_random_weights), device, dtype, seed + 1)
    engine = Engine(model, draft_model=draft_model, attention=attention, compile=compile)
    args, draft_args = model.args, (draft_model.args if draft_model is not None else None)

    tokenizer = None
    if prompts_file is not None:
        if tokenizer_dir is None and checkpoint is None:
            raise UserError("--prompts-file with --random-weights needs --tokenizer DIR")
        tokenizer = load_tokenizer(tokenizer_dir or checkpoint)
        check_tokenizer_fits(tokenizer, args.vocab_size, tokenizer_dir or checkpoint)
    prompts_desc = (f"windows of {prompts_file.name} (seed {seed})" if tokenizer else f"random tokens (seed {seed})")

    meta = dict(command=command_line(opts), git_commit=git_commit(), device=str(device),
                device_name=device_name(device), torch_version=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                model=f"{random_weights} (random weights)" if random_weights else checkpoint.name,
                draft_model=(f"{draft_random_weights} (random weights)" if draft_random_weights
                             else draft_checkpoint.name if draft_checkpoint else None),
                dtype=str(dtype).removeprefix("torch."), attention=engine.backend, compile=engine.compile,
                cuda_graphs=engine.use_graphs, hardware=hw.name, hardware_profile=dataclasses.asdict(hw),
                simulated_acceptance=alpha, prompts=prompts_desc, max_new_tokens=max_new_tokens,
                warmup=warmup, repeats=repeats)

    baseline = Config("baseline", DraftConfig(kind="none"))
    rows, skipped = [], []
    per_point = 1 + len(configs)
    bar = tqdm(total=len(prompt_lengths) * len(batch_sizes) * per_point, desc="bench", unit="run")
    for length in prompt_lengths:
        pool = (long_document_prompts(prompts_file, tokenizer, max(batch_sizes), length, seed) if tokenizer
                else random_prompts(args.vocab_size, max(batch_sizes), length, seed))
        for batch in batch_sizes:
            point, base = [], None  # rows of this (batch, length): kept only when every configuration ran
            try:
                reason = fits_in_memory(engine, batch, length + max_new_tokens + max(gammas) + 1)
                if reason:
                    raise MemoryError(reason)
                for cfg in [baseline] + configs:
                    bar.set_postfix_str(f"B={batch} L={length} {cfg.draft_name} γ={cfg.gamma} budget={cfg.budget}")
                    stats = timed_generate(engine, pool[:batch], max_new_tokens, cfg, warmup, repeats, alpha,
                                           seed, prefill_chunk)
                    base = stats if cfg is baseline else base  # the baseline runs first
                    point.append(make_row(cfg, batch, length, max_new_tokens, stats, base, args,
                                          draft_args if cfg.draft.kind == "model" else None, hw,
                                          dtype.itemsize, alpha))
                    if profile_rounds and cfg is not baseline:
                        counts = profile_round_counts(engine, pool[:batch], cfg.draft)
                        point[-1].update({f"{k}_per_round": v for k, v in counts.items() if k != "rounds_compared"})
                    bar.update()
                rows += point
            except (MemoryError, torch.cuda.OutOfMemoryError) as err:
                reason = (str(err).splitlines() or ["out of memory"])[0]
                skipped.append(dict(batch=batch, prompt_len=length, reason=reason))
                tqdm.write(f"skipped batch {batch}, prompt {length}: {reason}", file=sys.stderr)
                bar.update(per_point - len(point))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    bar.close()

    write_outputs(dict(meta=meta, simulated_acceptance=alpha, rows=rows, skipped=skipped), out_dir)


def write_outputs(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    table = markdown(result["meta"], result["rows"], result["skipped"])
    (out_dir / "results.md").write_text(table)
    if result["rows"]:
        plot(result["meta"], result["rows"], out_dir / "speedup_vs_batch.png")
    click.echo(table)
    click.echo(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'speedup_vs_batch.png'}")


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

if __name__ == "__main__":
    main()
