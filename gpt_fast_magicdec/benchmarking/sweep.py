"""bench.py's sweep: plain decoding against every speculative configuration, with paired timing.

Timing each configuration once, in a fixed order, lets one-time costs of first-seen shapes and
the drift of a shared machine decide the ratios (seen: plain decoding 79 ms per round in one run,
1.2 ms in the next; verification cheaper than one decode step). So at every (batch, prompt
length) point:

1. every configuration, the baseline included, is warmed up at the timed shapes (untimed);
2. the timed runs interleave: A B A C A ... per repeat (A = baseline), so every speculative run
   sits between two baseline runs, its *paired* baselines, and slow drift cancels in the ratio;
3. each row reports the median over its runs and the spread (min..max); ratios (speedup, T_V/T_T,
   T_D/T_T) come from the medians of a configuration's runs and of its paired baseline runs;
4. rows whose spread exceeds 10 %, or whose times are physically implausible (verifying gamma + 1
   tokens cheaper than decoding one; a self-draft over a budget smaller than the context slower
   than a target step), carry a flag instead of passing silently.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..cost_model import (
    HardwareProfile, alpha_from_tokens_per_round, decode_step_cost, expected_tokens, predict_times, predicted_speedup,
)
from ..drafting import DraftConfig
from ..engine import Engine
from ..stats import GenerationStats
from ..policies import POLICIES, SPARSE_POLICIES
from ..errors import UserError
from ..profiling import profile_rounds as profile_round_counts
from ..timing import Spread
from .report import sig

# --drafts names -> (DraftConfig.kind, DraftConfig.kv), read from the drafter and policy registries:
# "<model drafter>-<policy>" (a self-draft reads any sparse policy, a standalone draft any policy:
# full is classic speculative decoding), "lookup" (no model), and lookup chained in front of each.
_MODEL_DRAFTS = {f"self-{kv}": ("self", kv) for kv in SPARSE_POLICIES} | {f"model-{kv}": ("model", kv) for kv in POLICIES}
DRAFTS = _MODEL_DRAFTS | {"lookup": ("lookup", "streaming")} | {
    f"lookup+{name}": (f"lookup+{kind}", kv) for name, (kind, kv) in _MODEL_DRAFTS.items()}
WARMUP_TOKENS = 4  # new tokens of a warm-up run: enough for a few full rounds of every captured step


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
        return self.draft.budget if self.draft.reads_cache else None


BASELINE = Config("baseline", DraftConfig(kind="none"))


def build_configs(drafts: list[str], gammas: list[int], budgets: list[int], sink: int) -> list[Config]:
    """Every speculative configuration of the sweep; DraftConfig validates each one up front."""
    configs = []
    for name in drafts:
        kind, kv = DRAFTS[name]
        no_budget = POLICIES[kv].full or kind == "lookup"  # a full view (or no view) has no budget to sweep
        for budget in [-1 if POLICIES[kv].full else budgets[0]] if no_budget else budgets:
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


# ---- paired, interleaved runs -------------------------------------------------------------------------
def interleaved(n_configs: int, repeats: int) -> list[int]:
    """The timed order as indices into [BASELINE] + configs: A B A C A ... per repeat (A = 0), so
    every speculative run has a baseline run on each side (shared with its neighbour) and n
    configurations cost n + 1 baseline runs per repeat."""
    order = []
    for _ in range(repeats):
        for i in range(1, n_configs + 1):
            order += [0, i]
    return order + [0]


@dataclasses.dataclass
class PointRuns:
    """The timed runs at one (batch, prompt length), indexed like [BASELINE] + configs."""
    runs: list  # [[GenerationStats]]: each configuration's runs
    paired: list  # [[GenerationStats]]: the baseline runs next to them (the baseline's: all of its own)
    warmups: list  # [[GenerationStats]]: each configuration's untimed warm-up runs


def run_point(engine: Engine, prompts: list, max_new: int, configs: list[Config], warmup: int, repeats: int,
              alpha: Optional[float], seed: int, prefill_chunk: int, progress: Callable[[Config], None]
              ) -> PointRuns:
    """Warm up the baseline and every configuration, then run them interleaved (see `interleaved`).

    Warm-up prompts are longer by max_new - WARMUP_TOKENS, so a warm-up allocates the same cache
    and captures the same graphs as the timed runs while decoding only a few tokens."""
    def run(cfg: Config, batch: list, n_new: int) -> GenerationStats:
        override = None
        if alpha is not None and cfg.draft.enabled:  # reseeded per run: every repeat accepts alike
            override = simulated_acceptance(alpha, cfg.draft.gamma, engine.device, seed)
        stats = engine.generate(batch, n_new, draft=cfg.draft, prefill_chunk=prefill_chunk,
                                accept_override=override).stats
        if override is not None:
            stats.simulated_acceptance = alpha
        return stats

    everything = [BASELINE] + configs
    few = min(WARMUP_TOKENS, max_new)
    warm_prompts = [_lengthen(p, len(p) + max_new - few) for p in prompts]
    warmups = [[run(cfg, warm_prompts, few) for _ in range(warmup)] for cfg in everything]
    order = interleaved(len(configs), repeats)
    results = []
    for i in order:
        results.append(run(everything[i], prompts, max_new))
        progress(everything[i])
    runs = [[] for _ in everything]
    paired = [[] for _ in everything]
    for k, i in enumerate(order):
        runs[i].append(results[k])
        if i:
            paired[i] += [results[k - 1], results[k + 1]]
    paired[0] = runs[0]
    return PointRuns(runs, paired, warmups)


def _lengthen(prompt: list, length: int) -> list:
    return (prompt * (length // len(prompt) + 1))[:length]


# ---- one result row ------------------------------------------------------------------------------------
def per_round(stats: GenerationStats, phase: Optional[str] = None) -> float:
    """Seconds per round of the whole decode (phase None) or of one timed phase."""
    total = stats.decode_s if phase is None else stats.phase_s.get(phase, 0.0)
    return total / max(stats.rounds, 1)


def sanity_flags(cfg: Config, prompt_len: int, tps: Spread, base_tps: Spread, T_T: float,
                 T_V: Optional[float], T_D: Optional[float]) -> Optional[str]:
    """What makes a row suspect, or None: repeats that disagree by more than 10 %, and two
    physically impossible orderings of step times."""
    flags = []
    if tps.unstable or base_tps.unstable:
        flags.append(f"unstable (spread {max(tps.relative, base_tps.relative):.0%})")
    if T_V is not None and T_V < T_T:  # verifying gamma + 1 tokens reads at least what one decode step does
        flags.append("T_V<T_T")
    if T_D is not None and cfg.draft.kind == "self" and cfg.draft.budget < prompt_len and T_D > T_T:
        flags.append("T_D>T_T")  # a self-draft reads fewer keys than the target step it shortens
    return "; ".join(flags) or None


def make_row(cfg: Config, batch: int, prompt_len: int, max_new: int, runs: list, base_runs: list, args,
             draft_args, hw: HardwareProfile, dtype_bytes: int, alpha_sim: Optional[float],
             warmups: tuple = ()) -> dict:
    """One table row from a configuration's runs and its paired baseline runs (medians).
    Predictions use the mean context of the decode: prompt + max_new / 2. capture_s: compile + CUDA-graph
    capture over all of the configuration's runs at this point, warm-ups (`warmups`) included."""
    context = prompt_len + max_new // 2
    tps = Spread.of([s.tokens_per_s for s in runs])
    base_tps = Spread.of([s.tokens_per_s for s in base_runs])
    T_T = Spread.of([per_round(s) for s in base_runs]).median
    median_run = sorted(runs, key=lambda s: s.decode_s)[(len(runs) - 1) // 2]  # counts and acceptance
    row = dict(batch=batch, prompt_len=prompt_len, draft=cfg.draft_name, gamma=cfg.gamma, budget=cfg.budget,
               tokens_per_s=sig(tps.median), tokens_per_s_min=sig(tps.lo), tokens_per_s_max=sig(tps.hi),
               spread=sig(tps.relative, 2), timed_runs=len(runs),
               ms_per_token=sig(1e3 * batch / tps.median),
               speedup=sig(tps.median / base_tps.median), T_T_ms=sig(1e3 * T_T))
    T_V = T_D = None
    if not cfg.draft.enabled:
        bandwidth = decode_step_cost(args, batch, context, 1, dtype_bytes).bytes / T_T
        row.update(rounds=median_run.rounds, bandwidth_GBps=sig(bandwidth / 1e9),
                   bandwidth_frac=sig(bandwidth / hw.mem_bandwidth, 3))
    else:
        gamma = cfg.draft.gamma
        T_V = Spread.of([per_round(s, "verify") for s in runs]).median
        T_D = Spread.of([per_round(s, "draft") for s in runs]).median / gamma
        T_R = Spread.of([per_round(s, "reselect") for s in runs]).median  # a dynamic view's, per round
        tokens_per_round = median_run.mean_accepted_per_round or 1.0  # a lookup draft may propose nothing
        alpha = alpha_from_tokens_per_round(gamma, tokens_per_round)
        row.update(rounds=median_run.rounds, alpha=sig(alpha, 3),
                   accepted_per_drafted=sig(median_run.acceptance_rate or 0.0, 3),
                   tokens_per_round=sig(tokens_per_round, 3),
                   T_V_ms=sig(1e3 * T_V), T_D_ms=sig(1e3 * T_D), T_R_ms=sig(1e3 * T_R),
                   verify_ratio=sig(T_V / T_T, 3), draft_ratio=sig(T_D / T_T, 3),
                   speedup_pred_measured_T=sig(expected_tokens(gamma, alpha) * T_T / (gamma * T_D + T_V + T_R)),
                   simulated_acceptance=alpha_sim)
        if cfg.draft.reads_cache:  # the cost model knows model drafts (a lookup draft costs no model pass)
            pred = predict_times(args, hw, batch, context, gamma, cfg.draft.budget, dtype_bytes, draft_args=draft_args,
                                 reselect_every=cfg.draft.reselect_every)
            row.update(verify_ratio_pred=sig(pred.verify_ratio, 3), draft_ratio_pred=sig(pred.draft_ratio, 3),
                       speedup_pred_cost_model=sig(predicted_speedup(pred, gamma, alpha)),
                       pred_ms=dict(T_T=sig(1e3 * pred.T_T), T_V=sig(1e3 * pred.T_V), T_D=sig(1e3 * pred.T_D),
                                    T_R=sig(1e3 * pred.T_R_per_round)))
    row["flags"] = sanity_flags(cfg, prompt_len, tps, base_tps, T_T, T_V, T_D)
    row["peak_memory_GiB"] = sig(max(s.peak_memory_bytes for s in runs) / 2**30, 3)
    row["prefill_s"] = sig(Spread.of([s.prefill_s for s in runs]).median, 3)
    row["capture_s"] = sig(sum(s.capture_s for s in [*warmups, *runs]), 3)
    return row


# ---- the sweep -------------------------------------------------------------------------------------------
def sweep(engine: Engine, configs: list[Config], prompt_pool: Callable[[int], list], batch_sizes: list[int],
          prompt_lengths: list[int], max_new: int, warmup: int, repeats: int, alpha: Optional[float], seed: int,
          prefill_chunk: int, hw: HardwareProfile, draft_args=None, profile_rounds: bool = False
          ) -> tuple[list, list]:
    """(rows, skipped) over every (prompt length, batch size); prompt_pool(length) gives the prompts
    (at least max(batch_sizes) of them). A point that does not fit in memory is skipped whole."""
    rows, skipped = [], []
    per_point = len(interleaved(len(configs), repeats))  # timed runs of one point
    bar = tqdm(total=len(prompt_lengths) * len(batch_sizes) * per_point, desc="bench", unit="run")
    for length in prompt_lengths:
        pool = prompt_pool(length)
        for batch in batch_sizes:
            done = 0

            def progress(cfg: Config) -> None:
                nonlocal done
                bar.set_postfix_str(f"B={batch} L={length} {cfg.draft_name} γ={cfg.gamma} budget={cfg.budget}")
                bar.update()
                done += 1

            try:
                seq_len = length + max_new + max(c.draft.gamma for c in configs) + 1
                reason = engine.why_not_fits(batch, seq_len)  # GPU or CPU, the current caches counted as freed
                if reason:
                    raise MemoryError(reason)
                point = run_point(engine, pool[:batch], max_new, configs, warmup, repeats, alpha, seed,
                                  prefill_chunk, progress)
                for i, cfg in enumerate([BASELINE] + configs):
                    row = make_row(cfg, batch, length, max_new, point.runs[i], point.paired[i], engine.model.args,
                                   draft_args if "model" in cfg.draft.stages else None, hw, engine.dtype.itemsize,
                                   alpha, point.warmups[i])
                    if profile_rounds and cfg is not BASELINE:
                        counts = profile_round_counts(engine, pool[:batch], cfg.draft)
                        row.update({f"{k}_per_round": v for k, v in counts.items() if k != "rounds_compared"})
                    rows.append(row)
            except (MemoryError, torch.cuda.OutOfMemoryError) as err:
                reason = (str(err).splitlines() or ["out of memory"])[0]
                skipped.append(dict(batch=batch, prompt_len=length, reason=reason))
                tqdm.write(f"skipped batch {batch}, prompt {length}: {reason}", file=sys.stderr)
                bar.update(per_point - done)
                if engine.device.type == "cuda":
                    torch.cuda.empty_cache()
    bar.close()
    return rows, skipped
