"""gfm-generate (python generate.py): generate with MagicDec speculative decoding, or plainly.

  gfm-generate --compare                                          # bundled tiny model, self-speculation
  gfm-generate --checkpoint ckpt/llama-3.1-8b --prompt-file docs.jsonl --bsz 32 --out out.jsonl
  gfm-generate --checkpoint ... --draft none                      # plain decoding (or --gamma 0)
  torchrun --nproc_per_node 8 generate.py --checkpoint ... --bsz 64 --tp 2 --out out.jsonl   # 4 replicas x TP 2

A prompt file is a job: --bsz slots stay busy (a finished slot takes the next prompt), each
completion is appended to --out as it finishes, and --resume continues a job that stopped.
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
from tqdm.auto import tqdm

from gpt_fast_magicdec import load_engine
from gpt_fast_magicdec.cli.options import model_options, resolve_device, resolve_dtype
from gpt_fast_magicdec.cli.report import report
from gpt_fast_magicdec.config import PRESETS
from gpt_fast_magicdec.cost_model import PROFILES, get_profile, measure_hardware
from gpt_fast_magicdec.data import check_prompt_text, read_jsonl_prompts
from gpt_fast_magicdec.drafters import DRAFT_KINDS
from gpt_fast_magicdec.drafting import DEFAULT_BUDGET_FRACTION, DraftConfig, budget_for_context
from gpt_fast_magicdec.engine import set_compiler_flags
from gpt_fast_magicdec.errors import ParameterError, UserError
from gpt_fast_magicdec.cli.output import JobOutput, is_regular_target, options_fingerprint, part_path, read_rows, text_hash
from gpt_fast_magicdec.policies import POLICIES, policy_help
from gpt_fast_magicdec.sampling import SamplingParams
from gpt_fast_magicdec.timing import Spread
from gpt_fast_magicdec.tp import (broadcast_object, env_world_size, fail_together, is_main_process, parse_tp_size,
                                  run_cli, start)

PLAIN = "plain decoding"
DEFAULT_PROMPT = "Once upon a time"
# The library's parameter names as this CLI's flags, for ParameterError messages.
FLAGS = {"kind": "--draft", "kv": "--draft-kv", "budget": "--draft-budget", "window": "--draft-window",
         "sink": "--sink", "gamma": "--gamma", "ngram": "--ngram", "ngram_min": "--ngram-min",
         "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "max_new_tokens": "--max-new-tokens", "max_seq_len": "--max-seq-len",
         "prefill_chunk": "--prefill-chunk", "slots": "--bsz", "checkpoint": "--checkpoint",
         "draft_checkpoint": "--draft-checkpoint", "random_weights": "--random-weights",
         "draft_model": "--draft-checkpoint", "attention": "--attention", "prompts": "the prompt"}
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
@click.option("--draft-budget", type=int, default=512, show_default=True,
              help="Keys the draft reads per query (selected + window); -1 = full cache (standalone draft only, as "
                   f"--draft-kv full). When not given (nor --draft-window), a job clips it to 1/"
                   f"{DEFAULT_BUDGET_FRACTION} of its shortest prompt, so the draft stays a small slice of a short "
                   "context.")
@click.option("--sink", type=int, default=16, show_default=True, help="Streaming view: attention-sink positions.")
@click.option("--draft-window", type=int, default=None,
              help="Sliding window of the draft. Default: budget - sink (streaming), budget / 4 (snapkv).")
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
    latency percentiles, peak memory, and for speculative runs acceptance, tokens per round and the
    time split."""
    warnings.showwarning = _one_line_warning
    ctx = click.get_current_context()
    explicit = frozenset(name for name in opts if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE)
    previous = signal.signal(signal.SIGTERM, _terminated)  # a preempted or failed job stops cleanly
    try:
        run(Options(**opts), explicit)
    except (KeyboardInterrupt, Terminated):  # before the job started: nothing to keep
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


