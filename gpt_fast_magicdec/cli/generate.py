"""Generate text with MagicDec speculative decoding (the default) or plain decoding.

  python generate.py --compare                                    # bundled tiny model, self-speculation
  python generate.py --checkpoint ckpt/llama-3.1-8b --prompt-file docs.jsonl --bsz 32 \\
      --draft-kv snapkv --draft-budget 512 --gamma 3 --out out.jsonl
  python generate.py --checkpoint ... --draft none                # plain decoding (or --gamma 0)
  torchrun --nproc_per_node 8 generate.py --checkpoint ... --bsz 64 --gamma 3    # tensor parallel

Under torchrun only rank 0 prints and writes --out.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import click
import torch
from click.core import ParameterSource

from gpt_fast_magicdec.cli.options import model_options, resolve_device, resolve_dtype
from gpt_fast_magicdec.config import PRESETS, ModelArgs
from gpt_fast_magicdec.cost_model import PROFILES, decode_step_cost, get_profile, measure_hardware
from gpt_fast_magicdec.data import check_writable, read_jsonl_prompts, write_jsonl
from gpt_fast_magicdec.drafting import DEFAULT_BUDGET_FRACTION, DraftConfig, budget_for_context
from gpt_fast_magicdec.engine import Engine, load_model, random_model, set_compiler_flags
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.policies import POLICIES, policy_help
from gpt_fast_magicdec.sampling import SamplingParams
from gpt_fast_magicdec.timing import UNSTABLE_SPREAD, Spread
from gpt_fast_magicdec.tiny import resolve_draft_checkpoint
from gpt_fast_magicdec.tokenizer import check_same_tokenizer, check_tokenizer_fits, load_tokenizer
from gpt_fast_magicdec.tp import (TensorParallel, env_world_size, fail_together, is_main_process,
                                  run_cli)

PLAIN = "plain decoding"
DEFAULT_PROMPT = "Once upon a time"
DRAFT_VIEW_OPTIONS = ("draft_kv", "draft_budget", "sink", "draft_window")


def read_prompts(prompt: tuple, prompt_file: Optional[Path]) -> list[str]:
    """--prompt (repeatable) and/or --prompt-file: JSONL with a `text` field, or plain text."""
    return list(prompt) + (read_jsonl_prompts(prompt_file) if prompt_file is not None else [])


def batches(items: list, size: int):
    """Fill one batch by cycling when there are fewer prompts than --bsz, else chunk them."""
    if len(items) < size:
        items = list(itertools.islice(itertools.cycle(items), size))
    for start in range(0, len(items), size):
        yield items[start:start + size]


def parse_gamma(gamma: str) -> Optional[int]:
    """--gamma N -> N, --gamma auto -> None."""
    if gamma.strip().lower() == "auto":
        return None
    try:
        return int(gamma)
    except ValueError:
        raise UserError(f"--gamma must be an integer or 'auto', got {gamma!r}") from None


def draft_kind(draft: Optional[str], draft_checkpoint, gamma: Optional[int]) -> str:
    """The draft of the run. No --draft means speculation: a standalone draft with
    --draft-checkpoint, else self-speculation. --gamma 0 is plain decoding, like --draft none."""
    if gamma == 0:
        if draft not in (None, "none") or draft_checkpoint:
            raise UserError("--gamma 0 means plain decoding, but a draft was asked for (--draft / "
                            "--draft-checkpoint): drop one of them")
        return "none"
    if draft is None:
        return "model" if draft_checkpoint else "self"
    if draft == "model" and not draft_checkpoint:
        raise UserError("--draft model needs --draft-checkpoint DIR")
    if draft_checkpoint and draft != "model":
        raise UserError(f"--draft-checkpoint was given but --draft is {draft!r}: drop one of them")
    return draft


def build_draft_config(draft, draft_checkpoint, draft_kv, draft_budget, sink, draft_window, gamma) -> DraftConfig:
    gamma_value = parse_gamma(gamma)
    kind = draft_kind(draft, draft_checkpoint, gamma_value)
    return DraftConfig(kind=kind, kv=draft_kv, budget=draft_budget, sink=sink, window=draft_window,
                       gamma=3 if gamma_value is None else gamma_value)


def ignored_options(explicit: set, cfg: DraftConfig, sampling: SamplingParams, random_weights, gamma_auto: bool,
                    hardware_given: bool) -> list[str]:
    """One notice per option given explicitly that the chosen mode does not use. (Contradictions
    are errors elsewhere; these are harmless but must not pass silently.)"""
    def flag(name):
        return "--" + name.replace("_", "-")

    unused = []
    if not cfg.enabled:
        unused += [(o, "with plain decoding") for o in DRAFT_VIEW_OPTIONS if o in explicit]
        if "gamma" in explicit and cfg.gamma != 0:
            unused.append(("gamma", "with --draft none"))
    elif cfg.full:  # chosen by --draft-kv full, or by its older spelling --draft-budget -1
        chosen_by = ("draft_budget", "--draft-budget -1") if cfg.budget == -1 else ("draft_kv", "--draft-kv full")
        unused += [(o, f"with {chosen_by[1]} (full cache)") for o in ("draft_kv", "draft_budget", "sink", "draft_window")
                   if o in explicit and o != chosen_by[0]]
    elif cfg.kv != "streaming" and "sink" in explicit:
        unused.append(("sink", f"with --draft-kv {cfg.kv} (--sink is the streaming view's)"))
    if sampling.greedy:
        unused += [(o, "with greedy decoding (--temperature 0)") for o in ("top_p", "top_k") if o in explicit]
    if "prompt_length" in explicit and not random_weights:
        unused.append(("prompt_length", "without --random-weights (prompts are text)"))
    if hardware_given and not gamma_auto:
        unused.append(("hardware", "without --gamma auto"))
    return [f"notice: {flag(o)} is ignored {why}" for o, why in unused]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint directory (convert/convert_hf_checkpoint.py). Default: the bundled "
                   "tiny model, converted on first use.")
@click.option("--random-weights", type=click.Choice(sorted(PRESETS)), default=None,
              help="Run a preset shape with random weights instead of a checkpoint (benchmarks): the text is noise.")
@click.option("--prompt", multiple=True, help=f"A prompt; repeat for several. Default: {DEFAULT_PROMPT!r}.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 prompts: JSONL (the first line a JSON object; a 'text' field per line), or else the "
                   "whole file is one plain-text prompt. Decided by the content, not the file name.")
@click.option("--prompt-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --random-weights: length of the random-token prompts.")
@click.option("--bsz", type=int, default=1, show_default=True,
              help="Batch size. Fewer prompts are cycled to fill the batch; more are run in batches of this size.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Token limit per sequence.")
@click.option("--ignore-eos", is_flag=True,
              help="Do not stop at EOS: every sequence gets exactly --max-new-tokens (benchmarks, lossless checks).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--top-k", type=int, default=None, help="Keep only the k most likely tokens (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (sampling, random weights).")
@model_options
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None,
              help="Longest prompt + new tokens allowed. Default: the model's max_position_embeddings.")
@click.option("--draft", type=click.Choice(["none", "self", "model"]), default=None,
              help="self: self-speculation, the draft reads a sparse slice of the target's own cache; model: a "
                   "standalone draft (--draft-checkpoint); none: plain decoding (as --gamma 0). Default: model "
                   "with --draft-checkpoint, else self (StreamingLLM view, budget 512, sink 16, gamma 3).")
@click.option("--draft-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint of a standalone draft model sharing the target's tokenizer; "
                   "'bundled-draft' names the bundled tiny draft model (~1.2M parameters, the bundled "
                   "target's tokenizer), converted on first use.")
@click.option("--draft-kv", type=click.Choice(list(POLICIES)), default="streaming", show_default=True,
              help="KV selection policy: which keys the draft reads besides its sliding window. "
                   + policy_help() + ".")
@click.option("--draft-budget", type=int, default=512, show_default=True,
              help="Keys the draft reads per query (selected + window); -1 = full cache (standalone draft only). "
                   f"When not given (nor --draft-window), each batch clips it to 1/{DEFAULT_BUDGET_FRACTION} of its "
                   "shortest prompt, so the draft stays a small slice of a short context.")
@click.option("--sink", type=int, default=16, show_default=True, help="Streaming view: attention-sink positions.")
@click.option("--draft-window", type=int, default=None,
              help="Sliding window of the draft. Default: budget - sink (streaming), budget / 4 (snapkv).")
@click.option("--gamma", default="3", show_default=True,
              help="Draft tokens per round; 0 = plain decoding; 'auto' picks it (or plain decoding) from the cost "
                   "model and the running acceptance rate, and prints what it chose.")
@click.option("--hardware", type=click.Choice(["measure", *PROFILES], case_sensitive=False), default="measure",
              show_default=True,
              help="--gamma auto's hardware profile: a preset (repeatable choices) or 'measure' (measured at start).")
@click.option("--draft-ranks", default=None,
              help="Tensor parallel only: comma-separated ranks that hold the standalone draft (e.g. 0,1,2,3).")
@click.option("--compare", is_flag=True,
              help="Run plain decoding and the chosen speculative decoding on the same prompts; print the speedup.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --compare: warm both up once, then run plain and speculative decoding alternately this "
                   "many times each; the speedup is the ratio of median tokens/s, printed with the spread.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one JSON line per prompt: prompt, completion, token counts, finish reason.")
@click.option("--simulate-acceptance", type=float, default=None, hidden=True,
              help="bench.py only; refused here.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on long prefill.")
@click.option("--verbose", is_flag=True,
              help="Also print the memory-bandwidth line of plain decoding (it measures the machine: slow).")
def main(**opts):
    """Generate from a Llama-family model with MagicDec speculative decoding.

    By default the model drafts for itself: gamma 3 tokens per round from a StreamingLLM view of its
    own KV cache (16 sink + the most recent keys, 512 in all, or 1/4 of a shorter prompt), verified
    in one pass of the full model; the output is the model's own (lossless). --draft-checkpoint uses a
    standalone draft model; --draft none or --gamma 0 decodes plainly.

    Prints the completions and a summary: prefill time, decode tokens/s, per-sequence latency,
    peak memory, and for speculative runs acceptance, tokens per round and the time split."""
    warnings.showwarning = _one_line_warning
    ctx = click.get_current_context()
    explicit = {name for name in opts if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    try:
        run(explicit=explicit, **opts)
    except UserError as err:
        echo(f"error: {err}", err=True)  # under torchrun every rank raises the same error; rank 0 says it
        sys.exit(1)


def echo(*args, **kwargs) -> None:
    """click.echo on rank 0 only (everywhere outside torchrun)."""
    if is_main_process():
        click.echo(*args, **kwargs)


def _one_line_warning(message, *args, **kwargs):
    echo(f"warning: {message}", err=True)


@dataclasses.dataclass
class Job:
    """Everything one generation pass over all prompts needs; `run(cfg)` is that pass."""

    engine: Engine
    prompt_ids: list  # token-id lists, ragged
    bsz: int
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: tuple
    prefill_chunk: int
    max_seq_len: Optional[int]
    progress: bool
    clip_budget: bool  # clip the draft budget per batch (the user chose neither budget nor window)
    auto_gamma: Optional[Callable[[DraftConfig], object]] = None  # batch config -> AutoGamma

    def run(self, cfg: DraftConfig) -> list:
        """-> [(prompt indices, GenerationResult, the batch's draft config, its AutoGamma or None)]"""
        results = []
        for batch in batches(list(range(len(self.prompt_ids))), self.bsz):
            ids = [self.prompt_ids[i] for i in batch]
            batch_cfg = budget_for_context(cfg, min(map(len, ids))) if self.clip_budget else cfg
            controller = self.auto_gamma(batch_cfg) if self.auto_gamma is not None and cfg.enabled else None
            res = self.engine.generate(ids, self.max_new_tokens, self.sampling, batch_cfg, self.stop_ids,
                                       self.prefill_chunk, self.max_seq_len, self.progress,
                                       gamma_controller=controller)
            results.append((batch, res, batch_cfg, controller))
        return results


def run(checkpoint, random_weights, prompt, prompt_file, prompt_length, bsz, max_new_tokens, ignore_eos, temperature,
        top_p, top_k, seed, device, dtype, compile, attention, prefill_chunk, max_seq_len, draft, draft_checkpoint,
        draft_kv, draft_budget, sink, draft_window, gamma, hardware, draft_ranks, compare, repeats, out,
        simulate_acceptance, progress, verbose, explicit=frozenset()):
    """The CLI's stages: check every option, start TP, load, tokenize, generate, report."""
    draft_cfg, sampling, gamma_auto = check_options(
        simulate_acceptance, bsz, prefill_chunk, checkpoint, random_weights, draft, draft_checkpoint, draft_kv,
        draft_budget, sink, draft_window, gamma, temperature, top_k, top_p, compare, draft_ranks, explicit)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if out is not None:
        check_writable(out)  # now, not after the whole generation has run
    texts = read_prompts(prompt, prompt_file)
    if random_weights and texts:
        raise UserError("--random-weights has no tokenizer: use --prompt-length instead of prompt text")

    tp = TensorParallel.start(device, draft_ranks)  # tensor parallel under torchrun (None otherwise)
    if tp is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    torch.manual_seed(seed)  # the same seed on every rank: sampling stays in lock-step (see tp.py)
    if device.type == "cuda":
        set_compiler_flags()
    with fail_together(tp):  # one rank failing to load makes every rank fail with its message
        draft_checkpoint = resolve_draft_checkpoint(draft_checkpoint)  # 'bundled-draft' -> its directory
        engine, tokenizer, target_args = load_engine(checkpoint, random_weights, draft_cfg, draft_checkpoint,
                                                     device, dtype, attention, compile, seed, tp)
    prompt_ids = tokenize(tokenizer, texts, engine.model.args.vocab_size, prompt_length, bsz, seed)
    job = Job(engine, prompt_ids, bsz, max_new_tokens, sampling,
              () if ignore_eos or tokenizer is None else tokenizer.eos_ids, prefill_chunk, max_seq_len,
              progress and is_main_process(), clip_budget=not explicit & {"draft_budget", "draft_window"})
    if gamma_auto:
        job.auto_gamma = auto_gamma_factory(hardware, device, tp, target_args, draft_cfg, draft_checkpoint, dtype)

    runs, timing = [], None
    if compare:
        plain, final, timing = paired_runs(job.run, draft_cfg, repeats)
        runs.append((PLAIN, plain))
    else:
        final = job.run(draft_cfg)
    runs.append((describe_run(final), final))
    report(runs, timing, repeats, job, tokenizer, engine)
    plain = [results for name, results in runs if name == PLAIN]
    if plain and (compare or verbose) and is_main_process():
        echo(bandwidth_line(target_args, plain[0], dtype, tp.world_size if tp else 1, device))
    if out is not None and is_main_process():
        write_jsonl(out, completion_rows(texts, prompt_ids, final, tokenizer, job.stop_ids))
        echo(f"wrote {out}")


def check_options(simulate_acceptance, bsz, prefill_chunk, checkpoint, random_weights, draft, draft_checkpoint,
                  draft_kv, draft_budget, sink, draft_window, gamma, temperature, top_k, top_p, compare, draft_ranks,
                  explicit) -> tuple[DraftConfig, SamplingParams, bool]:
    """Every check that needs no model. They run before TensorParallel.start, on every rank and with
    no collective, so a bad flag fails everywhere instead of hanging, and before loading anything."""
    if simulate_acceptance is not None:
        raise UserError("--simulate-acceptance is a benchmark-only mode (bench.py): generate.py never fakes acceptance")
    if bsz < 1 or prefill_chunk < 1:
        raise UserError("--bsz and --prefill-chunk must be >= 1")
    if checkpoint is not None and random_weights is not None:
        raise UserError("give either --checkpoint or --random-weights, not both")
    draft_cfg = build_draft_config(draft, draft_checkpoint, draft_kv, draft_budget, sink, draft_window, gamma)
    gamma_auto = draft_cfg.enabled and parse_gamma(gamma) is None
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for line in ignored_options(explicit, draft_cfg, sampling, random_weights, gamma_auto, "hardware" in explicit):
        echo(line, err=True)
    if compare and not draft_cfg.enabled:
        raise UserError("--compare runs plain decoding against speculation: drop --draft none / --gamma 0")
    if draft_ranks is not None and env_world_size() == 1:
        raise UserError("--draft-ranks needs tensor parallelism: launch with torchrun --nproc_per_node N")
    if draft_ranks is not None and draft_cfg.kind != "model":
        raise UserError("--draft-ranks places a standalone draft (--draft-checkpoint); it does not apply to "
                        f"--draft {draft_cfg.kind}")
    return draft_cfg, sampling, gamma_auto


def load_engine(checkpoint, random_weights, draft_cfg: DraftConfig, draft_checkpoint, device, dtype, attention,
                compile, seed: int, tp) -> tuple[Engine, Optional[object], ModelArgs]:
    """-> (Engine, tokenizer or None for random weights, the target's full (unsharded) ModelArgs).
    Under TP each rank loads its own shard (and the draft only where --draft-ranks puts it)."""
    tokenizer = None
    if random_weights:
        echo(f"random weights ({random_weights}): the generated text is noise; use this for speed only")
        target_args = ModelArgs.from_preset(random_weights)
        model = (tp.random_model(target_args, device, dtype, seed) if tp
                 else random_model(target_args, device, dtype, seed))
    else:
        if checkpoint is None:
            from gpt_fast_magicdec.tiny import bundled_checkpoint

            checkpoint = bundled_checkpoint()
        target_args = ModelArgs.load(checkpoint)  # the full shape (model.args is this rank's shard)
        tokenizer = load_tokenizer(checkpoint)
        check_tokenizer_fits(tokenizer, target_args.vocab_size, checkpoint)
        model = tp.load_model(checkpoint, device, dtype) if tp else load_model(checkpoint, device, dtype)
    draft_model = None
    if draft_cfg.kind == "model":
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(draft_checkpoint), draft_checkpoint)
        if tp is None:
            draft_model = load_model(draft_checkpoint, device, dtype)
        elif tp.holds_draft:
            draft_model = tp.load_model(draft_checkpoint, device, dtype, draft=True)
    return Engine(model, draft_model=draft_model, attention=attention, compile=compile, tp=tp), tokenizer, target_args


def tokenize(tokenizer, texts: list, vocab_size: int, prompt_length: int, bsz: int, seed: int) -> list:
    """Prompt token ids: the texts encoded, or (random weights, no tokenizer) bsz random prompts."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(vocab_size, (prompt_length,), generator=gen).tolist() for _ in range(bsz)]
    return [tokenizer.encode(t) for t in texts or [DEFAULT_PROMPT]]


def auto_gamma_factory(hardware: str, device, tp, target_args: ModelArgs, draft_cfg: DraftConfig, draft_checkpoint,
                       dtype) -> Callable[[DraftConfig], object]:
    """--gamma auto: batch draft config -> a fresh AutoGamma over the full (unsharded) shapes. Under
    TP every rank uses rank 0's hardware profile, so all ranks pick the same gamma every round."""
    from gpt_fast_magicdec.autogamma import AutoGamma

    hw = get_profile(hardware, device)  # every rank calls it: measuring may run a collective
    hw = tp.broadcast_object(hw) if tp else hw
    draft_args = ModelArgs.load(draft_checkpoint) if draft_cfg.kind == "model" else None
    world = tp.world_size if tp else 1

    def for_batch(batch_cfg: DraftConfig) -> AutoGamma:  # the batch's own (possibly clipped) budget
        return AutoGamma(target_args, hw, batch_cfg, dtype.itemsize, world, draft_args)

    return for_batch


def report(runs: list, timing, repeats: int, job: Job, tokenizer, engine: Engine) -> None:
    """Completions, each run's statistics, --gamma auto's choices and, with --compare, the speedup
    and the lossless check (identical, or the first divergence and whether it is a near-tie)."""
    final = runs[-1][1]
    for batch, res, _, _ in final:
        for i, toks in zip(batch, res.tokens):
            shown = tokenizer.decode(toks) if tokenizer else " ".join(map(str, toks[:32])) + " ..."
            echo(f"--- [{i}] {shown}")
    for name, results in runs:
        echo(f"== {name}")
        for _, res, _, _ in results:
            for line in res.stats.summary_lines():
                echo("   " + line)
    for line in auto_gamma_lines(final):
        echo(line)
    if timing is None:
        return
    plain_tps, spec_tps = timing
    echo(f"== speedup over plain decoding: {spec_tps.median / plain_tps.median:.2f}x")
    if repeats > 1:
        echo(timing_line(plain_tps, spec_tps, repeats))
    if not job.sampling.greedy:
        return
    from gpt_fast_magicdec.lossless import compare_greedy

    report = compare_greedy(engine.model, [job.prompt_ids[i] for batch, _, _, _ in final for i in batch],
                            [t for _, res, _, _ in runs[0][1] for t in res.tokens],
                            [t for _, res, _, _ in final for t in res.tokens])
    for line in report.lines:
        echo(f"   {line}")
    if not report.ok:
        raise UserError("greedy speculative output diverged from plain decoding where the target "
                        "has no near-tie: speculative decoding is not lossless here (a bug)")


def tokens_per_s(results) -> float:
    """Decode tokens/s of one generate_all run, averaged over its batches."""
    return sum(res.stats.tokens_per_s for _, res, _, _ in results) / len(results)


def paired_runs(generate_all, draft_cfg: DraftConfig, repeats: int):
    """--compare: -> (plain results, speculative results, (plain tok/s Spread, speculative tok/s Spread)).

    repeats 1: one run of each, plain first. repeats N > 1 (issue 14: whichever mode runs first pays
    for first-seen shapes): one untimed warm-up of each, then N alternating pairs; the results shown
    are each mode's median run."""
    plain_cfg = DraftConfig(kind="none")
    if repeats > 1:
        generate_all(plain_cfg)
        generate_all(draft_cfg)
    pairs = [(generate_all(plain_cfg), generate_all(draft_cfg)) for _ in range(repeats)]
    shown, spreads = [], []
    for mode in (0, 1):
        results = sorted((pair[mode] for pair in pairs), key=tokens_per_s)
        shown.append(results[(len(results) - 1) // 2])
        spreads.append(Spread.of([tokens_per_s(r) for r in results]))
    return shown[0], shown[1], tuple(spreads)


def timing_line(plain: Spread, spec: Spread, repeats: int) -> str:
    def say(s: Spread) -> str:
        return f"{s.median:.1f} (min {s.lo:.1f}, max {s.hi:.1f})"

    unstable = plain.unstable or spec.unstable
    return (f"== tokens/s, median of {repeats} alternating runs after warm-up: plain {say(plain)}, speculative "
            f"{say(spec)}" + (f" [unstable: spread > {UNSTABLE_SPREAD:.0%}]" if unstable else ""))


def describe_run(results) -> str:
    """The run's name in the summary: its draft, per batch when the budget was clipped per batch."""
    configs = list(dict.fromkeys(cfg.describe() for _, _, cfg, _ in results))
    if not results[0][2].enabled:
        return PLAIN
    return "draft: " + "; ".join(configs) + (" (gamma auto)" if results[0][3] is not None else "")


def auto_gamma_lines(results) -> list[str]:
    """What --gamma auto chose, per batch: each change of gamma with the round, context and
    acceptance estimate it was decided at (gamma 0 is plain decoding: predicted speedup < 1)."""
    lines = []
    for batch, _, _, controller in results:
        if controller is None:
            continue
        changes = [h for k, h in enumerate(controller.history) if k == 0 or h[3] != controller.history[k - 1][3]]
        said = [f"{'plain decoding (predicted speedup < 1)' if g == 0 else f'gamma {g}'} from round {r} "
                f"(context {c}, acceptance {a:.2f})" for r, c, a, g in changes[:6]]
        more = f", then {len(changes) - 6} more changes" if len(changes) > 6 else ""
        lines.append(f"== gamma auto, prompts {batch[0]}..{batch[-1]}: " + ", ".join(said) + more)
    return lines


def completion_rows(texts, prompt_ids, results, tokenizer, eos_ids):
    for batch, res, _, _ in results:
        for i, toks in zip(batch, res.tokens):
            yield {"prompt": texts[i] if texts else None,
                   "completion": tokenizer.decode(toks) if tokenizer else None,
                   "completion_ids": toks, "prompt_tokens": len(prompt_ids[i]), "new_tokens": len(toks),
                   "finish_reason": "eos" if toks and toks[-1] in eos_ids else "length"}


def bandwidth_line(args: ModelArgs, results, dtype: torch.dtype, tp_size: int, device: torch.device) -> str:
    """Plain decoding against the memory-bandwidth roofline: bytes one step must read (weights + live
    KV, cost model) over the measured time per step, as a fraction of measured copy bandwidth."""
    achieved = []
    for _, res, _, _ in results:
        st = res.stats
        context = sum(st.prompt_tokens) / st.batch_size + sum(st.new_tokens) / st.batch_size / 2
        step = decode_step_cost(args, st.batch_size, int(context), 1, dtype.itemsize, tp_size)
        achieved.append(step.bytes / (st.decode_s / max(st.rounds, 1)))
    copy_bw = measure_hardware(device).mem_bandwidth
    mean = sum(achieved) / len(achieved)
    return (f"   memory bandwidth (plain decoding): {mean / 1e9:.1f} GB/s achieved per rank = "
            f"{100 * mean / copy_bw:.0f}% of measured copy bandwidth ({copy_bw / 1e9:.0f} GB/s)")


def console_main() -> None:
    """The `gfm-generate` command (and `python generate.py`): under torchrun, leave the process
    group on every exit path (see tp.run_cli)."""
    run_cli(main)


if __name__ == "__main__":
    console_main()
