"""Load, prefill, capture, and run the generation loop with statistics.

The loop is speculative_round() over a DecodeState; plain decoding is the same loop with gamma 0.
On CUDA every fixed-shape model step (verify: gamma+1 tokens; draft: 1 token, 2 for a standalone
draft's first step) is compiled and captured as a CUDA graph over static buffers; the host
synchronises once per round, to read which sequences are done. On CPU the same steps run eagerly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .attention import MAX_KERNEL_QUERIES, AttentionView, resolve_backend
from .config import ModelArgs
from .drafting import DraftConfig, select_positions
from .errors import UserError
from .model import Transformer
from .sampling import SamplingParams, select_tokens
from .speculative import DecodeState, speculative_round

CAPTURE_SCRATCH = MAX_KERNEL_QUERIES  # cache slots past the last real position, for graph warm-ups


def set_compiler_flags() -> None:
    """Inductor settings, set once at start-up (never inside a method), as gpt-fast does."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True
    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True
    # One compiled forward_step serves every (model, T, view) shape of a run; a bench sweep visits
    # many. Past dynamo's default limit (8) it would silently fall back to eager.
    dynamo_config.recompile_limit = 64


# ---- building models ----------------------------------------------------------------------------
def model_from_state_dict(args: ModelArgs, state_dict: dict, device, dtype) -> Transformer:
    """Build on the meta device and adopt the tensors (no second copy of the weights)."""
    with torch.device("meta"):
        model = Transformer(args)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    allowed_missing = {"output.weight"} if args.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(f"checkpoint does not match the model: missing {sorted(set(missing) - allowed_missing)[:3]}, "
                        f"unexpected {unexpected[:3]}; re-run the converter")
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def random_model(args: ModelArgs, device, dtype, seed: int = 0) -> Transformer:
    """Random weights of a preset shape, for benchmarks: the output text is noise."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
            for name, p in model.named_parameters():
                if "norm" not in name:
                    torch.nn.init.normal_(p, std=0.02)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def load_model(checkpoint: Path, device, dtype, shard: Optional[Callable] = None) -> Transformer:
    """Load a converted checkpoint; `shard(args, state_dict) -> (args, state_dict)` slices it for TP."""
    from .checkpoint import load_engine_checkpoint

    args, state_dict = load_engine_checkpoint(checkpoint)
    if shard is not None:
        args, state_dict = shard(args, state_dict)
    return model_from_state_dict(args, state_dict, device, dtype)


# ---- one forward step, the unit that gets compiled and captured ---------------------------------
KV_BUCKET = 256  # eager steps trim the key axis to a multiple of this (stable shapes, issue 14)


def step_output(model: Transformer, logits: torch.Tensor, greedy: bool) -> torch.Tensor:
    """The model's logits [..., V] (a vocabulary slice under tensor parallelism) -> greedy: the
    argmax token ids [...]; sampling: the full fp32 logits [..., V].

    Greedy steps return tokens, not logits: the argmax runs inside the captured step, a graph's
    output is [B, T] ids instead of [B, T, V] floats, and under TP no rank gathers the vocabulary."""
    shard = model.vocab_shard
    if greedy:
        return logits.argmax(dim=-1) if shard is None else shard.argmax(logits)
    return logits if shard is None else shard.gather(logits)


def forward_step(model: Transformer, tokens: torch.Tensor, cache_len: torch.Tensor, window: Optional[int],
                 selected: Optional[list], backend: str, last_only: bool, greedy: bool,
                 kv_limit: Optional[int] = None) -> torch.Tensor:
    """tokens [B, T] at cache_len.. -> step_output of the logits at every token (or the last only):
    greedy ids [B, T] / [B, 1], sampling logits [B, T, V] / [B, 1, V]."""
    view = AttentionView(cache_len=cache_len, n_tokens=tokens.shape[1], window=window, selected=selected,
                         backend=backend, kv_limit=kv_limit)
    output_index = None
    if last_only:
        output_index = torch.full((tokens.shape[0], 1), tokens.shape[1] - 1, device=tokens.device)
    return step_output(model, model(tokens, view, output_index), greedy)


def bucketed_kv_limit(cache_len: torch.Tensor, n_tokens: int, max_seq_len: int, bucket: int) -> int:
    """Keys an eager step must look at, rounded up to `bucket` (capped at the cache): every step of a
    bucket has the same attention shape, so timings do not depend on which lengths came before."""
    needed = int(cache_len.max()) + n_tokens
    return min(-(-needed // bucket) * bucket, max_seq_len)


class CapturedStep:
    """forward_step for one fixed shape as a CUDA graph over static token / cache_len buffers.

    A floating-point output (sampling logits) is copied, inside the graph, into `logits`, a view of
    the one buffer all graphs share; the step's own output is then a temporary of the capture, so
    its pool memory is reused by the next graph instead of each graph pinning its own [B, T, V].
    The returned tensor is valid until the next captured step runs."""

    def __init__(self, step: Callable, batch: int, n_tokens: int, scratch_pos: int, device, pool,
                 logits: Optional[torch.Tensor]):
        self.tokens = torch.zeros(batch, n_tokens, dtype=torch.long, device=device)
        # Warm-up and capture write their K/V into scratch slots no real token ever uses.
        self.cache_len = torch.full((batch,), scratch_pos, dtype=torch.long, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile + autotune outside the graph
                step(self.tokens, self.cache_len)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local (as inductor's own graphs): under tensor parallelism the NCCL watchdog thread
        # may query events of earlier collectives while this thread captures.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            out = step(self.tokens, self.cache_len)
            self.output = copy_into_shared(out, logits)

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
    """The captured steps of one cache shape, the private memory pool they share, and the one
    logits buffer their sampling outputs share.

    The pool lives exactly as long as its graphs: PyTorch frees a private pool when the last graph
    captured into it is destroyed, and capturing into a handle whose pool is gone trips its
    private-pool assertion (issue 11). So the handle is dropped together with the last graph, and
    the next capture gets a fresh one. `capture` and `new_pool` are injectable so CPU tests can
    drive the re-setup sequence with a fake capture."""

    def __init__(self, capture: Callable = CapturedStep, new_pool: Optional[Callable] = None):
        self._capture = capture
        self._new_pool = new_pool or torch.cuda.graph_pool_handle
        self.steps: dict = {}  # key (role, n_tokens, greedy) -> captured step
        self.pool = None
        self.logits: Optional[torch.Tensor] = None  # [B, T_max, V] fp32

    def get(self, key: tuple, step: Callable, batch: int, n_tokens: int, scratch_pos: int, device):
        if key not in self.steps:
            if self.pool is None:
                self.pool = self._new_pool()
            self.steps[key] = self._capture(step, batch, n_tokens, scratch_pos, device, self.pool, self.logits)
        return self.steps[key]

    def drop(self, role: Optional[str] = None) -> None:
        """Forget the steps of one role ("draft": its view changed), or all of them (None)."""
        self.steps = {k: g for k, g in self.steps.items() if role is not None and k[0] != role}
        if not self.steps:
            self.pool = self.logits = None

    def reserve_logits(self, batch: int, n_tokens: int, vocab: int, device) -> None:
        """Make the shared logits buffer hold [batch, n_tokens, vocab]; growing it re-captures
        everything, as the captured graphs write into the old one."""
        if self.logits is not None and self.logits.shape[0] == batch and self.logits.shape[1] >= n_tokens:
            return
        self.drop()
        self.logits = torch.empty(batch, n_tokens, vocab, dtype=torch.float32, device=device)


# ---- statistics -----------------------------------------------------------------------------------
class PhaseTimer:
    """Time named phases without host syncs: CUDA events on GPU, read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events = defaultdict(list)
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - t

    def totals(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            for name, pairs in self.events.items():
                self.seconds[name] = sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        return dict(self.seconds)


@dataclasses.dataclass
class GenerationStats:
    batch_size: int
    prompt_tokens: list
    new_tokens: list
    prefill_s: float
    decode_s: float
    capture_s: float  # CUDA-graph compile + capture before decoding (0 where nothing is captured)
    latency_s: list  # per sequence, from the start of prefill to its last token
    rounds: int
    gamma: int
    accepted: int  # draft tokens accepted, summed over sequences
    drafted: int  # draft tokens proposed to running sequences
    seq_rounds: int  # rounds summed over sequences (a sequence counts while it runs)
    phase_s: dict
    peak_memory_bytes: int
    simulated_acceptance: Optional[float] = None

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / max(self.decode_s, 1e-9)

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_per_round(self) -> Optional[float]:
        """Tokens emitted per sequence per round (accepted drafts + the bonus token)."""
        if not self.drafted:
            return None
        return (self.accepted + self.seq_rounds) / self.seq_rounds

    def summary_lines(self) -> list[str]:
        lines = [
            f"prefill: {sum(self.prompt_tokens)} tokens in {self.prefill_s:.3f} s"
            + (f" (+ {self.capture_s:.1f} s compiling and capturing CUDA graphs)" if self.capture_s > 0.01 else ""),
            f"decode:  {sum(self.new_tokens)} tokens in {self.decode_s:.3f} s = {self.tokens_per_s:.1f} tokens/s "
            f"(batch {self.batch_size}, {self.rounds} rounds)",
            "latency per sequence (s): " + " ".join(f"{x:.2f}" for x in self.latency_s),
        ]
        if self.gamma and not self.drafted:
            lines.append("speculation: no draft tokens proposed (gamma auto chose plain decoding throughout)")
        elif self.gamma:
            tag = f" [SIMULATED acceptance {self.simulated_acceptance}]" if self.simulated_acceptance is not None else ""
            lines.append(f"speculation: gamma {self.gamma}, acceptance rate {self.acceptance_rate:.3f}, "
                         f"mean tokens per round {self.mean_accepted_per_round:.2f}, "
                         f"{self.drafted} draft tokens{tag}")
        if self.phase_s:
            lines.append("time split (s): " + ", ".join(f"{k} {v:.3f}" for k, v in self.phase_s.items()))
        lines.append(f"peak memory: {self.peak_memory_bytes / 2**30:.2f} GiB")
        return lines


@dataclasses.dataclass
class GenerationResult:
    tokens: list  # per sequence: the generated token ids (EOS included when it stopped there)
    stats: GenerationStats


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- the engine -------------------------------------------------------------------------------------
class Engine:
    """Target model (+ optional standalone draft model), caches, captured steps, generate()."""

    def __init__(self, model: Transformer, *, draft_model: Optional[Transformer] = None,
                 attention: str = "auto", compile: Optional[bool] = None, use_graphs: Optional[bool] = None,
                 tp=None, kv_bucket: int = KV_BUCKET):
        self.model = model
        self.draft_model = draft_model  # None on ranks outside --draft-ranks under tensor parallelism
        self.tp = tp  # tp.TensorParallel under torchrun, else None; the models come sharded already
        self.tp_size = tp.world_size if tp is not None else 1
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype
        self.backend = resolve_backend(attention, self.device)
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        if self.use_graphs and not on_cuda:
            raise UserError("CUDA graphs need a CUDA device")
        if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
            raise UserError(f"draft vocabulary ({draft_model.args.vocab_size}) differs from the target's "
                            f"({model.args.vocab_size}): the draft must share the target's tokenizer")
        self._step = torch.compile(forward_step, fullgraph=False) if self.compile else forward_step
        self.kv_bucket = kv_bucket
        self._cache_shape = self._draft_view = None
        self.graphs = StepGraphs()  # the captured steps of the current cache shape (CUDA graphs only)
        self._selected: dict = {}  # model role -> static per-layer selection buffers

    # -- setup --------------------------------------------------------------------------------------
    def _setup(self, batch: int, seq_len: int, draft: DraftConfig) -> None:
        """Caches depend on (batch, seq_len) only; the draft's selection buffers and captured draft
        steps on its view. Each is rebuilt only when its own key changes, so plain and speculative
        runs (--compare, bench sweeps) share one cache and the target's graphs."""
        seq_len = -(-seq_len // 256) * 256 + CAPTURE_SCRATCH  # round up so repeated runs reuse graphs
        if (batch, seq_len) != self._cache_shape:
            # Release the old caches and every graph that points at them before allocating: at long
            # context the KV cache is most of the memory, and two of them at once would not fit.
            self._cache_shape, self._draft_view, self._selected = None, None, {}
            self.graphs.drop()  # and with them their memory pool: the next capture starts a new one
            for model in self._models():
                model.setup_caches(batch, seq_len, self.dtype, self.device)
            self._cache_shape = (batch, seq_len)  # only once allocation succeeded
        view = (draft.kind, draft.kv, draft.n_selected, draft.window)
        if view == self._draft_view:
            return
        # Captured draft steps bake in the view (window, selection buffers) and which model drafts.
        self.graphs.drop("draft")
        self._selected = {}
        drafter = self.draft_model if draft.kind == "model" else self.model  # None: the draft is elsewhere
        if draft.enabled and not draft.full and drafter is not None:
            n_kv = drafter.args.n_kv_heads
            self._selected["draft"] = [torch.full((batch, n_kv, draft.n_selected), -1, dtype=torch.long,
                                                  device=self.device) for _ in range(drafter.args.n_layers)]
        self._draft_view = view

    @staticmethod
    def _gammas(gamma: int, controller) -> set:
        """Every gamma this run can use: the controller's choices (--gamma auto) or the fixed one."""
        return set(getattr(controller, "choices", None) or {gamma})

    def _models(self):
        return [self.model] + ([self.draft_model] if self.draft_model is not None else [])

    def _run(self, key: tuple, model: Transformer, tokens: torch.Tensor, cache_len: torch.Tensor,
             window: Optional[int], selected: Optional[list], last_only: bool, greedy: bool) -> torch.Tensor:
        """One fixed-shape step: captured graph on CUDA, eager (with a key-range hint) elsewhere."""
        if not self.use_graphs:
            # On CPU the sync is free and trimming the key axis saves real work; on a GPU it would
            # be a host sync per step.
            kv_limit = None
            if self.device.type == "cpu":
                kv_limit = bucketed_kv_limit(cache_len, tokens.shape[1], model.max_seq_len, self.kv_bucket)
            return self._step(model, tokens, cache_len, window, selected, self.backend, last_only, greedy, kv_limit)
        graph = self._graph(key, model, tokens.shape[0], tokens.shape[1], window, selected, last_only, greedy)
        return graph(tokens, cache_len)

    def _graph(self, key: tuple, model: Transformer, batch: int, n_tokens: int, window: Optional[int],
               selected: Optional[list], last_only: bool, greedy: bool):
        """The CUDA graph of one step shape, compiled and captured on first use."""
        def step(t, c):
            return self._step(model, t, c, window, selected, self.backend, last_only, greedy)

        scratch = model.max_seq_len - CAPTURE_SCRATCH
        return self.graphs.get(key, step, batch, n_tokens, scratch, self.device)

    # -- prefill ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: Transformer, tokens: torch.Tensor, prompt_len: torch.Tensor, chunk: int,
                progress: bool) -> torch.Tensor:
        """Chunked prefill of tokens [B, L_max] (ragged; padding sits after each prompt and is never
        attended by a real query) -> the model's logits at each prompt's last token [B, V] (this
        rank's vocabulary slice under tensor parallelism; see step_output)."""
        B, L = tokens.shape
        last = None
        starts = range(0, L, chunk)
        for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 4):
            T = min(chunk, L - start)
            view = AttentionView(cache_len=torch.full((B,), start, device=self.device), n_tokens=T,
                                 backend=self.backend, kv_limit=start + T, prefill_start=start)
            idx = (prompt_len - 1 - start).clamp(0, T - 1)[:, None]  # [B, 1] row of each last token
            logits = model(tokens[:, start:start + T], view, output_index=idx)[:, 0]  # [B, V]
            here = (prompt_len - 1 >= start) & (prompt_len - 1 < start + T)
            last = logits if last is None else torch.where(here[:, None], logits, last)
        return last

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens, sampling: SamplingParams = SamplingParams(),
                 draft: DraftConfig = DraftConfig(), eos_ids=(), prefill_chunk: int = 512,
                 max_seq_len: Optional[int] = None, progress: bool = False,
                 accept_override: Optional[Callable] = None, gamma_controller=None) -> GenerationResult:
        """prompts: token-id lists (ragged). max_new_tokens: int or one per prompt."""
        if draft.kind == "model" and self.draft_model is None and (self.tp is None or self.tp.holds_draft):
            raise UserError("a standalone draft needs --draft-checkpoint")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt must have at least one token")
        B = len(prompts)
        max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(max_new) != B or min(max_new) < 1:
            raise UserError("--max-new-tokens must be >= 1 (one value per prompt when given as a list)")
        lens = [len(p) for p in prompts]
        gamma = draft.gamma if draft.enabled else 0
        limit = max_seq_len or self.model.args.max_position_embeddings
        longest = max(lens[b] + max_new[b] for b in range(B))
        if longest > limit:
            raise UserError(f"a prompt of {lens[int(max(range(B), key=lambda b: lens[b] + max_new[b]))]} tokens "
                            f"plus {max(max_new)} new tokens does not fit max_seq_len {limit}: shorten the "
                            "prompt, lower --max-new-tokens, or raise --max-seq-len")
        draft.warn_if_budget_covers(max(lens) + max(max_new))
        gammas = self._gammas(gamma, gamma_controller)
        self._setup(B, longest + max(gammas) + 1, draft)  # room for the largest round's writes

        dev = self.device
        tokens = torch.zeros(B, max(lens), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        prompt_len = torch.tensor(lens, device=dev)
        eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=dev)
        timer = PhaseTimer(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.synchronize(dev)
        t_start = time.perf_counter()

        last_logits = self.prefill(self.model, tokens, prompt_len, prefill_chunk, progress)
        first = step_output(self.model, last_logits, sampling.greedy)  # [B] ids or [B, V] logits
        if not sampling.greedy:
            first, _ = select_tokens(first, sampling)
        drafter = self.draft_model if draft.kind == "model" else self.model  # None: the draft is elsewhere
        draft_selected = None
        if draft.enabled and drafter is not None:
            if draft.kind == "model":
                self.prefill(self.draft_model, tokens, prompt_len, prefill_chunk, progress)
            picked = select_positions(drafter, draft, tokens, prompt_len, self.backend)
            if picked is not None:
                for buf, sel in zip(self._selected["draft"], picked):
                    buf.copy_(sel)
                draft_selected = self._selected["draft"]
        state = DecodeState.start(first, tokens[torch.arange(B), prompt_len - 1], prompt_len,
                                  torch.tensor(max_new, device=dev), eos,
                                  max(max_new) + MAX_KERNEL_QUERIES + 1)  # room for any round's writes
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prefill_s = time.perf_counter() - t_start
        window = None if draft.full else draft.window
        greedy = sampling.greedy  # greedy steps output argmax ids, sampling steps logits (step_output)
        if self.use_graphs:  # compile + capture every step shape now, outside the decode timing
            target_sizes = [g + 1 for g in sorted(gammas)]
            if not greedy:
                self.graphs.reserve_logits(B, max(target_sizes), self.model.args.vocab_size, dev)
            for T in target_sizes:
                self._graph(("target", T, greedy), self.model, B, T, None, None, False, greedy)
            if draft.enabled and drafter is not None:
                for T in (1, 2) if draft.kind == "model" else (1,):
                    self._graph(("draft", T, greedy), drafter, B, T, window, draft_selected, True, greedy)
        t_decode = time.perf_counter()
        capture_s = t_decode - t_start - prefill_s

        def target_step(toks, cache_len):  # -> ids [B, T] (greedy) or logits [B, T, V]
            return self._run(("target", toks.shape[1], greedy), self.model, toks, cache_len, None, None, False,
                             greedy)

        def draft_step(toks, cache_len):  # -> ids [B, 1] (greedy) or logits [B, 1, V]
            out = None
            if drafter is not None:
                out = self._run(("draft", toks.shape[1], greedy), drafter, toks, cache_len, window, draft_selected,
                                True, greedy)
            if self.tp is not None and draft.kind == "model":  # ranks outside --draft-ranks get its proposals
                out = self.tp.share_draft_output(out, greedy, B, self.model.args.vocab_size, dev)
            return out

        done = state.done.tolist()  # [B] bools on the host
        latency = [prefill_s if d else None for d in done]
        rounds, drafted = 0, 0
        while not all(done):
            running = done.count(False)
            g = gamma if gamma_controller is None else gamma_controller(state, rounds)
            speculative_round(state, target_step, draft_step if g else None, g, sampling, eos,
                              reread_prev=draft.kind == "model", accept_override=accept_override, timer=timer)
            rounds, drafted = rounds + 1, drafted + running * g
            done = state.done.tolist()  # the one host synchronisation (one transfer) per round
            now = time.perf_counter() - t_start
            latency = [now if d and t is None else t for d, t in zip(done, latency)]
        decode_s = time.perf_counter() - t_decode

        n_out = state.n_out.tolist()
        out = state.out.tolist()
        stats = GenerationStats(
            batch_size=B, prompt_tokens=lens, new_tokens=n_out, prefill_s=prefill_s, decode_s=decode_s,
            capture_s=capture_s, latency_s=latency, rounds=rounds, gamma=gamma, accepted=int(state.accepted.sum()), drafted=drafted,
            seq_rounds=int(state.rounds.sum()),
            phase_s=timer.totals() if gamma else {}, peak_memory_bytes=peak_memory_bytes(dev))
        return GenerationResult(tokens=[out[b][:n_out[b]] for b in range(B)], stats=stats)
