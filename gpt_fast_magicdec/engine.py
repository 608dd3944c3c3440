"""The engine: a target model (and an optional standalone draft), their static caches, the steps
they run, and generation over them.

  engine.generate(prompts, 64, draft=DraftConfig(kind="self"))     all prompts at once, in order
  for c in engine.stream(prompts, 64, slots=32, draft=...): ...    a job: completions as they finish
  engine.run_batch(texts, 64, out="out.jsonl", resume=True)        a batch run: a resumable output file

A job (job.py) keeps `slots` rows busy: each round is speculative.speculative_round over every
slot, and a finished slot takes the next prompt. How a step runs is the StepRunner's (steps.py):
on CUDA every fixed-shape step (verification: gamma + 1 tokens; a drafter's steps) is compiled and
captured as a CUDA graph over static buffers, and the host synchronises once per round, to read
which sequences are done. On CPU the same steps run eagerly. Who drafts, and through which view,
is the drafter's business (drafters/): the engine keeps one per DraftConfig for as long as the
cache shape holds, so its selection buffers and captured steps stay valid.
"""
from __future__ import annotations

import time
from typing import Optional, Union

import torch

from .attention import resolve_backend
from .config import ModelArgs
from .drafters import DraftContext, Drafter, make_drafter
from .drafting import DraftConfig
from .errors import ParameterError
from .job import Job
from .memory import fits_reason, kv_cache_bytes
from .model import Transformer
from .prefill import prefill
from .sampling import GREEDY, SamplingParams
from .stats import GenerationResult
from .steps import CAPTURE_SCRATCH, KV_BUCKET, Step, StepRunner, StepSpec


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


