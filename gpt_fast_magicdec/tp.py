"""Tensor parallelism and data-parallel replicas under `torchrun`, gpt-fast style.

Weights are sliced once at load time; the forward pass is unchanged except for one all-reduce
after each row-parallel projection (a forward hook on `wo` and `w2`, written with functional
collectives so torch.compile traces it and CUDA graphs capture it). Each rank builds its model from
a *local* ModelArgs (its query heads, its KV heads, its MLP columns; head_dim explicit), so its KV
cache holds only its own KV heads.

Which rank holds what, for W ranks, H query heads, H_kv KV heads, I MLP columns:
  query heads  split: rank r holds heads [r*H/W, (r+1)*H/W). H % W != 0 (W > H included) is an error.
  KV heads     split when H_kv % W == 0: rank r holds [r*H_kv/W, (r+1)*H_kv/W).
               replicated when W % H_kv == 0 (W > H_kv, e.g. 8 ranks and 2 KV heads): each KV head on
               W/H_kv consecutive ranks; rank r holds KV head r // (W/H_kv), and all of its H/W query
               heads belong to that KV head's group. Otherwise an error.
  MLP          w1/w3 split by output columns, w2 by input rows; I % W != 0 is an error.
  q/k/v bias   sliced with their weights; so are w1/w3 biases (Llama mlp_bias).
  wo, w2 bias  (Llama / Qwen3 attention_bias, Llama mlp_bias) replicated and added once, after the
               all-reduce: each rank's partial product is bias-free, or the sum would hold W biases.
  q/k norms    (Qwen3) replicated: one weight of head_dim, shared by every head.
  output head  split by vocabulary rows (VocabShard): rank r holds rows [r*V//W, (r+1)*V//W) (sizes
               differ by at most one when W does not divide V) and computes only those logits, so
               no rank reads the whole head. Greedy steps combine each rank's (max, index) pair;
               sampling gathers the full logits, and every rank samples the same tokens. Tied
               embeddings stay replicated; the head slice is a view of them.
  replicated   embeddings, norms.

A standalone draft is sharded over `--draft-ranks` (default: every rank) with its own process
group; see TensorParallel.share_draft_output for how its proposals reach the other ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .checkpoint import first_line, load_model, random_model
from .config import ModelArgs
from .errors import UserError


# ---- process groups ----------------------------------------------------------------------------------
def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or not launched by torchrun. Safe to call before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_from_env(device) -> tuple[int, int]:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) -> (rank, world_size).

    (0, 1) without torchrun (or with one process): nothing is initialised."""
    world = env_world_size()
    if world == 1:
        return 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", rank=rank, world_size=world,
                                    device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world


def parse_draft_ranks(text: Optional[str], world_size: int) -> tuple[int, ...]:
    """--draft-ranks "0,1" -> (0, 1); None -> every rank. Raises the same UserError on every rank."""
    if text is None:
        return tuple(range(world_size))
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise UserError(f"--draft-ranks must be comma-separated rank numbers like 0,1; got {text!r}") from None
    if len(set(ranks)) != len(ranks):
        raise UserError(f"--draft-ranks {text} names a rank twice")
    outside = [r for r in ranks if not 0 <= r < world_size]
    if outside:
        raise UserError(f"--draft-ranks {text}: rank {outside[0]} is outside the world of {world_size} "
                        f"ranks (0..{world_size - 1})")
    return tuple(sorted(ranks))


# ---- the sharding plan --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What one rank of `world_size` holds of a model: ranges over the *global* heads / columns."""

    rank: int
    world_size: int
    local_args: ModelArgs  # the shape this rank's Transformer is built with
    q_heads: range
    kv_heads: range
    ffn: range  # MLP hidden columns
    kv_replicas: int  # ranks holding each KV head: 1 when split, world_size / H_kv when replicated


def valid_world_sizes(args: ModelArgs) -> list[int]:
    return [w for w in range(1, args.n_heads + 1)
            if args.n_heads % w == 0 and (args.n_kv_heads % w == 0 or w % args.n_kv_heads == 0)
            and args.intermediate_size % w == 0]