@dataclasses.dataclass(frozen=True)
class Options:
    """generate's command line, as click parsed it (one field per option)."""
    checkpoint: Optional[Path]
    random_weights: Optional[str]
    prompt: tuple
    prompt_file: Optional[Path]
    prompt_length: int
    bsz: int
    max_new_tokens: int
    ignore_eos: bool
    temperature: float
    top_p: Optional[float]
    top_k: Optional[int]
    seed: int
    device: Optional[str]
    dtype: Optional[str]
    attention: str
    compile: Optional[bool]
    prefill_chunk: int
    max_seq_len: Optional[int]
    draft: Optional[str]
    draft_checkpoint: Optional[Path]
    draft_kv: str
    draft_budget: int
    sink: int
    draft_window: Optional[int]
    ngram: int
    ngram_min: int
    gamma: str
    hardware: str
    tp_size: Optional[int]
    draft_ranks: Optional[str]
    compare: bool
    repeats: int
    out: Optional[Path]
    resume: bool
    refill: bool
    simulate_acceptance: Optional[float]
    progress: bool
    verbose: bool


def echo(*args, **kwargs) -> None:
    """click.echo on rank 0 only (everywhere outside torchrun)."""
    if is_main_process():
        click.echo(*args, **kwargs)


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


def draft_kind(o: Options, gamma: Optional[int]) -> str:
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


def build_draft_config(o: Options) -> DraftConfig:
    gamma = parse_gamma(o.gamma)
    kind = draft_kind(o, gamma)
    # --draft-budget -1 is the command line's older spelling of the full-cache view.
    kv = "full" if o.draft_budget == -1 else o.draft_kv
    budget = 512 if o.draft_budget == -1 else o.draft_budget
    return DraftConfig(kind=kind, kv=kv, budget=budget, sink=o.sink, window=o.draft_window, ngram=o.ngram,
                       ngram_min=o.ngram_min, gamma=3 if gamma is None else gamma)


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


def check_options(o: Options, explicit: frozenset) -> tuple[DraftConfig, SamplingParams, bool]:
    """Every check that needs no model. They run before the process group starts, on every rank
    and with no collective, so a bad flag fails everywhere instead of hanging, and before loading."""
    if o.simulate_acceptance is not None:
        raise UserError("--simulate-acceptance is a benchmark-only mode (bench.py): generate.py never fakes acceptance")
    if o.bsz < 1 or o.prefill_chunk < 1:
        raise UserError("--bsz and --prefill-chunk must be >= 1")
    if o.checkpoint is not None and o.random_weights is not None:
        raise UserError("give either --checkpoint or --random-weights, not both")
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
def run(o: Options, explicit: frozenset = frozenset()) -> None:
    """The CLI's stages: check every option, start the process groups, load, tokenize, run the
    job (and with --compare the plain one), report, finish --out."""
    cfg, sampling, gamma_auto = check_options(o, explicit)
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    texts = [check_prompt_text(t, "--prompt") for t in o.prompt]
    texts += read_jsonl_prompts(o.prompt_file) if o.prompt_file is not None else []
    if o.random_weights and texts:
        raise UserError("--random-weights has no tokenizer: use --prompt-length instead of prompt text")
    output = JobOutput(o.out, run_fingerprint(o, cfg, sampling), o.resume, o.prompt_file) if o.out else None

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
        engine, tokenizer = load_engine(o.checkpoint, draft_checkpoint=o.draft_checkpoint,
                                        random_weights=o.random_weights, device=device, dtype=dtype,
                                        attention=o.attention, compile=o.compile, tp=tp, seed=o.seed)
    prompt_ids = tokenize(tokenizer, texts, engine.args.vocab_size, o.prompt_length, o.bsz, o.seed)
    job = GenerationJob(o, explicit, engine, tokenizer, texts, prompt_ids, cfg, sampling, layout, output)
    job.copy_bandwidth = copy_bandwidth
    if gamma_auto:
        job.auto_gamma = auto_gamma_factory(o.hardware, device, engine, dtype)
    try:
        job.run()
    except KeyboardInterrupt:
        job.interrupted("interrupted:")
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        job.interrupted("error: stopped by SIGTERM (a scheduler, or torchrun after another rank failed):",
                        every_rank=True)
        sys.exit(EXIT_TERMINATED)


