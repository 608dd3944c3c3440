"""CUDA-graph capture in one place: the engine's captured steps and the kernel benchmark use it.

The recipe is torch's (docs, "CUDA Graphs"): run the function a few times on a side stream first,
so that lazy work (torch.compile, Triton autotuning, cuBLAS workspaces, allocator growth) happens
outside the graph, then capture one call."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def capture(fn: Callable[[], object], pool=None, warmup: int = 3, error_mode: str = "global",
            release_cached: bool = False, finish: Optional[Callable[[object], object]] = None
            ) -> tuple[torch.cuda.CUDAGraph, object]:
    """-> (graph, output): fn warmed up `warmup` times on a side stream, then captured once.

    output is what fn returned during capture, or finish(that) when finish is given: finish runs
    inside the capture only, not in the warm-ups (the engine copies logits into a buffer shared by
    all its graphs there, which a warm-up must not overwrite). Its tensors live in the graph's
    memory pool and graph.replay() rewrites them in place. pool: a torch.cuda.graph_pool_handle() to share with
    other graphs. error_mode: "thread_local" when another thread may touch CUDA while this one
    captures (the NCCL watchdog under tensor parallelism). release_cached: empty torch's cache
    before capturing, for callers near the memory limit (the warm-ups' cached blocks cannot serve
    the graph's private pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if release_cached:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
        output = fn()
        if finish is not None:
            output = finish(output)
    return graph, output
