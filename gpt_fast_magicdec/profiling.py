"""Evidence that a decode round replays graphs without per-step host syncs.

Two profiled generations that differ only in length are subtracted, so prefill, capture and setup
cancel and what remains is exactly what the extra rounds cost: CUDA graph launches, host
synchronisations and device-to-host copies per round. Acceptance is forced to zero (every round
emits exactly one token), which makes the number of rounds exact.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
GRAPH_LAUNCH = "cudaGraphLaunch"


def _counts(engine, prompts, max_new, draft) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        stats = engine.generate(prompts, max_new, draft=draft, accept_override=torch.zeros_like).stats
    counts = {"rounds": stats.rounds, "graph_launches": 0, "host_syncs": 0, "dtoh_copies": 0}
    for event in prof.key_averages():
        if event.key == GRAPH_LAUNCH:
            counts["graph_launches"] += event.count
        elif event.key in SYNC_CALLS:
            counts["host_syncs"] += event.count
        elif "DtoH" in event.key or "Device -> Pageable" in event.key:
            counts["dtoh_copies"] += event.count
    return counts


def profile_rounds(engine, prompts, draft, short: int = 8, extra: int = 16) -> dict:
    """Per-round counts of graph launches, host syncs and DtoH copies for `draft` on `prompts`.

    Expected on CUDA with graphs: gamma + 1 launches (gamma draft steps, one verification) and one
    sync with one DtoH copy (the all-done check) per round."""
    engine.generate(prompts, short, draft=draft)  # compile and capture outside the profile
    a = _counts(engine, prompts, short, draft)
    b = _counts(engine, prompts, short + extra, draft)
    rounds = b["rounds"] - a["rounds"]
    per_round = {k: (b[k] - a[k]) / rounds for k in ("graph_launches", "host_syncs", "dtoh_copies")}
    return {"rounds_compared": rounds, "gamma": draft.gamma if draft.enabled else 0, **per_round}
