"""gfm-generate (python generate.py): generate with MagicDec speculative decoding, or plainly.

  gfm-generate --compare                                          # bundled tiny model, self-speculation
  gfm-generate --checkpoint ckpt/llama-3.1-8b --prompt-file docs.jsonl --bsz 32 --out out.jsonl
  gfm-generate --checkpoint ... --draft none                      # plain decoding (or --gamma 0)
  torchrun --nproc_per_node 8 generate.py --checkpoint ... --bsz 64 --tp 2 --out out.jsonl   # 4 replicas x TP 2

The command is flags, their checks and the report: a prompt file is a batch run (batch.BatchRun:
slots refilled as sequences stop, each completion appended to --out as it finishes, --resume,
replicas), and the library says what went wrong with its parameters' names, which FLAGS renames.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import click
import torch
from click.core import ParameterSource

from gpt_fast_magicdec import load_engine
from gpt_fast_magicdec.batch import BatchRun
from gpt_fast_magicdec.cli.options import model_options
from gpt_fast_magicdec.cli.report import echo, finished, interrupted, report
from gpt_fast_magicdec.config import PRESETS
from gpt_fast_magicdec.cost_model import PROFILES, get_profile, measure_hardware
from gpt_fast_magicdec.data import check_prompt_text, random_prompts, read_jsonl_prompts
from gpt_fast_magicdec.devices import check_model_source, resolve_device, resolve_dtype
from gpt_fast_magicdec.drafters import DRAFT_KINDS
from gpt_fast_magicdec.drafting import DEFAULT_BUDGET, DEFAULT_BUDGET_FRACTION, DraftConfig
from gpt_fast_magicdec.engine import set_compiler_flags
from gpt_fast_magicdec.errors import ParameterError, UserError
from gpt_fast_magicdec.output import JobOutput, is_regular_target
from gpt_fast_magicdec.policies import POLICIES, policy_help
from gpt_fast_magicdec.sampling import SamplingParams
from gpt_fast_magicdec.tp import (ExitAlone, broadcast_object, env_world_size, fail_together, is_main_process,
                                  is_peer_failure, parse_tp_size, run_cli, start)

DEFAULT_PROMPT = "Once upon a time"
# The library's parameter names as this CLI's flags, for ParameterError messages.
FLAGS = {"kind": "--draft", "kv": "--draft-kv", "budget": "--draft-budget", "window": "--draft-window",
         "sink": "--sink", "reselect": "--reselect", "gamma": "--gamma", "ngram": "--ngram", "ngram_min": "--ngram-min",
         "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
         "max_new_tokens": "--max-new-tokens", "max_seq_len": "--max-seq-len", "prefill_chunk": "--prefill-chunk",
         "slots": "--bsz", "checkpoint": "--checkpoint", "model": "--checkpoint / --random-weights",
         "draft_checkpoint": "--draft-checkpoint", "random_weights": "--random-weights",
         "draft_model": "--draft-checkpoint", "attention": "--attention", "device": "--device", "dtype": "--dtype",
         "eos_ids": "--ignore-eos", "out": "--out", "resume": "--resume", "prompt_file": "--prompt-file",
         "prompts": "the prompt"}
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C
EXIT_TERMINATED = 143  # ... and by SIGTERM (a scheduler's stop, or torchrun stopping a failed job's ranks)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint directory (gfm-convert). Default: the bundled tiny model, converted on "
                   "first use.")
@click.option("--random-weights", type=click.Choice(sorted(PRESETS)), default=None,
              help="Run a preset shape with random weights instead of a checkpoint (benchmarks): the text is noise.")
@click.option("--prompt", multiple=True, help=f"A prompt; repeat for several. Default: {DEFAULT_PROMPT!r}.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 prompts: JSONL (the first line a JSON object; a 'text' field per line), or else the "
                   "whole file is one plain-text prompt. Decided by the content, not the file name.")
@click.option("--prompt-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --random-weights: length of the random-token prompts (--bsz of them).")
@click.option("--bsz", type=int, default=1, show_default=True,
              help="Slots: sequences decoded side by side. A finished slot takes the next prompt (see --refill). "
                   "With fewer prompts than slots, copies fill the batch (written to --out once).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Token limit per sequence.")
@click.option("--ignore-eos", is_flag=True,
              help="Do not stop at EOS: every sequence gets exactly --max-new-tokens (benchmarks, lossless checks).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--top-k", type=int, default=None, help="Keep only the k most likely tokens (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of sampling and of random weights. A sampled completion depends on the seed, the prompt, "
                   "its index in the input and the options, never on --bsz, --tp, the replicas or a resume.")
@model_options
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None,
              help="Longest prompt + new tokens allowed. Default: the model's max_position_embeddings.")
@click.option("--draft", type=click.Choice(list(DRAFT_KINDS)), default=None,
              help="self: self-speculation, the draft reads a sparse slice of the target's own cache; model: a "
                   "standalone draft (--draft-checkpoint); lookup: prompt lookup, drafts copied from earlier text "
                   "(n-gram matches, no model); lookup+self / lookup+model: the lookup's draft where it finds one, "
                   "the model's elsewhere; none: plain decoding (as --gamma 0). Default: model with "
                   "--draft-checkpoint, else self (StreamingLLM view, budget 512, sink 16, gamma 3).")
@click.option("--draft-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint of a standalone draft model sharing the target's tokenizer; "
                   "'bundled-draft' names the bundled tiny draft model (~1.2M parameters, the bundled "
                   "target's tokenizer), converted on first use.")
@click.option("--draft-kv", type=click.Choice(list(POLICIES)), default="streaming", show_default=True,
              help="KV selection policy: which keys a model draft reads besides its sliding window. "
                   + policy_help() + ".")
@click.option("--draft-budget", type=int, default=None,
              help=f"Keys the draft reads per query (selected + window); -1 = full cache (standalone draft only, the "
                   f"same as --draft-kv full). Default: {DEFAULT_BUDGET}, clipped to 1/{DEFAULT_BUDGET_FRACTION} of the "
                   "input's shortest prompt (unless --draft-window is given), so the draft stays a small slice of a "
                   "short context; a budget given is used as is.")
@click.option("--sink", type=int, default=16, show_default=True, help="Streaming view: attention-sink positions.")
@click.option("--draft-window", type=int, default=None,
              help="Sliding window of the draft. Default: budget - sink (streaming), budget / 4 (snapkv).")
@click.option("--reselect", type=int, default=None,
              help="--draft-kv pillar: rounds between re-selections of the draft's keys from what verification "
                   "attended to. Default: about 8 draft tokens per selection, round(8 / gamma) rounds (3 at gamma 3).")
@click.option("--ngram", type=int, default=3, show_default=True,
              help="Prompt lookup: the longest n-gram matched against earlier text (shorter ones when it finds none).")
@click.option("--ngram-min", type=int, default=1, show_default=True,
              help="Prompt lookup: the shortest n-gram that may propose. With lookup+self, raising it (2-3) leaves "
                   "rows whose only match is a short, common one to the model's draft.")
@click.option("--gamma", default="3", show_default=True,
              help="Draft tokens per round; 0 = plain decoding; 'auto' picks it (or plain decoding) from the cost "
                   "model and the running acceptance rate, and prints what it chose.")
@click.option("--hardware", type=click.Choice(["measure", *PROFILES], case_sensitive=False), default="measure",
              show_default=True,
              help="--gamma auto's hardware profile: a preset (repeatable choices) or 'measure' (measured at start).")
@click.option("--tp", "tp_size", type=int, default=None,
              help="Under torchrun: ranks per tensor-parallel replica. The world runs world / tp replicas, each "
                   "serving its share of the prompts (default: one replica over every rank).")
@click.option("--draft-ranks", default=None,
              help="Tensor parallel only: comma-separated ranks of each replica that hold the standalone draft "
                   "(e.g. 0,1).")
@click.option("--compare", is_flag=True,
              help="Run plain decoding and the chosen speculative decoding on the same prompts; print the speedup "
                   "and check the greedy outputs are identical.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --compare: warm both up once, then run plain and speculative decoding alternately this "
                   "many times each; the speedup is the ratio of median tokens/s, printed with the spread.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append one JSON line per prompt as it finishes (index, prompt hash, completion, token counts, "
                   "finish reason), synced to disk every few seconds; rewritten in input order when the job ends. "
                   "An existing file is never replaced: see --resume.")
@click.option("--resume", is_flag=True,
              help="Continue the job that wrote --out: skip the prompts already complete there (checked against the "
                   "prompts and options) and append the rest.")
@click.option("--refill/--no-refill", default=True, show_default=True,
              help="Refill a finished slot with the next prompt at once; --no-refill runs static batches (each runs "
                   "until its longest sequence ends).")
@click.option("--simulate-acceptance", type=float, default=None, hidden=True,
              help="bench.py only; refused here.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars: the job (prompts done, tokens/s, acceptance, ETA) and long prefills.")
@click.option("--verbose", is_flag=True,
              help="Print every completion even with --out, and the memory-bandwidth line of plain decoding "
                   "(it measures the machine: slow).")
def main(**opts):
    """Generate from a Llama-family model with MagicDec speculative decoding.

    By default the model drafts for itself: gamma 3 tokens per round from a StreamingLLM view of its
    own KV cache (16 sink + the most recent keys, 512 in all, or 1/4 of a shorter prompt), verified
    in one pass of the full model; the output is the model's own (lossless). --draft-checkpoint uses a
    standalone draft model; --draft lookup copies drafts from the prompt; --draft none decodes plainly.

    Prints the completions (to --out as they finish) and a summary: prefill time, decode tokens/s,
    throughput over all rows and per sequence, latency percentiles, peak memory, and for speculative
    runs acceptance, tokens per round and the time split."""
    warnings.showwarning = _one_line_warning
    ctx = click.get_current_context()
    explicit = frozenset(name for name in opts if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE)
    previous = signal.signal(signal.SIGTERM, _terminated)  # a preempted or failed job stops cleanly
    try:
        run(Options(**opts), explicit)
    except (KeyboardInterrupt, Terminated):  # before the run started: nothing to keep
        echo("interrupted before any generation: nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except ParameterError as err:
        echo(f"error: {err.named(FLAGS)}", err=True)
        sys.exit(1)
    except UserError as err:
        echo(f"error: {err}", err=True)  # under torchrun every rank raises the same error; rank 0 says it
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


# generate's command line as click parsed it: one field per option, declared once (by the decorators).
Options = dataclasses.make_dataclass("Options", [p.name for p in main.params], frozen=True)


def _one_line_warning(message, *args, **kwargs):
    echo(f"warning: {message}", err=True)


# ---- checks that need no model ------------------------------------------------------------------------
def parse_gamma(gamma: str) -> Optional[int]:
    """--gamma N -> N, --gamma auto -> None."""
    if gamma.strip().lower() == "auto":
        return None
    try:
        return int(gamma)
    except ValueError:
        raise UserError(f"--gamma must be an integer or 'auto', got {gamma!r}") from None


def draft_kind(o, gamma: Optional[int]) -> str:
    """The drafter of the run. No --draft means speculation: a standalone draft with
    --draft-checkpoint, else self-speculation. --gamma 0 is plain decoding, like --draft none."""
    if gamma == 0:
        if o.draft not in (None, "none") or o.draft_checkpoint:
            raise UserError("--gamma 0 means plain decoding, but a draft was asked for (--draft / "
                            "--draft-checkpoint): drop one of them")
        return "none"
    if o.draft is None:
        return "model" if o.draft_checkpoint else "self"
    uses_model = "model" in o.draft.split("+")
    if uses_model and not o.draft_checkpoint:
        raise UserError(f"--draft {o.draft} needs --draft-checkpoint DIR")
    if o.draft_checkpoint and not uses_model:
        raise UserError(f"--draft-checkpoint was given but --draft is {o.draft!r}: drop one of them")
    return o.draft


def build_draft_config(o) -> DraftConfig:
    gamma = parse_gamma(o.gamma)
    # --draft-budget -1 is this command's spelling of the full-cache view (--draft-kv full).
    full = o.draft_budget == -1
    kv = "full" if full else o.draft_kv
    kind = draft_kind(o, gamma)
    # --reselect with a fixed selection is a notice (IGNORED_WHEN), not the library's error.
    reselect = o.reselect if kind != "none" and POLICIES[kv].dynamic else None
    return DraftConfig(kind=kind, kv=kv, budget=None if full else o.draft_budget, sink=o.sink, window=o.draft_window,
                       reselect=reselect, ngram=o.ngram, ngram_min=o.ngram_min, gamma=3 if gamma is None else gamma)


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a run does, as far as deciding which options it ignores needs to know."""
    cfg: DraftConfig
    sampling: SamplingParams
    random_weights: bool
    gamma_auto: bool
    compare: bool
    out: bool
    torchrun: bool
    budget_is_full: bool  # the full-cache view was spelled --draft-budget -1
    gamma_zero: bool  # --gamma 0 chose plain decoding


