"""Fixed-shape model steps: what a step is (StepSpec, Step), the function that gets compiled
(forward_step), and where it runs (StepRunner: a captured CUDA graph per Step, or eagerly).

A StepSpec is the one static argument of the compiled step: everything that fixes a step's shape
and output lives in it. A Step binds a spec to the model and selection buffers it runs on; its
owner (the engine for verification, a drafter for its draft steps) creates it once and keeps it,
and the runner captures one graph per Step. Per-call tensors (tokens, cache_len) are copied into
the graph's static buffers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch

from . import cuda_graphs
from .attention import MAX_KERNEL_QUERIES, AttentionView
from .model import Transformer

CAPTURE_SCRATCH = MAX_KERNEL_QUERIES  # cache slots past the last real position, for graph warm-ups
# Eager steps trim the key axis to a multiple of this: every step of a bucket has one attention
# shape, so a step's time does not depend on which lengths ran before it.
KV_BUCKET = 256


@dataclasses.dataclass(frozen=True)
class StepSpec:
    role: str  # "target" (verification / plain decoding) or "draft"
    n_tokens: int  # T, tokens per sequence
    window: Optional[int] = None  # view geometry: None the full view, else the sparse view's window
    n_selected: int = 0  # sparse view: selected keys per layer and KV head (besides the window)
    last_only: bool = False  # logits of the last token only (draft steps sample from nothing else)
    greedy: bool = True  # output argmax ids, else fp32 logits (step_output)


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """A spec bound to the model it runs and the selection buffers its view reads (per layer
    [B, H_kv, K], None for a full view). A full-view step may also own score buffers (per layer
    [B, H_kv, S_max] fp32) it fills with the attention mass of every cache position: a
    verification a re-selecting draft learns from. Hashed by identity: the runner keeps its graph by it."""
    spec: StepSpec
    model: Transformer
    selection: Optional[list] = None
    scores: Optional[list] = None


def step_output(model: Transformer, logits: torch.Tensor, greedy: bool) -> torch.Tensor:
    """The model's logits [..., V] (a vocabulary slice under tensor parallelism) -> greedy: the
    argmax token ids [...]; sampling: the full fp32 logits [..., V].

    Greedy steps return tokens, not logits: the argmax runs inside the captured step, a graph's
    output is [B, T] ids instead of [B, T, V] floats, and under TP no rank gathers the vocabulary."""
    shard = model.vocab_shard
    if greedy:
        return logits.argmax(dim=-1) if shard is None else shard.argmax(logits)
    return logits if shard is None else shard.gather(logits)


def forward_step(model: Transformer, spec: StepSpec, tokens: torch.Tensor, cache_len: torch.Tensor,
                 selected: Optional[list] = None, backend: str = "torch",
                 kv_limit: Optional[int] = None, scores: Optional[list] = None) -> torch.Tensor:
    """tokens [B, T] at cache_len [B].. through the spec's view (selected: per layer [B, H_kv, K];
    scores: per layer [B, H_kv, S_max], filled with the attention mass, see Step)
    -> step_output at every token or the last only: ids [B, T] / [B, 1], logits [B, T, V] / [B, 1, V]."""
    view = AttentionView(cache_len=cache_len, n_tokens=spec.n_tokens, window=spec.window, selected=selected,
                         backend=backend, kv_limit=kv_limit, scores=scores)
    output_index = None
    if spec.last_only:
        output_index = torch.full((tokens.shape[0], 1), spec.n_tokens - 1, device=tokens.device)
    return step_output(model, model(tokens, view, output_index), spec.greedy)


def bucketed_kv_limit(cache_len: torch.Tensor, n_tokens: int, max_seq_len: int, bucket: int) -> int:
    """Keys an eager step must look at, rounded up to `bucket` (capped at the cache): every step of a
    bucket has the same attention shape, so timings do not depend on which lengths came before."""
    needed = int(cache_len.max()) + n_tokens
    return min(-(-needed // bucket) * bucket, max_seq_len)


class CapturedStep:
    """A step for one fixed shape as a CUDA graph over static token / cache_len buffers.

    A floating-point output (sampling logits) is copied, inside the graph, into `logits`, a view of
    the one buffer all graphs share; the step's own output is then a temporary of the capture, so
    its pool memory is reused by the next graph instead of each graph pinning its own [B, T, V].
    The returned tensor is valid until the next captured step runs."""

    def __init__(self, step: Callable, batch: int, n_tokens: int, scratch_pos: int, device, pool,
                 logits: Optional[torch.Tensor]):
        self.tokens = torch.zeros(batch, n_tokens, dtype=torch.long, device=device)
        # Warm-up and capture write their K/V into scratch slots no real token ever uses.
        self.cache_len = torch.full((batch,), scratch_pos, dtype=torch.long, device=device)
        # Three warm-ups compile and autotune outside the graph. thread_local (as inductor's own
        # graphs): under tensor parallelism the NCCL watchdog thread may query events of earlier
        # collectives while this thread captures.
        self.graph, self.output = cuda_graphs.capture(
            functools.partial(step, self.tokens, self.cache_len), pool=pool, warmup=3,
            error_mode="thread_local", finish=functools.partial(copy_into_shared, logits=logits))

    def __call__(self, tokens: torch.Tensor, cache_len: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.cache_len.copy_(cache_len)
        self.graph.replay()
        return self.output


def copy_into_shared(out: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
    """A step's output; logits out [B, T, V] go into the shared buffer [B, T_max, V] (its first T rows)."""
    if not out.is_floating_point() or logits is None or logits.shape[1] < out.shape[1]:
        return out  # greedy ids [B, T] (small), or a step captured without a reserved buffer
    view = logits[:, :out.shape[1]]
    view.copy_(out)
    return view


