"""The shared timing helpers and bench's paired, interleaved timing, without a model."""
from __future__ import annotations

import time

import pytest
import torch

from gpt_fast_magicdec import cuda_graphs
from gpt_fast_magicdec.benchmarking.sweep import BASELINE, Config, interleaved, sanity_flags
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.timing import PhaseTimer, Spread, time_calls, time_op


def test_spread_median_range_and_instability():
    s = Spread.of([1.0, 1.2, 0.9])
    assert (s.median, s.lo, s.hi) == (1.0, 0.9, 1.2)
    assert s.relative == pytest.approx(0.3) and s.unstable
    assert not Spread.of([1.0, 1.05, 0.99]).unstable
    assert Spread.of([2.0]).relative == 0.0  # one measurement: no spread to judge


class FakeClock:
    """A clock that moves only when told: timers are checked without asserting on elapsed time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_cpu_timers_time_the_call_and_nothing_else():
    clock = FakeClock()
    times = time_calls(lambda: clock.advance(0.01), "cpu", 3, before=lambda: clock.advance(0.02), clock=clock)
    assert times == pytest.approx([0.01] * 3)  # `before` is outside the interval
    steps = iter([5.0, 0.01, 0.03, 0.02])  # warm-up call (not timed), then three timed calls
    assert time_op(lambda: clock.advance(next(steps)), "cpu", 3, clock=clock) == pytest.approx(0.02)  # median


def test_phase_timer_sums_its_intervals():
    timer = PhaseTimer("cpu")
    for _ in range(2):
        with timer("verify"):
            time.sleep(0.01)
    totals = timer.totals()
    assert set(totals) == {"verify"} and totals["verify"] >= 0.019  # a sleep lasts at least as asked


def test_interleaved_pairs_every_speculative_run_with_two_baselines():
    order = interleaved(3, repeats=2)
    assert order == [0, 1, 0, 2, 0, 3, 0, 1, 0, 2, 0, 3, 0]
    assert all(order[k - 1] == order[k + 1] == 0 for k, i in enumerate(order) if i)


def test_sanity_flags():
    cfg = Config("self-streaming", DraftConfig(kind="self", budget=128, sink=16, gamma=3))
    steady, shaky = Spread.of([100.0, 101.0]), Spread.of([100.0, 130.0])
    assert sanity_flags(cfg, 200, steady, steady, T_T=1.0, T_V=1.5, T_D=0.5) is None
    assert sanity_flags(cfg, 200, steady, shaky, T_T=1.0, T_V=1.5, T_D=0.5) == "unstable (spread 26%)"
    assert sanity_flags(cfg, 200, steady, steady, T_T=1.0, T_V=0.26, T_D=1.2) == "T_V<T_T; T_D>T_T"
    # A budget covering the context reads as much as the target: a slow draft step is no surprise.
    assert sanity_flags(cfg, 100, steady, steady, T_T=1.0, T_V=1.5, T_D=1.2) is None
    assert sanity_flags(BASELINE, 200, steady, steady, T_T=1.0, T_V=None, T_D=None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_capture_replays_with_new_inputs():
    x = torch.ones(4, device="cuda")
    graph, out = cuda_graphs.capture(lambda: x * 2, finish=lambda y: y + 1)
    x.fill_(3.0)
    graph.replay()
    assert out.tolist() == [7.0] * 4  # (3 * 2) + 1: finish is part of the graph