def _draft_view_unused(m: Mode, option: str) -> Optional[str]:
    if not m.cfg.enabled:
        return "with plain decoding"
    if not m.cfg.reads_cache:
        return f"with --draft {m.cfg.kind} (no model draft reads the cache)"
    if m.cfg.full:
        spelling = "--draft-budget -1" if m.budget_is_full else "--draft-kv full"
        if (option, spelling) not in (("draft_budget", "--draft-budget -1"), ("draft_kv", "--draft-kv full")):
            return f"with {spelling} (full cache)"
    return None


# Every option of the command -> when the run ignores it: None (used), or the reason it is ignored.
# tests/test_bad_inputs.py walks the click parameters and requires an entry for each, so a new
# option cannot be silently ignored.
IGNORED_WHEN = {
    "prompt_length": lambda m: None if m.random_weights else "without --random-weights (prompts are text)",
    "ignore_eos": lambda m: "with --random-weights (no tokenizer, no EOS)" if m.random_weights else None,
    "top_p": lambda m: "with greedy decoding (--temperature 0)" if m.sampling.greedy else None,
    "top_k": lambda m: "with greedy decoding (--temperature 0)" if m.sampling.greedy else None,
    "seed": lambda m: ("with greedy decoding of a checkpoint (it seeds sampling and random weights)"
                       if m.sampling.greedy and not m.random_weights else None),
    "draft_kv": lambda m: _draft_view_unused(m, "draft_kv"),
    "draft_budget": lambda m: _draft_view_unused(m, "draft_budget"),
    "draft_window": lambda m: _draft_view_unused(m, "draft_window"),
    "sink": lambda m: _draft_view_unused(m, "sink") or (
        None if m.cfg.kv == "streaming" else f"with --draft-kv {m.cfg.kv} (--sink is the streaming view's)"),
    "reselect": lambda m: _draft_view_unused(m, "reselect") or (
        None if m.cfg.reselects else f"with --draft-kv {m.cfg.kv} (its selection is fixed at prefill)"),
    "ngram": lambda m: None if "lookup" in m.cfg.stages else "without a lookup draft (--draft lookup...)",
    "ngram_min": lambda m: None if "lookup" in m.cfg.stages else "without a lookup draft (--draft lookup...)",
    "gamma": lambda m: None if m.cfg.enabled or m.gamma_zero else "with --draft none",
    "hardware": lambda m: None if m.gamma_auto else "without --gamma auto",
    "tp_size": lambda m: None if m.torchrun else "outside torchrun (one process)",
    "repeats": lambda m: None if m.compare else "without --compare",
    "resume": lambda m: None if m.out else "without --out",
}
ALWAYS_USED = {"checkpoint", "random_weights", "prompt", "prompt_file", "bsz", "max_new_tokens", "temperature",
               "device", "dtype", "attention", "compile", "prefill_chunk", "max_seq_len", "draft", "draft_checkpoint",
               "draft_ranks", "compare", "out", "refill", "simulate_acceptance", "progress", "verbose"}