class StepGraphs:
    """The captured steps of one cache shape (one per Step), the private memory pool they share,
    and the one logits buffer their sampling outputs share.

    The pool lives exactly as long as its graphs: PyTorch frees a private pool when the last graph
    captured into it is destroyed, and capturing into a handle whose pool is gone trips its
    private-pool assertion. So the handle is dropped together with the graphs, and the next
    capture gets a fresh one. `capture` and `new_pool` are injectable so CPU tests can drive the
    re-setup sequence with a fake capture."""

    def __init__(self, capture: Callable = CapturedStep, new_pool: Optional[Callable] = None):
        self._capture = capture
        self._new_pool = new_pool or torch.cuda.graph_pool_handle
        self.captured: dict[Step, Callable] = {}
        self.pool = None
        self.logits: Optional[torch.Tensor] = None  # [B, T_max, V] fp32

    def capture(self, step: Step, fn: Callable, batch: int, scratch_pos: int, device):
        """Capture fn(tokens, cache_len), the computation of `step`, into the shared pool."""
        if self.pool is None:
            self.pool = self._new_pool()
        self.captured[step] = self._capture(fn, batch, step.spec.n_tokens, scratch_pos, device, self.pool,
                                            self.logits)
        return self.captured[step]

    def clear(self) -> None:
        """Forget every captured step and their pool (the caches they point at are going away)."""
        self.captured, self.pool, self.logits = {}, None, None

    def reserve_logits(self, batch: int, n_tokens: int, vocab: int, device) -> None:
        """Make the shared logits buffer hold [batch, n_tokens, vocab]; growing it re-captures
        everything, as the captured graphs write into the old one."""
        if self.logits is not None and self.logits.shape[0] == batch and self.logits.shape[1] >= n_tokens:
            return
        self.clear()
        self.logits = torch.empty(batch, n_tokens, vocab, dtype=torch.float32, device=device)


class StepRunner:
    """Runs steps: compiled (torch.compile of forward_step, fullgraph: a graph break is an error,
    not a silent slowdown) or not, replayed from a CUDA graph per Step or eager. The one place
    that decides how a step executes."""

    def __init__(self, backend: str, device: torch.device, compile: bool, use_graphs: bool,
                 kv_bucket: int = KV_BUCKET):
        self.backend, self.device, self.kv_bucket = backend, device, kv_bucket
        self.compile, self.use_graphs = compile, use_graphs
        self.step_fn = torch.compile(forward_step, fullgraph=True) if compile else forward_step
        self.graphs = StepGraphs()  # the captured steps of the current cache shape (CUDA graphs only)

    def run(self, step: Step, tokens: torch.Tensor, cache_len: torch.Tensor) -> torch.Tensor:
        """One step of tokens [B, T] at cache_len [B] -> step_output (see forward_step)."""
        if self.use_graphs:
            return self.captured(step, tokens.shape[0])(tokens, cache_len)
        # On CPU the sync is free and trimming the key axis saves real work; on a GPU it would be a
        # host sync per step.
        kv_limit = None
        if self.device.type == "cpu":
            kv_limit = bucketed_kv_limit(cache_len, step.spec.n_tokens, step.model.max_seq_len, self.kv_bucket)
        return self.step_fn(step.model, step.spec, tokens, cache_len, step.selection, self.backend, kv_limit,
                            step.scores)

    def captured(self, step: Step, batch: int):
        """The CUDA graph of `step`, compiled and captured on first use."""
        graph = self.graphs.captured.get(step)
        if graph is None:
            fn = functools.partial(self.step_fn, step.model, step.spec, selected=step.selection, backend=self.backend,
                                   scores=step.scores)
            graph = self.graphs.capture(step, fn, batch, step.model.max_seq_len - CAPTURE_SCRATCH, self.device)
        return graph
