"""bench.py --job: a ragged batch job, static batches against in-flight refill.

Prompts of ragged lengths, each with its own token limit, run through a fixed number of slots:
  static  a batch of `slots` prompts runs until its longest sequence ends, then the next batch
  refill  a slot takes the next prompt as soon as its sequence stops (job.py)
for plain decoding and one speculative draft. Per run it reports slot utilisation (the share of
slot-rounds that ran a sequence: generated tokens / (slots x rounds) for plain decoding), rounds,
target passes per generated token (decode rounds of the whole slot batch, prefill apart), wall time
and tokens/s; and what the difference in rounds is
worth where refill matters, a GPU at long context: every round of a slot-batch costs one
verification (and gamma draft steps) of all slots, so the cost model's step times for a preset
model and context, times the rounds each mode needed, predict the decode time of the same job there.
"""
from __future__ import annotations

import random
import time
from typing import Optional

from ..cost_model import PROFILES, predict_times
from ..config import ModelArgs
from ..data import long_document_prompts
from ..drafting import DraftConfig
from .report import sig


def ragged_prompts(path, tokenizer, n: int, lengths: tuple[int, int], limits: tuple[int, int],
                   seed: int) -> tuple[list, list]:
    """n prompts cut from the documents of `path`, each of a length drawn uniformly from `lengths`
    (inclusive), and a token limit per prompt drawn from `limits` -> (prompts, limits)."""
    rng = random.Random(seed)
    windows = long_document_prompts(path, tokenizer, n, lengths[1], seed)
    prompts = [w[:rng.randint(*lengths)] for w in windows]
    return prompts, [rng.randint(*limits) for _ in prompts]


def run_mode(engine, prompts: list, limits: list, slots: int, draft: DraftConfig, eos_ids, refill: bool,
             prefill_chunk: int) -> dict:
    """One job; its measured figures."""
    job = engine.stream(prompts, limits, slots=slots, draft=draft, eos_ids=eos_ids, refill=refill,
                        prefill_chunk=prefill_chunk)
    start = engine.sync_time()
    completions = list(job)
    wall = engine.sync_time() - start
    st = job.stats
    generated = sum(len(c.tokens) for c in completions)
    return dict(mode="refill" if refill else "static", draft=draft.describe(), gamma=st.gamma, slots=slots,
                prompts=len(completions), generated=generated, stopped_at_eos=sum(c.finish_reason == "eos"
                                                                                   for c in completions),
                rounds=st.rounds, slot_utilisation=sig(st.slot_utilisation, 3),
                tokens_per_slot_round=sig(generated / max(slots * st.rounds, 1), 3),
                target_passes_per_token=sig(st.rounds / generated, 3),  # decode passes of the slot batch
                acceptance=sig(st.acceptance_rate, 3) if st.acceptance_rate is not None else None,
                tokens_per_round=sig(st.mean_accepted_per_round, 3) if st.mean_accepted_per_round else None,
                prefill_s=sig(st.prefill_s), decode_s=sig(st.decode_s), wall_s=sig(wall),
                tokens_per_s=sig(generated / wall), refills=st.refills)


def predicted_on(row: dict, model: str, hardware: str, context: int, budget: int) -> dict:
    """The same job's decode rounds priced with the cost model's step times for `model` on `hardware`
    at `context`: rounds x (T_V + gamma T_D) for speculation, rounds x T_T for plain decoding."""
    args, hw = ModelArgs.from_preset(model), PROFILES[hardware]
    gamma = row["gamma"]
    times = predict_times(args, hw, row["slots"], context, max(gamma, 1), budget)
    per_round = times.T_T if gamma == 0 else times.T_V + gamma * times.T_D
    return dict(predicted_decode_s=sig(row["rounds"] * per_round), predicted_round_ms=sig(1e3 * per_round))


