"""Plain decoding vs MagicDec speculative decoding: a sweep over batch size, prompt length, draft,
budget and gamma, with measured and predicted speedups side by side.

  python bench.py --random-weights llama-3.1-8b --simulate-acceptance 0.8 \\
      --batch-sizes 1,8,32 --prompt-lengths 4096,16384 --gammas 2,3,4 --budgets 512
  python bench.py --checkpoint ckpt/llama-3.1-8b --prompts-file pg19_test.jsonl --drafts self-streaming

For each (batch, prompt length) it warms up plain decoding and every speculative configuration at
the timed shapes, then times them interleaved, A B A C ... A (A: plain decoding), so that every
speculative run is paired with the plain runs beside it (gpt_fast_magicdec/benchmarking/sweep.py).
Writes results.json, results.md (the same rows and numbers) and speedup_vs_batch.png into --out-dir.

Measured step times, per round:  T_T = plain decode time / rounds;  T_V = verify phase / rounds;
T_D = draft phase / rounds / gamma. The speedup they predict, Omega(gamma, alpha) * T_T /
(gamma * T_D + T_V), is shown beside the roofline cost model's prediction and the measured one.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
import warnings
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from gpt_fast_magicdec.benchmarking.report import device_name, git_commit, utc_now
from gpt_fast_magicdec.benchmarking.sweep import DRAFTS, build_configs, sweep
from gpt_fast_magicdec.benchmarking.sweep_report import (RESULT_FILES, check_out_dir, default_out_dir, merge_results,
                                                         write_outputs)
from gpt_fast_magicdec.cli.options import model_options
from gpt_fast_magicdec.devices import check_model_source, resolve_device, resolve_dtype
from gpt_fast_magicdec.config import PRESETS, ModelArgs
from gpt_fast_magicdec.cost_model import PROFILES, get_profile
from gpt_fast_magicdec.data import long_document_prompts, random_prompts
from gpt_fast_magicdec import load_engine
from gpt_fast_magicdec.engine import Engine, set_compiler_flags
from gpt_fast_magicdec.errors import ParameterError, UserError
from gpt_fast_magicdec.memory import check_fits, model_bytes
from gpt_fast_magicdec.tiny import resolve_draft_checkpoint
from gpt_fast_magicdec.tokenizer import check_tokenizer_fits, load_tokenizer


# The library's parameter names as this CLI's flags, for ParameterError messages.
FLAGS = {"gamma": "--gammas", "budget": "--budgets", "sink": "--sink", "window": "the window", "kv": "--drafts",
         "kind": "--drafts", "checkpoint": "--checkpoint", "random_weights": "--random-weights",
         "draft_checkpoint": "--draft-checkpoint", "draft_random_weights": "--draft-random-weights",
         "attention": "--attention", "max_new_tokens": "--max-new-tokens", "prefill_chunk": "--prefill-chunk",
         "device": "--device", "dtype": "--dtype"}


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
@click.option("--draft-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Standalone draft checkpoint: adds model-streaming and model-full to the default --drafts. "
                   "'bundled-draft' names the bundled tiny draft model.")
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
@model_options
@click.option("--hardware", default="measure", show_default=True,
              type=click.Choice(["measure", *PROFILES], case_sensitive=False),
              help="Hardware profile of the cost model's predictions and the bandwidth column: a preset, or "
                   "'measure' (copy bandwidth and matmul rate measured on --device).")
@click.option("--simulate-acceptance", "alpha", type=click.FloatRange(0.0, 1.0), default=None, metavar="ALPHA",
              help="Random weights only: run the real draft and verify passes, but accept each draft token with "
                   "probability ALPHA (seeded, independent of the model). Every output is marked SIMULATED.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed warm-up runs per configuration, plain decoding included (a few tokens at the timed "
                   "run's shapes: compile, graph capture, allocator, first-seen shapes).")
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Interleaved timed rounds A B A C ... per point (A: plain decoding, so every speculative run "
                   "sits between two plain runs); medians and min/max are reported, a spread > 10% is flagged.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random weights, prompts and simulated acceptance.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where results.json, results.md and speedup_vs_batch.png are written. Default: a new "
                   "bench_results/<date>-<time>/ per run. Checked before anything runs: an --out-dir that holds an "
                   "earlier run's results is refused unless --overwrite.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace the results of an earlier run in --out-dir.")
@click.option("--merge", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="Run nothing: combine the results.json of earlier --out-dir runs (e.g. one per prompt length, "
                   "to keep each command short) into one table and plot in --out-dir. Repeatable.")
@click.option("--profile-rounds", is_flag=True, default=False,
              help="Also profile each speculative configuration (torch.profiler, two runs differenced) and "
                   "report CUDA-graph launches, host syncs and device-to-host copies per round.")
@click.option("--job", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run the batch-job benchmark instead of the sweep: N prompts cut from --prompts-file, their lengths "
                   "drawn from the range of --prompt-lengths (MIN,MAX) and their token limits from --job-limits, "
                   "with real EOS, through the first of --batch-sizes slots; static batches against in-flight "
                   "refill, plain decoding and the first of --drafts (first --gammas and --budgets). Writes job.json "
                   "and job.md into --out-dir.")
@click.option("--job-limits", default="16,256", show_default=True, callback=_int_list, metavar="MIN,MAX",
              help="With --job: the range each prompt's token limit is drawn from.")
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
    except ParameterError as err:
        click.echo(f"error: {err.named(FLAGS)}", err=True)
        sys.exit(1)
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
        prefill_chunk, hardware, alpha, warmup, repeats, seed, out_dir, merge, profile_rounds=False, kernels=False,
        overwrite=False, job=None, job_limits=(16, 256)):
    opts = {key: value for key, value in locals().items()
            if key not in ("kernels", "profile_rounds", "overwrite", "job", "job_limits") or value}
    device = resolve_device(device) if not merge else None  # a bad device fails before any work
    new_dir = out_dir is None
    out_dir = default_out_dir() if new_dir else out_dir
    check_out_dir(out_dir, ("kernels.json",) if kernels else ("job.json",) if job else RESULT_FILES, overwrite)
    if job is not None:
        run_job_benchmark(opts, job, job_limits, checkpoint, prompts_file, prompt_lengths, batch_sizes, drafts,
                          gammas, budgets, sink, device, dtype, attention, compile, prefill_chunk, seed, out_dir)
        return
    if kernels:  # no model: the attention kernels alone
        from gpt_fast_magicdec.benchmarking.kernel_report import kernel_bench_cli
        kernel_bench_cli(out_dir, command_line(opts), device, resolve_dtype(dtype, device), batch_sizes,
                         prompt_lengths, gammas, budgets[0], sink, hardware)
        return
    if merge:
        write_outputs(merge_results(merge, command_line(dict(merge=merge, out_dir=out_dir))), out_dir,
                      overwrite, new_dir)
        return
    check_model_source(checkpoint, random_weights, draft_checkpoint, draft_random_weights)
    if checkpoint is None and random_weights is None:  # no bundled default: a sweep names what it measures
        raise UserError("give one of --checkpoint DIR or --random-weights PRESET")
    draft_checkpoint = resolve_draft_checkpoint(draft_checkpoint)  # 'bundled-draft' -> its directory
    if draft_checkpoint is not None and not draft_checkpoint.is_dir():
        raise UserError(f"--draft-checkpoint {draft_checkpoint}: "
                        f"{'is a file, not a directory' if draft_checkpoint.exists() else 'no such directory'}")
    if alpha is not None and random_weights is None:
        raise UserError("--simulate-acceptance is for --random-weights runs; a checkpoint's acceptance is real, "
                        "measure it")
    if max_new_tokens < 2:
        raise UserError("--max-new-tokens must be >= 2 (the first token comes from prefill)")
    has_draft_model = draft_checkpoint is not None or draft_random_weights is not None
    drafts = drafts or (["self-streaming", "self-snapkv"] + (["model-streaming", "model-full"] if has_draft_model
                                                              else []))
    if not has_draft_model and any("model" in DRAFTS[d][0].split("+") for d in drafts):
        raise UserError("model-* drafts need --draft-checkpoint or --draft-random-weights")
    configs = build_configs(drafts, gammas, budgets, sink)
    dtype = resolve_dtype(dtype, device)
    if device.type == "cuda":
        set_compiler_flags()
    # Every input is read and checked before the first run: a prompt file that is not UTF-8, or too short
    # for the longest --prompt-lengths, must not surface after a sweep's first points.
    args = ModelArgs.from_preset(random_weights) if random_weights else ModelArgs.load(checkpoint)
    draft_args = (ModelArgs.from_preset(draft_random_weights) if draft_random_weights else
                  ModelArgs.load(draft_checkpoint) if draft_checkpoint is not None else None)
    pools = prompt_pools(args, prompts_file, tokenizer_dir, checkpoint, max(batch_sizes), prompt_lengths, seed)
    prompts_desc = f"windows of {prompts_file.name} (seed {seed})" if prompts_file else f"random tokens (seed {seed})"
    check_fits(f"the model {random_weights or checkpoint}{' with its draft' if draft_args else ''}",
               sum(model_bytes(a, dtype) for a in (args, draft_args) if a is not None), device,
               advice="use a smaller model, or a device with more memory")
    hw = get_profile(hardware, device)  # before the weights, while the memory is free

    engine, _ = load_engine(checkpoint, draft_checkpoint=draft_checkpoint, random_weights=random_weights,
                            draft_random_weights=draft_random_weights, device=device, dtype=dtype,
                            attention=attention, compile=compile, seed=seed)
    meta = run_metadata(command_line(opts), engine, device, dtype, hw, checkpoint, random_weights, draft_checkpoint,
                        draft_random_weights, alpha, prompts_desc, max_new_tokens, warmup, repeats)
    rows, skipped = sweep(engine, configs, pools.__getitem__, batch_sizes, prompt_lengths, max_new_tokens, warmup,
                          repeats, alpha, seed, prefill_chunk, hw, draft_args, profile_rounds)
    write_outputs(dict(meta=meta, simulated_acceptance=alpha, rows=rows, skipped=skipped), out_dir, overwrite,
                  new_dir)


def prompt_pools(args: ModelArgs, prompts_file, tokenizer_dir, checkpoint, n: int, prompt_lengths: list,
                 seed: int) -> dict:
    """{prompt length: n prompts}, all built up front: windows of --prompts-file, else random ids."""
    if prompts_file is None:
        return {length: random_prompts(args.vocab_size, n, length, seed) for length in prompt_lengths}
    if tokenizer_dir is None and checkpoint is None:
        raise UserError("--prompts-file with --random-weights needs --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir or checkpoint)
    check_tokenizer_fits(tokenizer, args.vocab_size, tokenizer_dir or checkpoint)
    return {length: long_document_prompts(prompts_file, tokenizer, n, length, seed) for length in prompt_lengths}


def run_metadata(command: str, engine: Engine, device, dtype, hw, checkpoint, random_weights, draft_checkpoint,
                 draft_random_weights, alpha, prompts_desc: str, max_new_tokens: int, warmup: int, repeats: int) -> dict:
    """What results.json records beside the rows: command, commit, device, date, setup."""
    return dict(command=command, git_commit=git_commit(), device=str(device),
                device_name=device_name(device), torch_version=torch.__version__, date=utc_now(),
                model=f"{random_weights} (random weights)" if random_weights else checkpoint.name,
                draft_model=(f"{draft_random_weights} (random weights)" if draft_random_weights
                             else draft_checkpoint.name if draft_checkpoint else None),
                dtype=str(dtype).removeprefix("torch."), attention=engine.backend, compile=engine.compile,
                cuda_graphs=engine.use_graphs, hardware=hw.name, hardware_profile=dataclasses.asdict(hw),
                simulated_acceptance=alpha, prompts=prompts_desc, max_new_tokens=max_new_tokens,
                warmup=warmup, repeats=repeats)


def run_job_benchmark(opts, n, limits, checkpoint, prompts_file, prompt_lengths, batch_sizes, drafts, gammas,
                      budgets, sink, device, dtype, attention, compile, prefill_chunk, seed, out_dir) -> None:
    """--job: static batches against refill on one ragged job (benchmarking/job.py)."""
    import json

    from gpt_fast_magicdec.benchmarking import job as job_bench

    if prompts_file is None:
        raise UserError("--job cuts its prompts from --prompts-file (a PG-19-style JSONL); give one")
    lengths, limit_range = job_bench.parse_range(prompt_lengths, "--prompt-lengths"), job_bench.parse_range(
        limits, "--job-limits")
    draft = build_configs((drafts or ["self-streaming"])[:1], gammas[:1], budgets[:1], sink)[0].draft
    dtype = resolve_dtype(dtype, device)
    engine, tokenizer = load_engine(checkpoint, device=device, dtype=dtype, attention=attention, compile=compile)
    result = job_bench.job_benchmark(engine, tokenizer, prompts_file, n, lengths, limit_range, batch_sizes[0],
                                     draft, seed, prefill_chunk, echo=tqdm.write)
    meta = dict(command=command_line(opts | dict(job=n, job_limits=limits)), git_commit=git_commit(),
                device_name=device_name(device), torch_version=torch.__version__, date=utc_now(),
                model=checkpoint.name if checkpoint else "bundled tiny model", dtype=str(dtype).removeprefix("torch."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "job.json").write_text(json.dumps(dict(meta=meta, **result), indent=1) + "\n")
    (out_dir / "job.md").write_text(job_bench.markdown(meta, result))
    click.echo(job_bench.markdown(meta, result))


def console_main() -> None:
    """The `gfm-bench` command (and `python bench.py`)."""
    main()


if __name__ == "__main__":
    console_main()
