"""What gfm-generate prints after its runs: completions, each run's statistics, --gamma auto's
choices, with --compare the speedup and the lossless check; then what became of --out, or after an
interruption what is safe in it."""
from __future__ import annotations

import sys

import click

from gpt_fast_magicdec.cost_model import decode_step_cost
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec import lossless
from gpt_fast_magicdec.timing import UNSTABLE_SPREAD, Spread
from gpt_fast_magicdec.tp import is_main_process


def echo(line: str = "", err: bool = False) -> None:
    """A line on rank 0 only (everywhere outside torchrun)."""
    if is_main_process():
        click.echo(line, err=err)


def report(result, batch, o, copy_bandwidth) -> None:
    """result: the batch.BatchResult (runs: plain first with --compare; timing: (plain, speculative)
    tok/s Spreads or None), batch: its BatchRun, o: the command's options. Under torchrun rank 0
    prints; with replicas, its own replica's share."""
    runs, final = result.runs, result.final
    tokenizer, layout = batch.engine.tokenizer, batch.layout
    if o.out is None or o.verbose:
        for i in sorted(final.completions):
            toks = final.completions[i].tokens
            shown = tokenizer.decode(toks) if tokenizer else " ".join(map(str, toks[:32])) + " ..."
            echo(f"--- [{i}] {shown}")
    if layout is not None and layout.replicas > 1:
        echo(f"== replica {layout.replica} of {layout.replicas} (TP {layout.tp_size}): "
             f"{len(final.completions)} of {len(batch.prompt_ids)} prompts")
    for run in runs:
        echo(f"== {run.name}")
        for line in run.stats.summary_lines():
            echo("   " + line)
    for line in auto_gamma_lines(final):
        echo(line)
    plain = [run for run in runs if not run.draft.enabled]
    if plain and (o.compare or o.verbose):
        echo(bandwidth_line(batch.engine, plain[0].stats, copy_bandwidth))
    if result.timing is None:
        return
    plain_tps, spec_tps = result.timing
    echo(f"== speedup over plain decoding: {spec_tps.median / plain_tps.median:.2f}x")
    if o.repeats > 1:
        echo(timing_line(plain_tps, spec_tps, o.repeats))
    if not batch.sampling.greedy:
        return
    order = sorted(final.completions)
    verdict = lossless.compare_greedy(batch.engine, [batch.prompt_ids[i] for i in order],
                                      [runs[0].completions[i].tokens for i in order],
                                      [final.completions[i].tokens for i in order])
    for line in verdict.lines:
        echo(f"   {line}")
    if not verdict.ok:
        raise UserError("greedy speculative output diverged from plain decoding where the target "
                        "has no near-tie: speculative decoding is not lossless here (a bug)")


def timing_line(plain: Spread, spec: Spread, repeats: int) -> str:
    def say(s: Spread) -> str:
        return f"{s.median:.1f} (min {s.lo:.1f}, max {s.hi:.1f})"

    unstable = plain.unstable or spec.unstable
    return (f"== tokens/s, median of {repeats} alternating runs after warm-up: plain {say(plain)}, speculative "
            f"{say(spec)}" + (f" [unstable: spread > {UNSTABLE_SPREAD:.0%}]" if unstable else ""))


def auto_gamma_lines(run) -> list[str]:
    """What --gamma auto chose: each change of gamma with the round, context and acceptance
    estimate it was decided at (gamma 0 is plain decoding: predicted speedup < 1)."""
    controller = run.controller
    if controller is None:
        return []
    history = controller.history
    changes = [h for k, h in enumerate(history) if k == 0 or h[3] != history[k - 1][3]]
    said = [f"{'plain decoding (predicted speedup < 1)' if g == 0 else f'gamma {g}'} from round {r} "
            f"(context {c}, acceptance {a:.2f})" for r, c, a, g in changes[:6]]
    more = f", then {len(changes) - 6} more changes" if len(changes) > 6 else ""
    return ["== gamma auto: " + ", ".join(said) + more]


def bandwidth_line(engine, stats, copy_bw: float) -> str:
    """Plain decoding against the memory-bandwidth roofline: bytes one step must read (weights + live
    KV, cost model) over the measured time per step, as a fraction of measured copy bandwidth."""
    context = sum(stats.prompt_tokens) / len(stats.prompt_tokens) + sum(stats.new_tokens) / len(stats.new_tokens) / 2
    tp_size = engine.tp.world_size if engine.tp else 1
    step = decode_step_cost(engine.args, stats.batch_size, int(context), 1, engine.dtype.itemsize, tp_size)
    achieved = step.bytes / (stats.decode_s / max(stats.rounds, 1))
    return (f"   memory bandwidth (plain decoding): {achieved / 1e9:.1f} GB/s achieved per rank = "
            f"{100 * achieved / copy_bw:.0f}% of measured copy bandwidth ({copy_bw / 1e9:.0f} GB/s)")


def finished(result, batch, o) -> None:
    """The lines after the report: what became of --out."""
    if batch.ids_without_piece:
        echo(f"warning: {batch.ids_without_piece} generated ids have no piece in the tokenizer (the model's "
             "embedding is larger): left out of the text, kept in completion_ids", err=True)
    if o.out is None or batch.output.direct:
        return
    if result.problem:  # every rank learnt it from rank 0: all exit together
        echo(f"error: could not rewrite {o.out} in input order ({result.problem}); every completion is in it "
             "(and in its .part files with several replicas), in the order they finished: re-run the same command "
             "with --resume (once the cause is fixed) to finish it", err=True)
        sys.exit(1)
    echo(f"wrote {o.out}")


def interrupted(batch, prefix: str, every_rank: bool = False) -> None:
    """Ctrl-C or SIGTERM: say how much is safe and how to resume, on rank 0 (each replica's first
    rank with several), or with every_rank on every rank. The output is closed already."""
    layout = batch.layout
    if every_rank or is_main_process() or (layout is not None and layout.leader):
        click.echo(f"{prefix} {batch.safe_summary()}", err=True)