def job_benchmark(engine, tokenizer, prompts_file, n: int, lengths: tuple[int, int], limits: tuple[int, int],
                  slots: int, draft: DraftConfig, seed: int, prefill_chunk: int, predict_model: str = "llama-3.1-8b",
                  predict_hardware: str = "H200", predict_context: int = 16384,
                  echo=print) -> dict:
    """Static vs refill, plain and `draft`, on one ragged job -> {"rows": [...], "prompts": {...}}."""
    prompts, token_limits = ragged_prompts(prompts_file, tokenizer, n, lengths, limits, seed)
    rows = []
    for cfg in (DraftConfig(kind="none"), draft):
        for refill in (False, True):
            t0 = time.perf_counter()
            row = run_mode(engine, prompts, token_limits, slots, cfg, tokenizer.eos_ids, refill, prefill_chunk)
            row.update(predicted_on(row, predict_model, predict_hardware, predict_context,
                                    draft.budget if draft.reads_cache else 512))
            rows.append(row)
            echo(f"{row['mode']:>6} {row['draft']}: utilisation {row['slot_utilisation']}, {row['rounds']} rounds, "
                 f"wall {row['wall_s']} s ({time.perf_counter() - t0:.0f} s with setup)")
    return dict(rows=rows, prompts=dict(n=n, lengths=list(lengths), limits=list(limits),
                                        prompt_tokens=sum(map(len, prompts)), seed=seed),
                prediction=dict(model=predict_model, hardware=predict_hardware, context=predict_context))


COLUMNS = [("mode", "mode"), ("draft", "draft"), ("slot_utilisation", "slot utilisation"), ("rounds", "rounds"),
           ("target_passes_per_token", "target passes / token"), ("tokens_per_slot_round", "tokens / slot-round"),
           ("acceptance", "acceptance"), ("tokens_per_round", "tokens / round"), ("refills", "refills"),
           ("stopped_at_eos", "EOS stops"), ("prefill_s", "prefill s"), ("decode_s", "decode s"),
           ("wall_s", "wall s"), ("tokens_per_s", "tok/s"), ("predicted_decode_s", "pred. decode s")]


def markdown(meta: dict, result: dict) -> str:
    p, pred = result["prompts"], result["prediction"]
    lines = ["# bench --job: static batches vs in-flight refill", ""]
    lines += [f"- {key}: `{meta[key]}`" for key in ("command", "git_commit", "device_name", "torch_version", "date",
                                                     "model", "dtype")]
    lines += [f"- job: {p['n']} prompts of {p['lengths'][0]}-{p['lengths'][1]} tokens ({p['prompt_tokens']} in all), "
              f"token limits {p['limits'][0]}-{p['limits'][1]} drawn per prompt, real EOS, seed {p['seed']}",
              f"- pred. decode s: the rounds each run needed, priced with the cost model's step times for "
              f"{pred['model']} on {pred['hardware']} at {pred['context']} tokens of context, same slots", ""]
    lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in result["rows"]:
        lines.append("| " + " | ".join("–" if row.get(k) is None else str(row[k]) for k, _ in COLUMNS) + " |")
    by = {(r["mode"], r["gamma"] > 0): r for r in result["rows"]}
    lines.append("")
    for spec in (False, True):
        static, refill = by[("static", spec)], by[("refill", spec)]
        lines.append(f"- {'speculative' if spec else 'plain'}: refill needs {refill['rounds']} rounds where static "
                     f"batches need {static['rounds']} ({static['rounds'] / refill['rounds']:.2f}x), CPU wall time "
                     f"{refill['wall_s']} s vs {static['wall_s']} s; predicted decode on {pred['hardware']}: "
                     f"{refill['predicted_decode_s']} s vs {static['predicted_decode_s']} s")
    return "\n".join(lines) + "\n"


def parse_range(values: Optional[list], name: str) -> tuple[int, int]:
    from ..errors import UserError

    if not values or len(values) > 2:
        raise UserError(f"{name} takes one value or two (a range MIN,MAX)")
    return (values[0], values[-1]) if values[0] <= values[-1] else (values[-1], values[0])
