"""Wall-clock timing shared by the engine's phase split, the cost model's probes and the benchmarks.

One rule everywhere: on a GPU an interval is a pair of CUDA events (no host sync while timing; the
times are read once, after one synchronize), on the CPU it is perf_counter. Plus the summary every
benchmark reports for repeated measurements: median and spread (min / max), and whether that spread
is too wide to trust (first-seen shapes and a shared machine make single runs lie)."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

UNSTABLE_SPREAD = 0.10  # (max - min) / median above this: the repeats disagree, the row is marked


class Interval:
    """One timed interval: CUDA events on a GPU (read after a synchronize), `clock` elsewhere
    (perf_counter; time.process_time for a single-threaded CPU probe that must not count the time
    a shared machine gives to other processes)."""

    def __init__(self, cuda: bool, clock: Callable[[], float] = time.perf_counter):
        self.cuda, self.clock = cuda, clock
        if cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.start_event.record()
        else:
            self.t0 = self.clock()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        else:
            self.t1 = self.clock()

    def seconds(self) -> float:
        """Only after torch.cuda.synchronize() on a GPU."""
        if self.cuda:
            return self.start_event.elapsed_time(self.end_event) / 1e3
        return self.t1 - self.t0


class PhaseTimer:
    """Time named phases without host syncs (`with timer("verify"): ...`); totals() reads them once."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.intervals = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name: str):
        interval = Interval(self.cuda)
        interval.start()
        yield
        interval.stop()
        self.intervals[name].append(interval)

    def totals(self) -> dict:
        """{phase: seconds summed over its intervals}."""
        if self.cuda:
            torch.cuda.synchronize()
        return {name: sum(iv.seconds() for iv in ivs) for name, ivs in self.intervals.items()}


class NoTimer:
    """A PhaseTimer that times nothing (the default where nobody reads the phases)."""

    def __call__(self, name: str):
        return contextlib.nullcontext()


NO_TIMER = NoTimer()


def time_calls(fn: Callable[[], object], device, reps: int, before: Optional[Callable[[], object]] = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of `reps` calls of fn (no warm-up here). `before` runs ahead of every call,
    outside its interval (the kernel benchmark evicts the L2 cache there); `clock`: see Interval."""
    cuda = torch.device(device).type == "cuda"
    intervals = []
    for _ in range(reps):
        if before is not None:
            before()
        interval = Interval(cuda, clock)
        interval.start()
        fn()
        interval.stop()
        intervals.append(interval)
    if cuda:
        torch.cuda.synchronize(device)
    return [iv.seconds() for iv in intervals]


def time_op(fn: Callable[[], object], device, reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of fn: one warm-up call, then the median of `reps` timed calls (the median,
    so that a shared machine's occasional preemption does not count)."""
    fn()
    return statistics.median(time_calls(fn, device, reps, clock=clock))


@dataclasses.dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements of one quantity."""
    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))

    @property
    def relative(self) -> float:
        """(max - min) / median: 0 for one measurement or perfect agreement."""
        return (self.hi - self.lo) / self.median if self.median else 0.0

    @property
    def unstable(self) -> bool:
        return self.relative > UNSTABLE_SPREAD