def ignored_options(explicit: frozenset, mode: Mode) -> list[str]:
    """One notice per option given explicitly that the chosen mode does not use. (Contradictions
    are errors elsewhere; these are harmless but must not pass silently.)"""
    notices = []
    for name, ignored in IGNORED_WHEN.items():
        why = ignored(mode) if name in explicit else None
        if why:
            flag = "--tp" if name == "tp_size" else "--" + name.replace("_", "-")
            notices.append(f"notice: {flag} is ignored {why}")
    return notices


def check_options(o, explicit: frozenset) -> tuple[DraftConfig, SamplingParams, bool]:
    """Every check that needs no model. They run before the process group starts, on every rank
    and with no collective, so a bad flag fails everywhere instead of hanging, and before loading."""
    if o.simulate_acceptance is not None:
        raise UserError("--simulate-acceptance is a benchmark-only mode (bench.py): generate.py never fakes acceptance")
    if o.bsz < 1 or o.prefill_chunk < 1:
        raise UserError("--bsz and --prefill-chunk must be >= 1")
    check_model_source(o.checkpoint, o.random_weights)
    cfg = build_draft_config(o)
    gamma_auto = cfg.enabled and parse_gamma(o.gamma) is None
    if gamma_auto and not cfg.reads_cache:
        raise UserError(f"--gamma auto needs a model draft (the cost model has no {cfg.kind} drafter): give a number")
    sampling = SamplingParams(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)
    mode = Mode(cfg, sampling, o.random_weights is not None, gamma_auto, o.compare, o.out is not None,
                env_world_size() > 1, o.draft_budget == -1, parse_gamma(o.gamma) == 0)
    for line in ignored_options(explicit, mode):
        echo(line, err=True)
    if o.compare and not cfg.enabled:
        raise UserError("--compare runs plain decoding against speculation: drop --draft none / --gamma 0")
    tp_size = parse_tp_size(o.tp_size, env_world_size())
    if o.draft_ranks is not None and tp_size == 1:
        raise UserError("--draft-ranks needs tensor parallelism: launch with torchrun --nproc_per_node N (and --tp > 1)")
    if o.draft_ranks is not None and "model" not in cfg.stages:
        raise UserError("--draft-ranks places a standalone draft (--draft-checkpoint); it does not apply to "
                        f"--draft {cfg.kind}")
    if o.out is not None and env_world_size() // tp_size > 1 and not is_regular_target(o.out):
        raise UserError(f"--out {o.out} is not a regular file: several replicas write parts that are merged into one")
    return cfg, sampling, gamma_auto


