"""Load, prefill, capture, and run the generation loop with statistics.

The loop is speculative_round() over a DecodeState; plain decoding is the same loop with gamma 0
and no drafter. Who drafts, through which view, is the Drafter's business (drafters.py); how a
step runs is the StepRunner's (steps.py): on CUDA every fixed-shape step (verify: gamma+1 tokens;
draft: 1 token, 2 for a standalone draft's first step) is compiled and captured as a CUDA graph
over static buffers, and the host synchronises once per round, to read which sequences are done.
On CPU the same steps run eagerly.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from tqdm.auto import tqdm

from .attention import MAX_KERNEL_QUERIES, AttentionView, resolve_backend
from .config import ModelArgs
from .drafters import Drafter, make_drafter
from .drafting import DraftConfig
from .errors import UserError
from .model import Transformer
from .sampling import SamplingParams, select_tokens
from .speculative import DecodeState, speculative_round
from .timing import PhaseTimer
# Re-exported: bench.py and the tests import these from the engine.
from .steps import (CAPTURE_SCRATCH, KV_BUCKET, CapturedStep, StepGraphs, StepRunner, StepSpec,  # noqa: F401
                    bucketed_kv_limit, copy_into_shared, forward_step, step_output)


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


# ---- statistics -----------------------------------------------------------------------------------
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
class GammaController(Protocol):
    """--gamma auto (autogamma.AutoGamma): the gamma of each round, 0 for plain decoding."""

    choices: frozenset  # every gamma __call__ may return: a verification step is captured for each

    def __call__(self, state: DecodeState, round_idx: int) -> int: ...


class AcceptanceOverride(Protocol):
    """bench's --simulate-acceptance (random weights only): n accepted [B] -> the counts to use."""

    def __call__(self, n: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class Batch:
    """One generate() call's prompts, staged on the device, and its limits."""
    tokens: torch.Tensor  # [B, L_max] prompts, ragged: padding sits after each prompt
    prompt_len: torch.Tensor  # [B]
    lens: list  # prompt lengths on the host
    max_new: list  # per sequence token limit
    eos: torch.Tensor  # [E] stop ids ([-1] when none)
    gamma: int  # the draft length (0: plain decoding)
    gammas: set  # every gamma a round may use

    @property
    def size(self) -> int:
        return len(self.lens)

    @property
    def longest(self) -> int:
        """The most positions any sequence needs: its prompt plus its new tokens."""
        return max(n + m for n, m in zip(self.lens, self.max_new))


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
        backend = resolve_backend(attention, self.device)
        on_cuda = self.device.type == "cuda"
        use_graphs = on_cuda if use_graphs is None else use_graphs
        if use_graphs and not on_cuda:
            raise UserError("CUDA graphs need a CUDA device")
        if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
            raise UserError(f"draft vocabulary ({draft_model.args.vocab_size}) differs from the target's "
                            f"({model.args.vocab_size}): the draft must share the target's tokenizer")
        self.runner = StepRunner(backend, self.device, on_cuda if compile is None else compile, use_graphs,
                                 kv_bucket)
        self._cache_shape = None  # (batch, slots) of the allocated caches
        self._draft_view = self._selection = None  # the captured draft steps' view_key and buffers

    # The execution settings live in the runner; these read them (bench reports them).
    backend = property(lambda self: self.runner.backend)
    compile = property(lambda self: self.runner.compile)
    use_graphs = property(lambda self: self.runner.use_graphs)
    graphs = property(lambda self: self.runner.graphs)

    # -- cache size -----------------------------------------------------------------------------------
    @staticmethod
    def cache_slots(seq_len: int) -> int:
        """Positions allocated for sequences of up to seq_len tokens: rounded up to 256, so repeated
        runs of nearby lengths reuse the cache and its graphs, plus the capture scratch slots."""
        return -(-seq_len // 256) * 256 + CAPTURE_SCRATCH

    def _models(self) -> list[Transformer]:
        return [self.model] + ([self.draft_model] if self.draft_model is not None else [])

    def cache_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes of the KV caches (target and standalone draft) generate() allocates for this shape."""
        per_slot = sum(m.args.n_layers * 2 * m.args.n_kv_heads * m.args.head_dim for m in self._models())
        return per_slot * batch * self.cache_slots(seq_len) * self.dtype.itemsize

    def why_not_fits(self, batch: int, seq_len: int, headroom: float = 0.92) -> Optional[str]:
        """None, or why caches of (batch, seq_len) plus the weights cannot fit in `headroom` of the GPU
        (room is left for activations, logits and graph pools). Checked before allocating; None on CPU."""
        if self.device.type != "cuda":
            return None
        kv = self.cache_bytes(batch, seq_len)
        weights = sum(p.numel() * p.element_size() for m in self._models() for p in m.parameters())
        total = torch.cuda.get_device_properties(self.device).total_memory
        if weights + kv > headroom * total:
            return (f"KV cache {kv / 2**30:.1f} GiB + weights {weights / 2**30:.1f} GiB > {headroom:.0%} of "
                    f"{total / 2**30:.0f} GiB")
        return None

    # -- setup --------------------------------------------------------------------------------------
    def _setup(self, batch: int, seq_len: int, drafter: Optional[Drafter]) -> None:
        """Caches depend on (batch, seq_len) only; the draft's selection buffers and captured draft
        steps on its view. Each is rebuilt only when its own key changes, so plain and speculative
        runs (--compare, bench sweeps) share one cache and the target's graphs."""
        shape = (batch, self.cache_slots(seq_len))
        if shape != self._cache_shape:
            # Release the old caches and every graph that points at them before allocating: at long
            # context the KV cache is most of the memory, and two of them at once would not fit.
            self._cache_shape = self._draft_view = self._selection = None
            self.graphs.drop()  # and with them their memory pool: the next capture starts a new one
            for model in self._models():
                model.setup_caches(*shape, self.dtype, self.device)
            self._cache_shape = shape  # only once allocation succeeded
        if drafter is None:
            return
        if drafter.view_key != self._draft_view:
            self.graphs.drop("draft")  # captured draft steps read the old model / buffers
            self._selection = drafter.new_selection(batch, self.device)
            self._draft_view = drafter.view_key
        drafter.selection = self._selection

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
                 accept_override: Optional[AcceptanceOverride] = None,
                 gamma_controller: Optional[GammaController] = None) -> GenerationResult:
        """prompts: token-id lists (ragged). max_new_tokens: int or one per prompt."""
        drafter = make_drafter(self.model, self.draft_model, draft, self.tp)
        batch = self._stage(prompts, max_new_tokens, draft, eos_ids, max_seq_len, gamma_controller)
        self._setup(batch.size, batch.longest + max(batch.gammas) + 1, drafter)  # room for the largest round
        timer = PhaseTimer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start = self._sync_time()
        state = self._prefill(batch, drafter, sampling, prefill_chunk, progress)
        prefill_s = self._sync_time() - t_start
        if self.use_graphs:  # compile + capture every step shape now, outside the decode timing
            self._capture(batch, drafter, sampling.greedy)
        t_decode = time.perf_counter()

        def target_step(tokens, cache_len):  # -> ids [B, T] (greedy) or logits [B, T, V]
            spec = StepSpec("target", tokens.shape[1], greedy=sampling.greedy)
            return self.runner.run(spec, self.model, tokens, cache_len)

        def draft_step(tokens, cache_len):  # -> ids [B, 1] (greedy) or logits [B, 1, V]
            return drafter.step(self.runner, tokens, cache_len, sampling.greedy)

        def one_round(round_idx: int) -> int:
            g = batch.gamma if gamma_controller is None else gamma_controller(state, round_idx)
            speculative_round(state, target_step, draft_step if g else None, g, sampling, batch.eos,
                              reread_prev=drafter is not None and drafter.reread_prev,
                              accept_override=accept_override, timer=timer)
            return g

        rounds, drafted, latency = self._decode(state, one_round, t_start, prefill_s)
        decode_s = time.perf_counter() - t_decode
        n_out, out = state.n_out.tolist(), state.out.tolist()
        stats = GenerationStats(
            batch_size=batch.size, prompt_tokens=batch.lens, new_tokens=n_out, prefill_s=prefill_s,
            decode_s=decode_s, capture_s=t_decode - t_start - prefill_s, latency_s=latency, rounds=rounds,
            gamma=batch.gamma, accepted=int(state.accepted.sum()), drafted=drafted,
            seq_rounds=int(state.rounds.sum()), phase_s=timer.totals() if batch.gamma else {},
            peak_memory_bytes=peak_memory_bytes(self.device))
        return GenerationResult(tokens=[out[b][:n] for b, n in enumerate(n_out)], stats=stats)

    def _stage(self, prompts: list, max_new_tokens, draft: DraftConfig, eos_ids, max_seq_len: Optional[int],
               controller: Optional[GammaController]) -> Batch:
        """Check the request against the model's limits and put the prompts on the device."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt must have at least one token")
        B = len(prompts)
        max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(max_new) != B or min(max_new) < 1:
            raise UserError("--max-new-tokens must be >= 1 (one value per prompt when given as a list)")
        lens = [len(p) for p in prompts]
        limit = max_seq_len or self.model.args.max_position_embeddings
        worst = max(range(B), key=lambda b: lens[b] + max_new[b])
        if lens[worst] + max_new[worst] > limit:
            raise UserError(f"a prompt of {lens[worst]} tokens plus {max(max_new)} new tokens does not fit "
                            f"max_seq_len {limit}: shorten the prompt, lower --max-new-tokens, or raise "
                            "--max-seq-len")
        draft.warn_if_budget_covers(max(lens) + max(max_new))
        tokens = torch.zeros(B, max(lens), dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        gamma = draft.gamma if draft.enabled else 0
        return Batch(tokens=tokens, prompt_len=torch.tensor(lens, device=self.device), lens=lens,
                     max_new=max_new, eos=torch.tensor(sorted(set(eos_ids)) or [-1], device=self.device),
                     gamma=gamma, gammas=set(controller.choices) if controller is not None else {gamma})

    def _sync_time(self) -> float:
        """perf_counter after the device finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _prefill(self, batch: Batch, drafter: Optional[Drafter], sampling: SamplingParams, chunk: int,
                 progress: bool) -> DecodeState:
        """Prefill the target (and a standalone draft), pick the draft's keys, emit the first token."""
        last_logits = self.prefill(self.model, batch.tokens, batch.prompt_len, chunk, progress)
        first = step_output(self.model, last_logits, sampling.greedy)  # [B] ids or [B, V] logits
        if not sampling.greedy:
            first, _ = select_tokens(first, sampling)
        if drafter is not None:
            def prefill(model, tokens, prompt_len):  # the drafter's own model, if it has one
                self.prefill(model, tokens, prompt_len, chunk, progress)

            drafter.prefill(prefill, batch.tokens, batch.prompt_len)
            drafter.prepare(batch.tokens, batch.prompt_len, self.backend)
        last_prompt_token = batch.tokens[torch.arange(batch.size), batch.prompt_len - 1]  # [B]
        return DecodeState.start(first, last_prompt_token, batch.prompt_len,
                                 torch.tensor(batch.max_new, device=self.device), batch.eos,
                                 max(batch.max_new) + MAX_KERNEL_QUERIES + 1)  # room for any round's writes

    def _capture(self, batch: Batch, drafter: Optional[Drafter], greedy: bool) -> None:
        """Compile and capture every step this run can take: a verification per gamma, the drafter's."""
        target = [StepSpec("target", g + 1, greedy=greedy) for g in sorted(batch.gammas)]
        if not greedy:
            self.graphs.reserve_logits(batch.size, max(s.n_tokens for s in target), self.model.args.vocab_size,
                                       self.device)
        for spec in target:
            self.runner.captured(spec, self.model, batch.size)
        for spec in drafter.step_specs(greedy) if drafter is not None else ():
            self.runner.captured(spec, drafter.model, batch.size, drafter.selection)

    @staticmethod
    def _decode(state: DecodeState, one_round: Callable[[int], int], t_start: float,
                prefill_s: float) -> tuple[int, int, list]:
        """Run rounds until every sequence is done -> (rounds, draft tokens proposed, latency per
        sequence). The done flags are the one host synchronisation (one transfer) per round."""
        done = state.done.tolist()  # [B] bools on the host
        latency = [prefill_s if d else None for d in done]
        rounds, drafted = 0, 0
        while not all(done):
            running = done.count(False)
            gamma = one_round(rounds)
            rounds, drafted = rounds + 1, drafted + running * gamma
            done = state.done.tolist()
            now = time.perf_counter() - t_start
            latency = [now if d and t is None else t for d, t in zip(done, latency)]
        return rounds, drafted, latency