class Engine:
    """Target model (+ optional standalone draft model), caches, captured steps, generation.

    args, draft_args: the models' whole shapes (under tensor parallelism `model` holds one rank's
    shard and model.args its local shape; the cost model and reports need the whole one)."""

    def __init__(self, model: Transformer, *, draft_model: Optional[Transformer] = None,
                 attention: str = "auto", compile: Optional[bool] = None, use_graphs: Optional[bool] = None,
                 tp=None, kv_bucket: int = KV_BUCKET, args: Optional[ModelArgs] = None,
                 draft_args: Optional[ModelArgs] = None, tokenizer=None, source: Optional[str] = None,
                 draft_source: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer  # batch runs encode text prompts and decode completions with it
        # What the models are (a checkpoint's path, a preset's random weights): part of the options
        # a batch run's output records, so a resume with another model is refused.
        self.source, self.draft_source = source, draft_source
        self.draft_model = draft_model  # None on ranks outside --draft-ranks under tensor parallelism
        self.tp = tp  # tp.TensorParallel under torchrun, else None; the models come sharded already
        self.args = args or model.args
        self.draft_args = draft_args or (draft_model.args if draft_model is not None else None)
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype
        backend = resolve_backend(attention, self.device)
        on_cuda = self.device.type == "cuda"
        use_graphs = on_cuda if use_graphs is None else use_graphs
        if use_graphs and not on_cuda:
            raise ParameterError("{use_graphs} needs a CUDA device (CUDA graphs)")
        if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
            raise ParameterError(f"the {{draft_model}}'s vocabulary ({draft_model.args.vocab_size}) differs from the "
                                 f"target's ({model.args.vocab_size}): the draft must share the target's tokenizer")
        self.runner = StepRunner(backend, self.device, on_cuda if compile is None else compile, use_graphs,
                                 kv_bucket)
        self._cache_shape = None  # (batch, slots) of the allocated caches
        self._drafters: dict[DraftConfig, Drafter] = {}  # built for the current cache shape
        self._verify_steps: dict[tuple[int, bool], Step] = {}

    # The execution settings live in the runner; these read them (bench reports them).
    backend = property(lambda self: self.runner.backend)
    compile = property(lambda self: self.runner.compile)
    use_graphs = property(lambda self: self.runner.use_graphs)
    graphs = property(lambda self: self.runner.graphs)

    # -- generation ---------------------------------------------------------------------------------
    def stream(self, prompts: list, max_new_tokens: Union[int, list], **options) -> Job:
        """A job over `prompts` (token-id lists, ragged): iterate it for a Completion per prompt as
        each finishes, then read its `stats`. slots=N decodes N prompts side by side and refills a
        slot as soon as its sequence stops; see job.Job for every option. Checked before any work."""
        return Job(self, prompts, max_new_tokens, **options)

    def run_batch(self, prompts: list, max_new_tokens: int = 128, *, out=None, resume: bool = False, **options):
        """A batch run (batch.py): prompts (texts, or token-id lists) through `slots` rows, each
        completion appended to `out` (JSONL) as it finishes; resume=True continues the run that wrote
        `out`, generating only what is missing. -> batch.BatchResult (completions, stats). Options:
        draft, sampling, slots, seed, eos_ids, prefill_chunk, max_seq_len, refill, gamma_auto,
        progress, compare, repeats, prompt_file, layout (see batch.BatchRun)."""
        from .batch import run_batch

        return run_batch(self, prompts, max_new_tokens, out=out, resume=resume, **options)

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: Union[int, list], sampling: SamplingParams = GREEDY,
                 draft: DraftConfig = DraftConfig(), eos_ids=(), prefill_chunk: int = 512,
                 max_seq_len: Optional[int] = None, progress: bool = False, **options) -> GenerationResult:
        """Every prompt at once (one slot each) -> their tokens in input order, and the statistics."""
        job = Job(self, prompts, max_new_tokens, sampling=sampling, draft=draft, eos_ids=eos_ids,
                  prefill_chunk=prefill_chunk, max_seq_len=max_seq_len, progress=progress, **options)
        completions = sorted(job, key=lambda c: c.index)
        return GenerationResult(tokens=[c.tokens for c in completions], stats=job.stats)

    # -- what a job runs ------------------------------------------------------------------------------
    def setup(self, batch: int, seq_len: int) -> None:
        """Caches for `batch` slots of up to seq_len positions. They (and the drafters and graphs
        that point at them) are rebuilt only when the shape changes, so plain and speculative jobs
        of one shape (--compare, bench sweeps) share one cache and the target's graphs."""
        shape = (batch, self.cache_slots(seq_len))
        if shape == self._cache_shape:
            return
        reason = self.why_not_fits(batch, seq_len)
        if reason is not None:
            raise ParameterError(f"{reason}: use fewer {{slots}}, shorter prompts or a lower {{max_new_tokens}} "
                                 "(or more tensor-parallel ranks)")
        # Release the old caches and everything that points at them before allocating: at long
        # context the KV cache is most of the memory, and two of them at once would not fit.
        self._cache_shape = None
        self._drafters.clear()
        self._verify_steps.clear()
        self.graphs.clear()  # and with them their memory pool: the next capture starts a new one
        for model in self._models():
            model.setup_caches(*shape, self.dtype, self.device)
        self._cache_shape = shape  # only once allocation succeeded

    def drafter(self, config: DraftConfig) -> Optional[Drafter]:
        """The drafter of `config` for the current cache shape (built on first use, then kept)."""
        if config not in self._drafters:
            ctx = DraftContext(self.model, self.draft_model, self.runner, self._cache_shape[0], self.tp)
            self._drafters[config] = make_drafter(config, ctx)
        return self._drafters[config]

    def verify(self, tokens: torch.Tensor, cache_len: torch.Tensor, greedy: bool,
               scores: Optional[list] = None) -> torch.Tensor:
        """The target over tokens [B, T] at cache_len [B] -> ids [B, T] (greedy) or logits [B, T, V];
        scores (a re-selecting drafter's buffers, per layer [B, H_kv, S_max]) get the attention mass."""
        return self.runner.run(self._verify_step(tokens.shape[1], greedy, scores), tokens, cache_len)

    def _verify_step(self, n_tokens: int, greedy: bool, scores: Optional[list] = None) -> Step:
        # A scoring verification is its own step (and graph), bound to the drafter's buffers; the
        # drafters and their buffers live exactly as long as these steps (both go at setup).
        key = (n_tokens, greedy, None if scores is None else id(scores))
        if key not in self._verify_steps:
            self._verify_steps[key] = Step(StepSpec("target", n_tokens, greedy=greedy), self.model, scores=scores)
        return self._verify_steps[key]

    def capture(self, batch: int, gammas: set, drafter: Optional[Drafter], greedy: bool) -> None:
        """Compile and capture every step a job can take: a verification per gamma, the drafter's."""
        if not greedy:
            self.graphs.reserve_logits(batch, max(gammas) + 1, self.model.args.vocab_size, self.device)
        scores = drafter.score_buffers() if drafter is not None else None
        for gamma in sorted(gammas):
            self.runner.captured(self._verify_step(gamma + 1, greedy), batch)
            if scores is not None:
                self.runner.captured(self._verify_step(gamma + 1, greedy, scores), batch)
        for step in drafter.steps(greedy) if drafter is not None else ():
            self.runner.captured(step, batch)

    def sync_time(self) -> float:
        """perf_counter after the device finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.no_grad()
    def next_token_logits(self, tokens: list) -> torch.Tensor:
        """The target's fp32 logits [V] for the token after `tokens`, by prefilling them into cache
        row 0 (which no finished job needs any more). Under tensor parallelism every rank calls it."""
        if self._cache_shape is None or self._cache_shape[1] < len(tokens) + 1:
            self.setup(1, len(tokens) + 1)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, L]
        rows = torch.zeros(1, dtype=torch.long, device=self.device)
        logits = prefill(self.model, ids, torch.tensor([len(tokens)], device=self.device), self.backend, 2048,
                         rows=rows)[0]  # [V] (this rank's slice under TP)
        return logits if self.model.vocab_shard is None else self.model.vocab_shard.gather(logits)

    # -- cache size -----------------------------------------------------------------------------------
    @staticmethod
    def cache_slots(seq_len: int) -> int:
        """Positions allocated for sequences of up to seq_len tokens: rounded up to 256, so repeated
        runs of nearby lengths reuse the cache and its graphs, plus the capture scratch slots."""
        return -(-seq_len // 256) * 256 + CAPTURE_SCRATCH

    def _models(self) -> list[Transformer]:
        return [self.model] + ([self.draft_model] if self.draft_model is not None else [])

    def cache_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes of the KV caches (target and standalone draft) a job of this shape allocates."""
        return self._kv_bytes(batch, self.cache_slots(seq_len))

    def _kv_bytes(self, batch: int, slots: int) -> int:
        return sum(kv_cache_bytes(m.args, batch, slots, self.dtype) for m in self._models())  # m.args: this rank's

    def _allocated_cache_bytes(self) -> int:
        return 0 if self._cache_shape is None else self._kv_bytes(*self._cache_shape)

    def why_not_fits(self, batch: int, seq_len: int, headroom: float = 0.92) -> Optional[str]:
        """None, or why caches of (batch, seq_len) cannot be allocated, checked before allocating: on a
        GPU with the weights in `headroom` of its memory (room is left for activations, logits and
        graph pools), on the CPU against the memory available now (the caches they replace freed)."""
        kv = self.cache_bytes(batch, seq_len)
        if self.device.type != "cuda":
            held = self._allocated_cache_bytes()
            return fits_reason(f"the KV cache for {batch} slots x {self.cache_slots(seq_len)} positions", kv,
                               self.device, freed_bytes=held)
        weights = sum(p.numel() * p.element_size() for m in self._models() for p in m.parameters())
        total = torch.cuda.get_device_properties(self.device).total_memory
        if weights + kv > headroom * total:
            return (f"KV cache {kv / 2**30:.1f} GiB + weights {weights / 2**30:.1f} GiB > {headroom:.0%} of "
                    f"{total / 2**30:.0f} GiB")
        return None