# ---- the run --------------------------------------------------------------------------------------------
def run(o, explicit: frozenset = frozenset()) -> None:
    """The CLI's stages: check every option and --out, start the process groups, load, run the batch
    (and with --compare the plain one), report."""
    cfg, sampling, gamma_auto = check_options(o, explicit)
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    texts = [check_prompt_text(t, "--prompt") for t in o.prompt]
    texts += read_jsonl_prompts(o.prompt_file) if o.prompt_file is not None else []
    if o.random_weights and texts:
        raise UserError("--random-weights has no tokenizer: use --prompt-length instead of prompt text")
    # Before anything is loaded: an --out that must not be written fails now, on every rank.
    output = JobOutput(o.out, o.resume, o.prompt_file, lock=False) if o.out else None
    try:
        layout, tp = start(device, o.tp_size, o.draft_ranks)  # torchrun: replicas x tensor parallel (None otherwise)
        if layout is not None and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        torch.manual_seed(o.seed)  # random weights: the same seed on every rank
        if device.type == "cuda":
            set_compiler_flags()
        # The bandwidth line's ceiling, measured while the device is still empty (at the end the caches
        # hold the memory a copy test needs).
        copy_bandwidth = measure_hardware(device).mem_bandwidth if o.compare or o.verbose else None
        with fail_together(layout):  # one rank failing to load makes every rank fail with its message
            if output is not None and is_main_process():
                output.acquire()  # another run on this --out fails here, on every rank
            engine, tokenizer = load_engine(o.checkpoint, draft_checkpoint=o.draft_checkpoint,
                                            random_weights=o.random_weights, device=device, dtype=dtype,
                                            attention=o.attention, compile=o.compile, tp=tp, seed=o.seed)
        prompts = (random_prompts(engine.args.vocab_size, o.bsz, o.prompt_length, o.seed) if tokenizer is None
                   else texts or [DEFAULT_PROMPT])
        # Every rank uses rank 0's hardware profile, so all ranks of a replica pick the same gamma every round.
        hardware = broadcast_object(get_profile(o.hardware, device)) if gamma_auto else None
        batch = BatchRun(engine, prompts, output, layout, draft=cfg, sampling=sampling, slots=o.bsz,
                         max_new_tokens=o.max_new_tokens, seed=o.seed, eos_ids=() if o.ignore_eos else None,
                         prefill_chunk=o.prefill_chunk, max_seq_len=o.max_seq_len, refill=o.refill,
                         gamma_auto=hardware, progress=o.progress)
    except BaseException:
        if output is not None:
            output.release()
        raise
    if batch.done:
        echo(f"resuming: {len(batch.done)} of {len(batch.prompt_ids)} prompts are already complete in {o.out}")
    # From here a failure is one rank's (its write failed, it was signalled, a peer died): it says
    # what is safe itself, and leaves without waiting for ranks that may be inside a collective.
    try:
        result = batch.execute(o.compare, o.repeats)
    except KeyboardInterrupt:
        interrupted(batch, "interrupted:")
        raise ExitAlone(EXIT_INTERRUPTED) from None
    except Terminated:
        interrupted(batch, "error: stopped by SIGTERM (a scheduler, or torchrun after another rank failed):",
                    every_rank=True)
        raise ExitAlone(EXIT_TERMINATED) from None
    except UserError as err:
        if layout is None:
            raise
        click.echo(f"error: rank {layout.rank}: {err}", err=True)
        raise ExitAlone(1) from None
    except RuntimeError as err:
        if layout is None or not is_peer_failure(err):
            raise
        interrupted(batch, "error: another rank of this job stopped (its own message says why):", every_rank=True)
        raise ExitAlone(1) from None
    if result.runs:
        report(result, batch, o, copy_bandwidth)
    finished(result, batch, o)


class Terminated(Exception):
    """SIGTERM arrived: stop the run as Ctrl-C would, but say it as an error on every rank."""


def _terminated(signum, frame):
    raise Terminated


def console_main() -> None:
    """The `gfm-generate` command (and `python generate.py`): under torchrun, leave the process
    group on every exit path (see tp.run_cli)."""
    run_cli(main)


if __name__ == "__main__":
    console_main()