def plan_shards(args: ModelArgs, world_size: int, rank: int = 0, what: str = "the model") -> ShardPlan:
    """Which heads and columns `rank` of `world_size` holds; a clear UserError when the model cannot
    be split that way. Pure arithmetic on the config: every rank reaches the same verdict."""
    H, H_kv, I = args.n_heads, args.n_kv_heads, args.intermediate_size
    hint = f"valid sizes for {what}: {', '.join(map(str, valid_world_sizes(args)))}"
    if H % world_size:
        raise UserError(f"{what} has {H} query heads, which {world_size} ranks cannot split evenly "
                        f"(each rank needs a whole, equal number of heads); {hint}")
    if H_kv % world_size == 0:  # split the KV heads
        kv_local, replicas = H_kv // world_size, 1
        kv_first = rank * kv_local
    elif world_size % H_kv == 0:  # replicate each KV head on world_size / H_kv ranks
        kv_local, replicas = 1, world_size // H_kv
        kv_first = rank // replicas
    else:
        raise UserError(f"{what} has {H_kv} KV heads: {world_size} ranks can neither split them evenly nor "
                        f"replicate each on the same number of ranks; {hint}")
    if I % world_size:
        raise UserError(f"{what} has an MLP of {I} columns, which {world_size} ranks cannot split evenly; {hint}")
    q_local, f_local = H // world_size, I // world_size
    q_heads = range(rank * q_local, (rank + 1) * q_local)
    kv_heads = range(kv_first, kv_first + kv_local)
    # GQA: query head h reads KV head h // (H / H_kv). Both rules keep that KV head on this rank, at
    # the local index the local model's own grouping (local head j -> j // (H_l / H_kv_l)) picks.
    assert all(kv_heads[(h - q_heads.start) // (q_local // kv_local)] == h // (H // H_kv) for h in q_heads)
    local = dataclasses.replace(args, n_heads=q_local, n_kv_heads=kv_local, head_dim=args.head_dim,
                                intermediate_size=f_local)
    return ShardPlan(rank, world_size, local, q_heads, kv_heads, range(rank * f_local, (rank + 1) * f_local),
                     replicas)


# Per-layer tensors that are sliced: suffix -> (which plan range, the dimension it indexes).
# Column-parallel layers (q/k/v, w1/w3) keep their output rows; row-parallel (wo, w2) their input columns.
_SLICED = {
    "attention.wq.weight": ("q", 0), "attention.wq.bias": ("q", 0),
    "attention.wk.weight": ("kv", 0), "attention.wk.bias": ("kv", 0),
    "attention.wv.weight": ("kv", 0), "attention.wv.bias": ("kv", 0),
    "attention.wo.weight": ("q", 1),
    "feed_forward.w1.weight": ("ffn", 0), "feed_forward.w3.weight": ("ffn", 0),
    "feed_forward.w1.bias": ("ffn", 0), "feed_forward.w3.bias": ("ffn", 0),
    "feed_forward.w2.weight": ("ffn", 1),
}


def shard_state_dict(plan: ShardPlan, state_dict: dict) -> dict:
    """The full engine state dict -> this rank's slices (copies, so the full tensors can be freed)."""
    D = plan.local_args.head_dim
    rows = {"q": slice(plan.q_heads.start * D, plan.q_heads.stop * D),
            "kv": slice(plan.kv_heads.start * D, plan.kv_heads.stop * D),
            "ffn": slice(plan.ffn.start, plan.ffn.stop)}
    out = {}
    for name, t in state_dict.items():
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else None
        if suffix in _SLICED:
            which, dim = _SLICED[suffix]
            t = t.narrow(dim, rows[which].start, rows[which].stop - rows[which].start).clone(
                memory_format=torch.contiguous_format)
        out[name] = t
    return out


def install_all_reduce(model, group) -> None:
    """Sum the row-parallel partial outputs of wo and w2 over `group` (gpt-fast's hook). Functional
    collectives return a tensor (no in-place side effect), which is what compile and graphs need.
    A bias of wo / w2 moves out of the linear layer into `reduced_bias`, added after the sum."""
    def all_reduce(module, _inputs, output):
        out = funcol.all_reduce(output, "sum", group)
        return out if module.reduced_bias is None else out + module.reduced_bias

    for layer in model.layers:
        for linear in (layer.attention.wo, layer.feed_forward.w2):
            linear.reduced_bias = linear.bias
            linear.bias = None  # the local product carries no bias
            linear.register_forward_hook(all_reduce)


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + size) of a `vocab`-row output head split over `group`.

    Everything here is functional collectives on static shapes, so compiled steps and CUDA graphs
    capture it. Rank r holds rows [r*V//W, (r+1)*V//W)."""

    start: int
    size: int
    vocab: int
    world_size: int
    group: object

    @classmethod
    def plan(cls, vocab: int, rank: int, world_size: int, group) -> "VocabShard":
        if vocab < world_size:
            raise UserError(f"a vocabulary of {vocab} tokens cannot be split over {world_size} ranks")
        start, stop = rank * vocab // world_size, (rank + 1) * vocab // world_size
        return cls(start, stop - start, vocab, world_size, group)

    def sizes(self) -> list[int]:
        W, V = self.world_size, self.vocab
        return [(r + 1) * V // W - r * V // W for r in range(W)]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Local logits [..., size] -> the global argmax ids [...], equal to torch.argmax over the
        full logits: the largest value, ties to the lowest global index. Only [..., 2] per rank
        crosses the wire (max and index, the index exact in fp32 below 2^24)."""
        best, idx = logits.max(dim=-1)  # [...] (max returns the first maximal index locally)
        pair = torch.stack([best, (idx + self.start).float()], dim=-1)  # [..., 2]
        every = funcol.all_gather_tensor(pair.unsqueeze(0), 0, self.group)  # [W, ..., 2]
        values, indices = every[..., 0], every[..., 1]
        top = values.max(dim=0).values  # [...]
        # Among ranks holding the top value, the lowest global index (ranks are in vocab order).
        candidates = torch.where(values == top, indices, torch.full_like(indices, float("inf")))
        return candidates.min(dim=0).values.long()

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Local logits [..., size] -> the full logits [..., vocab] on every rank (sampling needs the
        whole distribution). Shards are padded to one size for the all-gather, then trimmed."""
        width = max(self.sizes())
        padded = torch.nn.functional.pad(logits, (0, width - self.size))  # [..., width]
        every = funcol.all_gather_tensor(padded.unsqueeze(0), 0, self.group)  # [W, ..., width]
        return torch.cat([every[r, ..., :n] for r, n in enumerate(self.sizes())], dim=-1)  # [..., V]


def shard_output_head(model, rank: int, world_size: int, group) -> None:
    """Keep only this rank's vocabulary rows of the output head (a view when tied to the embedding,
    which stays whole: every rank embeds every token)."""
    shard = VocabShard.plan(model.args.vocab_size, rank, world_size, group)
    weight = model.output.weight.detach()  # [V, dim]
    rows = weight[shard.start:shard.start + shard.size]  # [size, dim]
    if not model.args.tie_word_embeddings:
        rows = rows.clone()  # the full untied head can then be freed
    model.output.weight = torch.nn.Parameter(rows, requires_grad=False)
    model.vocab_shard = shard


@dataclasses.dataclass(frozen=True)
class ShardGroup:
    """The ranks one model is sharded over, seen from one of them."""

    rank: int  # index within the group
    size: int
    group: object  # the ProcessGroup
    what: str  # "the target model" / "the draft model", for error messages

    def plan(self, args: ModelArgs) -> ShardPlan:
        return plan_shards(args, self.size, self.rank, self.what)

    def shard(self, args: ModelArgs, state_dict: dict) -> tuple[ModelArgs, dict]:
        """The `shard` hook of checkpoint.load_model."""
        plan = self.plan(args)
        return plan.local_args, shard_state_dict(plan, state_dict)

    def parallelize(self, model):
        if self.size > 1:
            install_all_reduce(model, self.group)
            shard_output_head(model, self.rank, self.size, self.group)
        return model


# ---- the run ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """This process's place in a torchrun world of `replicas` x `tp_size` ranks: data-parallel
    replicas, each a tensor-parallel group of consecutive ranks (rank = replica * tp_size + tp_rank).
    Replicas share nothing while they decode: each serves its own share of a job's prompts."""

    rank: int
    world_size: int
    tp_size: int

    @property
    def replica(self) -> int:
        return self.rank // self.tp_size

    @property
    def replicas(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def leader(self) -> bool:
        """The replica's first rank: it writes the replica's output."""
        return self.tp_rank == 0


def parse_tp_size(tp_size: Optional[int], world_size: int) -> int:
    """--tp (default: the whole world, one replica) checked against the world size on every rank."""
    if tp_size is None:
        return world_size
    if tp_size < 1 or world_size % tp_size:
        raise UserError(f"--tp {tp_size} must divide the number of processes ({world_size}): the world is "
                        f"replicas x tp ranks; valid values: {', '.join(str(t) for t in range(1, world_size + 1) if world_size % t == 0)}")
    return tp_size


def start(device, tp_size: Optional[int] = None, draft_ranks: Optional[str] = None
          ) -> tuple[Optional[Layout], Optional["TensorParallel"]]:
    """Join torchrun's process group and split it -> (Layout, this rank's TensorParallel or None
    when its replica is one rank); (None, None) outside torchrun. Every check that needs no
    collective runs first, so a bad value fails on every rank instead of hanging."""
    world = env_world_size()
    tp_size = parse_tp_size(tp_size, world)
    ranks = parse_draft_ranks(draft_ranks, tp_size)
    rank, world = setup_from_env(device)
    if world == 1:
        return None, None
    layout = Layout(rank, world, tp_size)
    if tp_size == 1:
        return layout, None
    # new_group is collective: every rank creates every replica's groups, members or not.
    group = draft_group = None
    for replica in range(layout.replicas):
        base = replica * tp_size
        g = dist.group.WORLD if tp_size == world else dist.new_group(list(range(base, base + tp_size)))
        d = g if len(ranks) == tp_size else dist.new_group([base + r for r in ranks])
        if replica == layout.replica:
            group, draft_group = g, d
    return layout, TensorParallel(layout.tp_rank, tp_size, layout.replica * tp_size, group, ranks, draft_group)


@dataclasses.dataclass
class TensorParallel:
    """One replica's tensor-parallel group, seen from one of its ranks, and which of its ranks
    hold the standalone draft."""

    rank: int  # within the group
    world_size: int  # ranks in the group
    base: int  # the global rank of the group's rank 0
    group: object  # its ProcessGroup
    draft_ranks: tuple  # sorted group ranks holding the standalone draft (all of them by default)
    draft_group: object  # their ProcessGroup (the group itself when they are every rank)

    @property
    def target(self) -> ShardGroup:
        return ShardGroup(self.rank, self.world_size, self.group, "the target model")

    @property
    def holds_draft(self) -> bool:
        return self.rank in self.draft_ranks

    @property
    def draft(self) -> Optional[ShardGroup]:
        if not self.holds_draft:
            return None
        return ShardGroup(self.draft_ranks.index(self.rank), len(self.draft_ranks), self.draft_group,
                          "the draft model")

    def load_model(self, checkpoint: Path, device, dtype, draft: bool = False):
        shards = self.draft if draft else self.target
        return shards.parallelize(load_model(checkpoint, device, dtype, shard=shards.shard))

    def random_model(self, args: ModelArgs, device, dtype, seed: int):
        """Random weights of this rank's shard shape. The same seed on every rank keeps the replicated
        weights identical; the model as a whole differs from the single-process random model."""
        return self.target.parallelize(random_model(self.target.plan(args).local_args, device, dtype, seed))

    # -- keeping ranks in lock-step -----------------------------------------------------------------------
    def sum_over_ranks(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the group's ranks, in place (a re-selecting standalone draft's pooled
        attention mass: each rank holds the mass of its own heads)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)

    def share_draft_output(self, out: Optional[torch.Tensor], greedy: bool, batch: int, vocab: int,
                           device) -> torch.Tensor:
        """One draft step's output (greedy: ids [B, 1]; sampling: full logits [B, 1, V]), made
        available on every rank of the group.

        Only a draft on a subset of ranks needs this. Ranks outside --draft-ranks run no draft
        model; after each draft step they receive, from the first draft rank, the ids (greedy) or
        the logits (sampling). Every rank then runs the same sampling code on the same numbers with
        the same per-sequence random numbers (sampling.py), so draft draws, acceptance draws and
        corrections agree on all ranks with no per-round broadcast of the results."""
        if len(self.draft_ranks) == self.world_size:
            return out  # every rank ran the draft itself
        src = self.base + self.draft_ranks[0]  # broadcast names the source by its global rank
        if out is not None:
            shared = out.contiguous()
        elif greedy:
            shared = torch.empty(batch, 1, dtype=torch.long, device=device)
        else:
            shared = torch.empty(batch, 1, vocab, device=device)
        dist.broadcast(shared, src, group=self.group)
        return shared if out is None else out


def broadcast_object(obj):
    """Global rank 0's `obj` on every rank (e.g. a measured hardware profile every rank must agree
    on); `obj` itself outside torchrun."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def fail_together(layout: Optional[Layout]):
    """Run a rank-local block (loading, no collectives inside); if it fails on any rank, fail on all.

    After the block every rank gathers every rank's error. If any failed, all raise one UserError
    with the first failing rank's message (generate.py prints it on rank 0 only) and exit non-zero,
    instead of the healthy ranks waiting forever at their next collective. A failing rank whose
    error is not a UserError (a bug) re-raises it with its traceback."""
    if layout is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        error = e
    message = None if error is None else (str(error) if isinstance(error, UserError)
                                           else f"{type(error).__name__}: {first_line(error)}")
    messages = [None] * layout.world_size
    dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if error is not None and not isinstance(error, UserError):
        raise error
    rank, message = failed[0]
    if len(failed) < layout.world_size or len(set(m for _, m in failed)) > 1:
        message = f"rank {rank}: {message}"
    raise UserError(message) from error


# ---- leaving the process group ----------------------------------------------------------------------
class ExitAlone(SystemExit):
    """sys.exit for an exit one rank takes on its own in the middle of a run (Ctrl-C, SIGTERM, a
    write that failed, a peer that died): the other ranks may be inside a collective this rank will
    never join, so run_cli leaves without waiting for them at a barrier."""


# How gloo reports a collective whose peer is gone (killed, crashed, or left on its own exit).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank of the job is gone."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_GONE))


def shutdown(clean: bool = True) -> None:
    """Leave the torchrun process group deterministically: flush what this rank printed, wait at a
    barrier until every rank is done (`clean`: every rank reached the same exit; skipped after an
    unexpected exception on one rank, whose peers may be inside another collective), then destroy
    every group while all ranks are still alive, so no rank tears down while another still talks."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_cli(main) -> None:
    """Run a click `main()` as a script. Under torchrun, end the process right after shutdown()
    with os._exit, on every path (success, sys.exit after a UserError, a crash).

    Why not a normal interpreter exit: destroy_process_group only drops the registry's reference.
    Anything else holding the gloo group (the all-reduce hooks of the model, the draft's subgroup)
    releases it during interpreter teardown, when its C++ destructor finds gloo's threads still
    joinable and calls std::terminate: "terminate called without an active exception", SIGABRT,
    and torchrun reports a failed job after correct output (a few percent of runs, more under load).
    Everything the CLI writes is closed before main() returns, so skipping teardown loses nothing."""
    if env_world_size() == 1:
        main()
        return
    import os
    import sys
    import traceback

    try:
        main()
        code, clean = 0, True
    except ExitAlone as e:  # the peers may be mid-collective: no barrier
        code, clean = e.code, False
    except SystemExit as e:  # click's normal end, or our one-line error
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code, clean = (e.code if isinstance(e.code, int) else int(e.code is not None)), True
    except BaseException:  # a bug on this rank: keep its traceback
        traceback.print_exc()
        code, clean = 1, False
    shutdown(clean)
    os._exit(code)