class Terminated(Exception):
    """SIGTERM arrived: stop the job as Ctrl-C would, but say it as an error on every rank."""


def _terminated(signum, frame):
    raise Terminated


def run_fingerprint(o: Options, cfg: DraftConfig, sampling: SamplingParams) -> str:
    """The options that decide a job's output (resume refuses a file written with others). The
    slot count, replicas and execution settings are left out: they change speed, not text."""
    model = o.random_weights or str(Path(o.checkpoint).resolve() if o.checkpoint else "bundled")
    return options_fingerprint(dict(model=model, draft=dataclasses.asdict(cfg) if cfg.enabled else None,
                                    draft_checkpoint=str(o.draft_checkpoint), sampling=dataclasses.asdict(sampling),
                                    seed=o.seed if not sampling.greedy or o.random_weights else None,
                                    max_new_tokens=o.max_new_tokens, ignore_eos=o.ignore_eos,
                                    max_seq_len=o.max_seq_len, dtype=o.dtype, prompt_length=o.prompt_length))


def tokenize(tokenizer, texts: list, vocab_size: int, prompt_length: int, bsz: int, seed: int) -> list:
    """Prompt token ids: the texts encoded, or (random weights, no tokenizer) bsz random prompts."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(vocab_size, (prompt_length,), generator=gen).tolist() for _ in range(bsz)]
    return [tokenizer.encode(t) for t in texts or [DEFAULT_PROMPT]]


def auto_gamma_factory(hardware: str, device, engine, dtype):
    """--gamma auto: job draft config -> a fresh AutoGamma over the whole (unsharded) shapes. Every
    rank uses rank 0's hardware profile, so all ranks of a replica pick the same gamma every round."""
    from gpt_fast_magicdec.autogamma import AutoGamma

    hw = broadcast_object(get_profile(hardware, device))  # every rank measures: it may run a collective
    tp_size = engine.tp.world_size if engine.tp else 1

    def for_job(cfg: DraftConfig) -> AutoGamma:  # the job's own (possibly clipped) budget
        return AutoGamma(engine.args, hw, cfg, dtype.itemsize, tp_size, engine.draft_args)

    return for_job


@dataclasses.dataclass
class RunResult:
    """One pass of the job over this replica's prompts."""
    name: str  # PLAIN or the draft's description
    completions: dict  # prompt index -> Completion
    stats: object  # GenerationStats
    cfg: DraftConfig
    controller: object = None  # its AutoGamma, or None


class GenerationJob:
    """This process's share of the job: the prompts its replica serves, the runs over them, and
    what it writes."""

    def __init__(self, o: Options, explicit: frozenset, engine, tokenizer, texts, prompt_ids, cfg, sampling, layout,
                 output):
        self.o, self.explicit, self.engine, self.tokenizer, self.texts = o, explicit, engine, tokenizer, texts
        self.prompt_ids, self.cfg, self.sampling, self.layout, self.output = prompt_ids, cfg, sampling, layout, output
        self.stop_ids = () if o.ignore_eos or tokenizer is None else tokenizer.eos_ids
        self.auto_gamma = None
        self.copy_bandwidth = None  # --compare / --verbose: measured before loading (bytes / s)
        self.written = 0
        self.ids_without_piece = 0  # generated ids the tokenizer has no piece for (left out of the text)
        replicas = layout.replicas if layout else 1
        self.writes = output is not None and (layout is None or layout.leader)
        hashes = {i: text_hash(texts[i] if texts else ids) for i, ids in enumerate(prompt_ids)}
        done = {}
        if output is not None and o.resume:
            done = output.read_done(hashes) if self.writes else {}
            done = self._union(done)
        self.done = done
        todo = [i for i in range(len(prompt_ids)) if i not in done]
        self.share = todo[layout.replica::replicas] if layout else todo
        self.hashes = hashes

    def _union(self, done: dict) -> dict:
        """Every replica's view of what is done, merged (the files may live on different nodes)."""
        if self.layout is None:
            return done
        import torch.distributed as dist

        views = [None] * self.layout.world_size
        dist.all_gather_object(views, done)
        return {k: v for view in views for k, v in view.items()}

    # -- runs -----------------------------------------------------------------------------------------
    def run(self) -> None:
        o = self.o
        if self.done:
            echo(f"resuming: {len(self.done)} of {len(self.prompt_ids)} prompts are already complete in {o.out}")
        if self.writes:
            replicas = self.layout.replicas if self.layout else 1
            self.output.open(self.layout.replica if replicas > 1 else None)
        runs, timing = [], None
        if self.share:
            if o.compare:
                plain, final, timing = self.paired_runs()
                runs.append(plain)
            else:
                final = self.run_once(self.cfg, write=True)
            runs.append(final)
            report(runs, timing, self)
        self.finish()

    def job_config(self, cfg: DraftConfig) -> DraftConfig:
        """The draft config of this job: its budget clipped to the input's shortest prompt when the
        user chose neither budget nor window (the whole input's, not this replica's or this resume's
        share, so the draft, and with it a sampled completion, never depends on the layout)."""
        if {"draft_budget", "draft_window"} & self.explicit:
            return cfg
        return budget_for_context(cfg, min(map(len, self.prompt_ids)))

    def run_once(self, cfg: DraftConfig, write: bool) -> RunResult:
        """One pass over the share: a job with --bsz slots, each completion written as it finishes."""
        o, engine = self.o, self.engine
        cfg = self.job_config(cfg) if cfg.enabled else cfg
        controller = self.auto_gamma(cfg) if self.auto_gamma is not None and cfg.enabled else None
        indices = self.share
        if len(indices) < o.bsz:  # fewer prompts than slots: copies fill the batch, written once
            indices = [indices[k % len(indices)] for k in range(o.bsz)]
        job = engine.stream([self.prompt_ids[i] for i in indices], o.max_new_tokens, slots=o.bsz,
                            sampling=self.sampling, draft=cfg, eos_ids=self.stop_ids, prefill_chunk=o.prefill_chunk,
                            max_seq_len=o.max_seq_len, progress=o.progress and is_main_process(),
                            gamma_controller=controller, seed=o.seed, indices=indices, refill=o.refill)
        name = PLAIN if not cfg.enabled else "draft: " + cfg.describe() + (" (gamma auto)" if controller else "")
        completions = {}
        bar = tqdm(total=len(set(indices)), desc="job", unit="prompt", leave=False,
                   disable=not (o.progress and is_main_process()) or len(set(indices)) < 2)
        tokens, accepted, drafted = 0, 0, 0
        for c in job:
            if c.index in completions:
                continue
            completions[c.index] = c
            tokens, accepted, drafted = tokens + len(c.tokens), accepted + c.accepted, drafted + c.drafted
            if write and self.writes:
                self.output.write(self.row(c))
                self.written += 1
            bar.update()
            postfix = {"tok/s": f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}"}
            if drafted:
                postfix["accept"] = f"{accepted / drafted:.2f}"
            bar.set_postfix(postfix, refresh=False)
        bar.close()
        return RunResult(name, completions, job.stats, cfg, controller)

    def paired_runs(self) -> tuple[RunResult, RunResult, tuple]:
        """--compare: -> (plain run, speculative run, (plain tok/s Spread, speculative tok/s Spread)).

        repeats 1: one run of each, plain first. repeats N > 1 (whichever mode runs first pays for
        first-seen shapes): one untimed warm-up of each, then N alternating pairs; the runs shown
        are each mode's median. --out is written during the first speculative run (every run of a
        mode produces the same tokens)."""
        plain_cfg = DraftConfig(kind="none")
        repeats = self.o.repeats
        first_write = [True]

        def speculative() -> RunResult:
            write, first_write[0] = first_write[0], False
            return self.run_once(self.cfg, write=write)

        if repeats > 1:
            self.run_once(plain_cfg, write=False)
            speculative()
        pairs = [(self.run_once(plain_cfg, write=False), speculative()) for _ in range(repeats)]
        shown, spreads = [], []
        for mode in (0, 1):
            results = sorted((pair[mode] for pair in pairs), key=lambda r: r.stats.tokens_per_s)
            shown.append(results[(len(results) - 1) // 2])
            spreads.append(Spread.of([r.stats.tokens_per_s for r in results]))
        return shown[0], shown[1], tuple(spreads)

    def row(self, c) -> dict:
        """The --out line of one completion. Ids the tokenizer has no piece for (a padded embedding's
        rows) are left out of the text, counted, and kept in completion_ids."""
        completion, unknown = self.tokenizer.decode_counted(c.tokens) if self.tokenizer else (None, 0)
        self.ids_without_piece += unknown
        return {"index": c.index, "prompt_sha256": self.hashes[c.index],
                "prompt": self.texts[c.index] if self.texts else None, "completion": completion,
                "completion_ids": c.tokens, "ids_without_piece": unknown, "prompt_tokens": c.prompt_tokens,
                "new_tokens": len(c.tokens), "finish_reason": c.finish_reason, "run": self.output.run}

    # -- the end --------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Close --out and rewrite it in input order; with replicas, every part's rows are gathered
        to global rank 0, which writes OUT, and each part goes only once OUT holds its rows."""
        if self.output is None:
            return
        if self.writes:
            self.output.close()
        layout = self.layout
        if self.output.direct:  # a device or a pipe: written as the job ran, nothing to read back
            problem = None
        elif layout is None or layout.replicas == 1:
            problem = self.output.rewrite_in_order(read_rows(self.output.path)) if is_main_process() else None
        else:
            import torch.distributed as dist

            mine = read_rows(part_path(self.output.path, layout.replica)) if layout.leader else []
            gathered = [None] * layout.world_size if layout.rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            problem = None
            if layout.rank == 0:
                problem = self.output.rewrite_in_order(read_rows(self.output.path) + [r for p in gathered for r in p])
            problem = broadcast_object(problem)
            if layout.leader and problem is None:
                part_path(self.output.path, layout.replica).unlink(missing_ok=True)
        if self.ids_without_piece:
            echo(f"warning: {self.ids_without_piece} generated ids have no piece in the tokenizer (the model's "
                 "embedding is larger): left out of the text, kept in completion_ids", err=True)
        if problem:
            echo(f"warning: could not rewrite {self.o.out} in input order ({problem}); every completion is in it "
                 "(and in its .part files with several replicas), in the order they finished", err=True)
        elif not self.output.direct:
            echo(f"wrote {self.o.out}")

    def interrupted(self, prefix: str, every_rank: bool = False) -> None:
        """Ctrl-C or SIGTERM: close --out (synced), say how much is safe and how to resume: on rank 0
        (each replica's first rank with several), or with every_rank on every rank."""
        if self.writes:
            self.output.close()
        if not (every_rank or is_main_process() or (self.layout is not None and self.layout.leader)):
            return
        if self.output is None:
            line = f"{prefix} nothing was written (no --out)"
        else:
            mine = " by this replica" if self.layout is not None and self.layout.replicas > 1 else ""
            line = (f"{prefix} {len(self.done) + self.written} of {len(self.prompt_ids)} prompts are safely in "
                    f"{self.o.out}{mine}; re-run the same command with --resume to finish the rest")
        click.echo(line, err=True)


def console_main() -> None:
    """The `gfm-generate` command (and `python generate.py`): under torchrun, leave the process
    group on every exit path (see tp.run_cli)."""
    run_cli(main)


if __name__ == "__main__":
    console_main()
