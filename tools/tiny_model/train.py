"""Train the bundled tiny Llama on the Gutenberg corpus, on CPU, in a fixed number of minutes.

    python -m tools.tiny_model.train --corpus ../shared/corpus/gutenberg-train.jsonl \\
        --out gpt_fast_magicdec/tiny/model --minutes 45 --seed 0

Steps, in order: train a SentencePiece BPE tokenizer on a sample of the training books; tokenize
every book; build the engine's own `Transformer` (GQA Llama); train it with AdamW, linear warmup
and a cosine schedule, on windows `[<s>] + text` cut at random from the training books, with a
context curriculum whose last phase is the full context; evaluate on fixed windows of the two
held-out books (`corpus.VALIDATION_BOOK_IDS`); write the model as a Hugging Face Llama directory
(`export.export_hf`) with `train_log.json` and `loss_curve.png` beside it.

Reproducibility: everything random comes from --seed. With --steps 0 (the default) the number of
steps is chosen from a timing of the first steps so the run fits in --minutes; that number is
logged, and re-running with `--steps N` and the same seed repeats the run exactly (same torch
build and thread count)."""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import click
import torch
import torch.nn.functional as F

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.model import Transformer

from .causal import FULL_CAUSAL, CausalView, causal_logits
from .corpus import (BOS_ID, DEFAULT_CORPUS, EOS_ID, read_books, repo_root,
                     split_books, tokenizer_sample, train_tokenizer)
from .export import export_hf, load_hf_model

FINAL_RESERVE_S = 30.0  # time kept back for the final evaluation, plot and export, on top of its estimate
SAFETY = 0.88  # fraction of the remaining time the step count is planned to fill (the CPU is shared)


# ---- data -----------------------------------------------------------------------------------------
def tokenize_books(sp, books: list[dict]) -> list[torch.Tensor]:
    """Each book encoded in one piece (as a prompt cut from it would be), int16 [N_tokens]."""
    return [torch.tensor(sp.encode(b["text"]), dtype=torch.int16) for b in books]


def with_bos(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """windows [B, L] of text -> (inputs [B, L] = <s> + text[:-1], targets [B, L] = text)."""
    bos = torch.full((windows.shape[0], 1), BOS_ID, dtype=torch.long)
    w = windows.long()
    return torch.cat([bos, w[:, :-1]], dim=1), w


def sample_batch(books: list[torch.Tensor], batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq_len] windows at uniform random positions of the training text: a book with
    probability proportional to its number of windows, then a uniform offset inside it."""
    n_windows = torch.tensor([max(0, len(b) - seq_len + 1) for b in books], dtype=torch.float64)
    which = torch.multinomial(n_windows, batch, replacement=True, generator=gen)
    rows = []
    for i in which.tolist():
        start = int(torch.randint(0, int(n_windows[i]), (1,), generator=gen))
        rows.append(books[i][start:start + seq_len])
    return torch.stack(rows)


def validation_windows(books: list[torch.Tensor], per_book: int, seq_len: int) -> torch.Tensor:
    """[len(books) * per_book, seq_len] windows evenly spaced through each held-out book."""
    rows = []
    for book in books:
        stride = (len(book) - seq_len) // per_book
        rows.extend(book[k * stride:k * stride + seq_len] for k in range(per_book))
    return torch.stack(rows)


def copy_unless_same(src: Path, dst: Path) -> None:
    """Copy a tokenizer file, doing nothing when a model is continued in place (src is dst)."""
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


# ---- model ----------------------------------------------------------------------------------------
def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) matrices, residual-output projections scaled by 1/sqrt(2 n_layers),
    norms at one."""
    residual_std = std / math.sqrt(2 * model.args.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, std)


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch: int = 2) -> float:
    """Mean next-token cross-entropy (nats) over every position of `windows` [N, L]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        inputs, targets = with_bos(windows[i:i + batch])
        logits = causal_logits(model, inputs)  # [b, L, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    model.train()
    return total / count


@torch.no_grad()
def score_window(model: Transformer, window: torch.Tensor, view: CausalView = FULL_CAUSAL) -> dict:
    """Per-position scores [L] of one held-out window [L]: "loss", the next-token cross-entropy;
    with a twin `view`, also "kl", KL(target || its streaming self-draft), and "agreement", 1 where
    their argmaxes agree (a single drafted token accepted by greedy verification)."""
    inputs, targets = with_bos(window[None])
    logits = causal_logits(model, inputs, view)  # [1, L, V], or [2, L, V] for a twin: target, then draft
    scores = {"loss": F.cross_entropy(logits[0], targets[0], reduction="none")}
    if view.twin:
        scores["kl"] = view_kl(logits[0], logits[1], reduction="none")
        scores["agreement"] = (logits[0].argmax(-1) == logits[1].argmax(-1)).float()
    return scores


def evaluate_self_draft(model: Transformer, windows: torch.Tensor, view: CausalView, from_position: int) -> dict:
    """How well the model drafts for itself through `view` (a twin CausalView), teacher-forced on
    held-out `windows` [N, L], averaged over positions >= from_position (`score_window`)."""
    model.eval()
    scores = [score_window(model, w, view) for w in windows]
    model.train()
    return {"view_kl": float(torch.cat([s["kl"][from_position:] for s in scores]).mean()),
            "argmax_agreement": float(torch.cat([s["agreement"][from_position:] for s in scores]).mean())}


def view_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(target || draft) between next-token distributions given as logits [N, V]: per position
    [N] (reduction "none"), or its sum or mean over the N positions."""
    log_p, log_q = torch.log_softmax(target_logits, -1), torch.log_softmax(draft_logits, -1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"none": per_position, "sum": per_position.sum(), "mean": per_position.mean()}[reduction]


def train_step_loss(model: Transformer, batch: torch.Tensor, teacher: Optional[Transformer] = None,
                    distill_weight: float = 1.0, self_draft: Optional[CausalView] = None,
                    self_draft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimise, the plain next-token cross-entropy).

    With a `teacher` the loss mixes cross-entropy against the teacher's next-token distribution
    (weight `distill_weight`; forward KL plus the teacher's entropy, a constant) with cross-entropy
    against the text: a draft that imitates its target's distribution proposes what the target
    accepts. With `self_draft` (a twin CausalView) the model also runs as its own streaming draft
    and `self_draft_weight` * KL(target || draft) is added, gradients through both sides: the model
    learns to predict what it would predict with the whole context from the draft's slice of it,
    and to lean less on what the slice leaves out."""
    inputs, targets = with_bos(batch)
    logits = causal_logits(model, inputs, self_draft or FULL_CAUSAL).flatten(0, 1)  # [B * L, V] (twice for a twin)
    draft_logits = None
    if self_draft is not None:
        logits, draft_logits = logits.chunk(2)
    ce = F.cross_entropy(logits, targets.flatten())
    objective = ce
    if teacher is not None:
        with torch.no_grad():
            soft = torch.softmax(causal_logits(teacher, inputs).flatten(0, 1), dim=-1)
        objective = distill_weight * F.cross_entropy(logits, soft) + (1 - distill_weight) * ce
    if draft_logits is not None:
        objective = objective + self_draft_weight * view_kl(logits, draft_logits)
    return objective, ce


def parse_curriculum(spec: str, context: int) -> list[tuple[int, float]]:
    """"256:0.4,512:0.2,1024:0.2,2048:0.2" -> [(seq_len, fraction of steps), ...]."""
    try:
        phases = [(int(a), float(b)) for a, b in (p.split(":") for p in spec.split(","))]
    except ValueError:
        raise UserError(f"--curriculum {spec!r}: expected SEQ:FRACTION pairs, e.g. 256:0.5,2048:0.5") from None
    if abs(sum(f for _, f in phases) - 1.0) > 1e-6 or any(f <= 0 for _, f in phases):
        raise UserError(f"--curriculum {spec!r}: fractions must be positive and sum to 1")
    if phases[-1][0] != context:
        raise UserError(f"--curriculum {spec!r}: the last phase must train at --context {context}")
    return phases


def parse_self_draft(spec: Optional[str]) -> Optional[CausalView]:
    """"16:496" -> the twin view of a streaming draft with 16 sink positions and a 496-key window."""
    if spec is None:
        return None
    try:
        sink, window = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"--self-draft {spec!r}: expected SINK:WINDOW, e.g. 16:496") from None
    if sink < 0 or window < 1:
        raise UserError(f"--self-draft {spec!r}: the sink must be >= 0 and the window >= 1")
    return CausalView(draft_window=window, sink=sink)


def phase_starts(phases: list[tuple[int, float]], steps: int) -> list[int]:
    """First step of each phase."""
    starts, acc = [], 0.0
    for _, frac in phases:
        starts.append(round(acc * steps))
        acc += frac
    return starts


def lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine down to `peak * min_ratio` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def describe_self_draft(val_hist: dict) -> str:
    if "self_draft" not in val_hist:
        return ""
    last = val_hist["self_draft"][-1]
    return f"; self-draft KL {last['view_kl']:.4f}, argmax agreement {last['argmax_agreement']:.3f}"


# ---- plot -----------------------------------------------------------------------------------------
def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, cfg = log["train_history"], log["config"]
    x = [t / 1e6 for t in tr["tokens"]]
    ema, smooth = None, []
    for v in tr["loss"]:
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, tr["loss"], color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(x, smooth, color="tab:blue", lw=1.6, label="train (EMA 0.95)")
    va = log["val_history"]
    ax.plot([t / 1e6 for t in va["tokens"]], va["loss"], "o-", color="tab:red", ms=3.5,
            label=f"validation, held-out books {', '.join(str(b['id']) for b in log['validation_books'])} "
                  f"@ {log['config'].get('val_context', log['config']['context'])} tokens")
    for start, seq in zip(log["phase_start_tokens"], log["config"]["curriculum_seq_lens"]):
        ax.axvline(start / 1e6, color="gray", ls=":", lw=0.8)
        ax.text(start / 1e6, ax.get_ylim()[1], f" ctx {seq}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    stage = "".join([f", continued from {cfg['init_from']}/" if cfg.get("init_from") else "",
                     f", distilled from {cfg['distill_from']}/" if cfg.get("distill_from") else "",
                     f", self-draft {cfg['self_draft']} x {cfg['self_draft_weight']}" if cfg.get("self_draft") else ""])
    ax.set_title(f"tiny Llama ({log['params']['total'] / 1e6:.1f}M params){stage}, {log['hardware']}", fontsize=9)
    ax.set_ylim(top=min(ax.get_ylim()[1], max(smooth[min(len(smooth) - 1, 5):] + va["loss"][1:] or [10]) + 0.5))
    handles, labels = ax.get_legend_handles_labels()
    if "self_draft" in va:  # --self-draft: how often the streaming draft's argmax agrees, on a second axis
        ax2 = ax.twinx()
        ax2.plot([t / 1e6 for t in va["tokens"]], [d["argmax_agreement"] for d in va["self_draft"]], "s--",
                 color="tab:green", ms=3.5, label=f"self-draft ({cfg['self_draft']}) argmax agreement, "
                 f"positions >= {cfg['self_draft_eval_from_position']}")
        ax2.set_ylabel("argmax agreement, target vs its streaming draft")
        handles += ax2.get_legend_handles_labels()[0]
        labels += ax2.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run --------------------------------------------------------------------------------------
@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--corpus", type=click.Path(path_type=Path), default=None,
              help=f"Gutenberg JSONL corpus (one book per line). Default: {DEFAULT_CORPUS} relative to "
                   "the repository root.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write the Hugging Face model, tokenizer, train_log.json and "
                   "loss_curve.png into (created; existing files of the same names are replaced).")
@click.option("--minutes", type=float, default=45.0,
              help="Wall-clock budget for the whole run (tokenizer, training, evaluation, export). With "
                   "--steps 0 the step count is planned to fit; a run that falls behind stops early.")
@click.option("--seed", type=int, default=0, help="Seed for weight init and the order of training windows.")
@click.option("--steps", type=int, default=0,
              help="Optimizer steps; 0 = plan them from a timing of the first steps to fit --minutes.")
@click.option("--threads", type=int, default=1, help="torch.set_num_threads for the run.")
@click.option("--vocab-size", type=int, default=4096, help="SentencePiece BPE vocabulary size.")
@click.option("--tokenizer-sample-mb", type=float, default=4.0,
              help="Megabytes (millions of characters) of training-book text the tokenizer learns from.")
@click.option("--tokenizer-from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Reuse the tokenizer of this Hugging Face directory (its tokenizer.model, "
                   "tokenizer.json and tokenizer_config.json are copied) instead of training one: a "
                   "draft model must produce the same token ids as its target. --vocab-size and "
                   "--tokenizer-sample-mb are then ignored.")
@click.option("--init-from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Continue training the Hugging Face model in this directory (its weights, shape and "
                   "tokenizer) instead of starting from random weights: the model-shape options, "
                   "--tie-embeddings and --tokenizer-from are then ignored. Used to extend a model's "
                   "context with a longer curriculum.")
@click.option("--distill-from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Teacher model (Hugging Face directory with the same tokenizer): train against its "
                   "next-token distribution as well as the text (see --distill-weight). For a draft "
                   "model, the teacher is its target.")
@click.option("--distill-weight", type=click.FloatRange(0.0, 1.0), default=1.0,
              help="With --distill-from: weight of the teacher term; the text cross-entropy gets 1 minus it.")
@click.option("--self-draft", default=None, metavar="SINK:WINDOW",
              help="Also train the model as its own streaming draft (self-speculation through a sink + "
                   "window view of its cache, e.g. 16:496 for the engine's default 512-key budget): each "
                   "step adds --self-draft-weight * KL(target || draft), teacher-forced. Raises the "
                   "acceptance of self-speculation at long context. Validation then also reports the "
                   "view's KL and argmax agreement over the last quarter of each window.")
@click.option("--self-draft-weight", type=click.FloatRange(min=0.0), default=1.0,
              help="With --self-draft: weight of the KL term (the text cross-entropy has weight 1).")
@click.option("--name", default="gpt-fast-magicdec-tiny",
              help="Model name written to config.json (_name_or_path); the engine names converted "
                   "checkpoints after it.")
@click.option("--tie-embeddings/--no-tie-embeddings", default=False,
              help="Share the input embedding and the output head (tie_word_embeddings).")
@click.option("--dim", type=int, default=256, help="Model width (hidden_size).")
@click.option("--n-layers", type=int, default=6, help="Transformer blocks.")
@click.option("--n-heads", type=int, default=8, help="Query heads.")
@click.option("--n-kv-heads", type=int, default=2, help="Key/value heads (grouped-query attention).")
@click.option("--intermediate-size", type=int, default=704, help="SwiGLU hidden width.")
@click.option("--rope-base", type=float, default=10000.0, help="RoPE theta.")
@click.option("--context", type=int, default=2048, help="Training context of the last curriculum phase.")
@click.option("--val-context", type=int, default=0,
              help="Length of the held-out validation windows; 0 = --context.")
@click.option("--max-position-embeddings", type=int, default=4096,
              help="Written to config.json: the longest sequence the engine will accept. Positions past "
                   "--context were never trained on.")
@click.option("--curriculum", default="256:0.4,512:0.2,1024:0.2,2048:0.2",
              help="Context curriculum: SEQ_LEN:FRACTION_OF_STEPS pairs; the last must be at --context.")
@click.option("--tokens-per-step", type=int, default=4096,
              help="Tokens per optimizer step (batch = this / sequence length, at least 1).")
@click.option("--lr", type=float, default=1.5e-3, help="Peak AdamW learning rate.")
@click.option("--min-lr-ratio", type=float, default=0.1, help="Final learning rate as a fraction of --lr.")
@click.option("--warmup-steps", type=int, default=30, help="Linear warmup steps.")
@click.option("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only).")
@click.option("--grad-clip", type=float, default=1.0, help="Gradient-norm clip.")
@click.option("--evals", type=int, default=12, help="Validation evaluations during training (plus one at the end).")
@click.option("--val-windows", type=int, default=2,
              help="Windows of --context tokens per held-out book for the periodic validation loss.")
@click.option("--final-val-windows", type=int, default=8,
              help="Windows of --context tokens per held-out book for the final validation loss.")
@click.option("--save-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16",
              help="dtype of the exported weights (bfloat16 keeps model.safetensors under 16 MiB).")
@click.option("--log-every", type=int, default=10, help="Print the training loss every this many steps.")
@click.option("--check-hf/--no-check-hf", default=True,
              help="After export, check transformers' LlamaForCausalLM loads it and matches the engine's "
                   "logits (skipped when transformers is not installed).")
def main(corpus, out_dir, minutes, seed, steps, threads, vocab_size, tokenizer_sample_mb, tokenizer_from, init_from,
         distill_from, distill_weight, self_draft, self_draft_weight, name, tie_embeddings, dim, n_layers,
         n_heads, n_kv_heads, intermediate_size, rope_base, context, val_context, max_position_embeddings, curriculum,
         tokens_per_step, lr, min_lr_ratio, warmup_steps, weight_decay, grad_clip, evals, val_windows,
         final_val_windows, save_dtype, log_every, check_hf):
    """Train the bundled tiny Llama (a SentencePiece tokenizer and the engine's own Transformer) on
    the Gutenberg corpus on CPU, and export it in Hugging Face layout.

    Two whole books are held out for validation and never trained on, not even by the tokenizer:
    84 (Frankenstein) and 2852 (The Hound of the Baskervilles)."""
    try:
        run(**locals())
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def run(corpus, out_dir, minutes, seed, steps, threads, vocab_size, tokenizer_sample_mb, tokenizer_from, init_from,
        distill_from, distill_weight, self_draft, self_draft_weight, name, tie_embeddings, dim, n_layers,
        n_heads, n_kv_heads, intermediate_size, rope_base, context, val_context, max_position_embeddings, curriculum,
        tokens_per_step, lr, min_lr_ratio, warmup_steps, weight_decay, grad_clip, evals, val_windows,
        final_val_windows, save_dtype, log_every, check_hf) -> dict:
    import sentencepiece as spm

    t0 = time.perf_counter()
    deadline = t0 + minutes * 60
    torch.set_num_threads(threads)
    phases = parse_curriculum(curriculum, context)
    self_draft_view = parse_self_draft(self_draft)
    val_context = val_context or context
    # a draft copies its target's tokenizer_config.json; a continued model writes its own (the
    # context it now handles is its model_max_length)
    copy_tokenizer_config = tokenizer_from is not None
    if init_from is not None:
        tokenizer_from = tokenizer_from or init_from
    if max_position_embeddings < context:
        raise UserError("--max-position-embeddings must be at least --context")
    corpus = Path(corpus) if corpus is not None else repo_root() / DEFAULT_CORPUS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {msg}", err=True)

    # 1. data and tokenizer
    train_books, val_books = split_books(read_books(corpus))
    if tokenizer_from is not None:
        src = Path(tokenizer_from) / "tokenizer.model"
        if not src.is_file():
            raise UserError(f"--tokenizer-from: no tokenizer.model in {tokenizer_from}")
        lines = []
        copy_unless_same(src, out_dir / "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
        vocab_size = sp.vocab_size()
        say(f"tokenizer: {sp.vocab_size()} pieces, reused from {src}")
    else:
        lines = tokenizer_sample(train_books, int(tokenizer_sample_mb * 1e6))
        (out_dir / "tokenizer.model").write_bytes(train_tokenizer(lines, vocab_size))
        sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
        say(f"tokenizer: {sp.vocab_size()} pieces from {sum(map(len, lines)) / 1e6:.1f}M characters")
    train_tokens = tokenize_books(sp, train_books)
    val_tokens = tokenize_books(sp, val_books)
    n_train = sum(len(t) for t in train_tokens)
    chars_per_token = sum(len(b["text"]) for b in val_books) / sum(len(t) for t in val_tokens)
    say(f"tokenized {len(train_books)} training books ({n_train / 1e6:.2f}M tokens); held out "
        f"{[b['id'] for b in val_books]} ({sum(len(t) for t in val_tokens) / 1e6:.2f}M tokens, "
        f"{chars_per_token:.2f} characters/token)")

    # 2. model
    torch.manual_seed(seed)
    if init_from is not None:
        model = load_hf_model(init_from, max_position_embeddings)
        model.args = args = dataclasses.replace(model.args, name=name)
        say(f"continuing from {init_from} (max_position_embeddings {max_position_embeddings})")
    else:
        args = ModelArgs(name=name, vocab_size=sp.vocab_size(), dim=dim, n_layers=n_layers,
                         n_heads=n_heads, n_kv_heads=n_kv_heads, intermediate_size=intermediate_size,
                         norm_eps=1e-5, rope_base=rope_base, max_position_embeddings=max_position_embeddings,
                         bos_id=BOS_ID, eos_ids=(EOS_ID,), tie_word_embeddings=tie_embeddings)
        model = Transformer(args)
        init_weights(model)
    model.train()
    teacher = None
    if distill_from is not None:
        teacher = load_hf_model(distill_from).eval().requires_grad_(False)
        if teacher.args.vocab_size != args.vocab_size:
            raise UserError(f"--distill-from {distill_from}: vocabulary {teacher.args.vocab_size} is not "
                            f"the model's {args.vocab_size}")
        say(f"distilling from {distill_from} (weight {distill_weight})")
    n_params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    n_embed = model.tok_embeddings.weight.numel()
    say(f"model: {n_params / 1e6:.2f}M parameters ({(n_params - n_embed) / 1e6:.2f}M without the embedding)")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    val_w = validation_windows(val_tokens, val_windows, val_context)
    final_w = validation_windows(val_tokens, final_val_windows, val_context)

    # 3. the first evaluation, timed; then time one step per phase and plan the step count
    t = time.perf_counter()
    val_hist = {"step": [0], "tokens": [0], "loss": [evaluate(model, val_w)]}
    # the self-draft figures: over the last quarter of each window, where the view leaves most out
    draft_from = val_context * 3 // 4
    if self_draft_view is not None:
        val_hist["self_draft"] = [evaluate_self_draft(model, val_w, self_draft_view, draft_from)]
    eval_s = time.perf_counter() - t
    say(f"step 0: validation loss {val_hist['loss'][0]:.3f}{describe_self_draft(val_hist)} "
        f"({eval_s:.1f}s per evaluation)")
    if steps <= 0:
        probe = torch.Generator().manual_seed(seed + 1)  # timing only: the weights are not updated
        step_s = []
        for seq, _ in phases:
            batch = max(1, tokens_per_step // seq)
            times = []
            for _ in range(2):
                x = torch.randint(0, args.vocab_size, (batch, seq), generator=probe, dtype=torch.int16)
                t = time.perf_counter()
                train_step_loss(model, x, teacher, distill_weight, self_draft_view, self_draft_weight)[0].backward()
                times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
            step_s.append(min(times) * 1.05)  # + the optimizer step
        per_step = sum(f * s for (_, f), s in zip(phases, step_s))
        final_eval_s = 2 * eval_s * final_val_windows / val_windows
        left = deadline - time.perf_counter() - final_eval_s - FINAL_RESERVE_S - evals * eval_s
        steps = max(1, int(SAFETY * left / per_step))
        say(f"timing: {', '.join(f'{s:.2f}s/step at {seq}' for (seq, _), s in zip(phases, step_s))}; "
            f"planning {steps} steps ({steps * tokens_per_step / 1e6:.2f}M tokens)")
    starts = phase_starts(phases, steps)
    eval_at = {round(steps * (k + 1) / (evals + 1)) for k in range(evals)} - {0, steps}

    # 4. train
    gen = torch.Generator().manual_seed(seed)
    tr_hist = {"step": [], "tokens": [], "seq_len": [], "loss": [], "lr": []}
    tokens_seen, phase_start_tokens, stopped_early = 0, [], False
    t_train = time.perf_counter()
    final_reserve = 2 * eval_s * final_val_windows / val_windows + FINAL_RESERVE_S
    for step in range(steps):
        phase = max(i for i, s in enumerate(starts) if s <= step)
        seq = phases[phase][0]
        while len(phase_start_tokens) <= phase:  # (a very short run can skip a phase)
            phase_start_tokens.append(tokens_seen)
        if time.perf_counter() > deadline - final_reserve:
            stopped_early = True
            say(f"out of time: stopping at step {step} of {steps}")
            break
        batch = max(1, tokens_per_step // seq)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps, min_lr_ratio)
        objective, ce = train_step_loss(model, sample_batch(train_tokens, batch, seq, gen), teacher, distill_weight,
                                        self_draft_view, self_draft_weight)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        loss = ce.item()  # logged: the text cross-entropy, comparable with the validation loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        tokens_seen += batch * seq
        for k, v in (("step", step + 1), ("tokens", tokens_seen), ("seq_len", seq), ("loss", loss),
                     ("lr", opt.param_groups[0]["lr"])):
            tr_hist[k].append(v)
        if (step + 1) % log_every == 0 or step == 0:
            rate = tokens_seen / (time.perf_counter() - t_train)
            say(f"step {step + 1}/{steps} ctx {seq} loss {loss:.3f} lr {tr_hist['lr'][-1]:.2e} "
                f"{rate:.0f} tokens/s")
        if step + 1 in eval_at:
            val_hist["step"].append(step + 1)
            val_hist["tokens"].append(tokens_seen)
            val_hist["loss"].append(evaluate(model, val_w))
            if self_draft_view is not None:
                val_hist["self_draft"].append(evaluate_self_draft(model, val_w, self_draft_view, draft_from))
            say(f"step {step + 1}: validation loss {val_hist['loss'][-1]:.3f}{describe_self_draft(val_hist)}")
    train_s = time.perf_counter() - t_train
    model.eval()

    # 5. final evaluation (fp32 weights, and the exported rounding), export, log, plot
    final_fp32 = evaluate(model, final_w)
    export_dtype = getattr(torch, save_dtype)
    shipped = Transformer(args)
    shipped.load_state_dict({k: v.to(export_dtype).float() for k, v in model.state_dict().items()})
    final_shipped = evaluate(shipped, final_w) if export_dtype != torch.float32 else final_fp32
    val_hist["step"].append(len(tr_hist["step"]))
    val_hist["tokens"].append(tokens_seen)
    val_hist["loss"].append(final_shipped)
    if self_draft_view is not None:
        val_hist["self_draft"].append(evaluate_self_draft(shipped, final_w, self_draft_view, draft_from))
    say(f"final validation loss {final_shipped:.4f} ({save_dtype} weights; {final_fp32:.4f} in fp32) on "
        f"{final_w.numel() / 1e3:.0f}K held-out tokens{describe_self_draft(val_hist)}")
    export_hf(model, out_dir / "tokenizer.model", out_dir, export_dtype)
    wall_s = time.perf_counter() - t0
    log = {
        "final_val_loss": round(final_shipped, 4),
        "final_val_loss_fp32_weights": round(final_fp32, 4),
        "final_val_perplexity": round(math.exp(final_shipped), 2),
        "final_self_draft": val_hist.get("self_draft", [None])[-1],
        "final_val_tokens": final_w.numel(),
        "validation_books": [{"id": b["id"], "title": b["title"], "tokens": len(t)}
                             for b, t in zip(val_books, val_tokens)],
        "val_chars_per_token": round(chars_per_token, 3),
        "tokens_seen": tokens_seen,
        "steps": len(tr_hist["step"]),
        "steps_planned": steps,
        "stopped_early": stopped_early,
        "params": {"total": n_params, "without_embedding": n_params - n_embed},
        "model_args": args.to_dict(),
        "config": {
            "context": context, "val_context": val_context,
            "init_from": None if init_from is None else Path(init_from).name,
            "distill_from": None if distill_from is None else Path(distill_from).name,
            "distill_weight": None if distill_from is None else distill_weight,
            "self_draft": self_draft, "self_draft_weight": None if self_draft is None else self_draft_weight,
            "self_draft_eval_from_position": None if self_draft is None else draft_from,
            "curriculum_seq_lens": [s for s, _ in phases],
            "curriculum_fractions": [f for _, f in phases], "tokens_per_step": tokens_per_step,
            "lr": lr, "min_lr_ratio": min_lr_ratio, "warmup_steps": warmup_steps, "weight_decay": weight_decay,
            "betas": [0.9, 0.95], "grad_clip": grad_clip, "schedule": "linear warmup + cosine",
            "precision": "float32", "save_dtype": save_dtype, "vocab_size": vocab_size,
            "tokenizer": "SentencePiece BPE, byte_fallback, unk=0 bos=1 eos=2",
            "tokenizer_from": (None if tokenizer_from is None else Path(tokenizer_from).name),
            "tokenizer_sample_chars": sum(map(len, lines)) or None, "val_windows_per_book": val_windows,
            "final_val_windows_per_book": final_val_windows, "train_books": len(train_books),
            "train_tokens_available": n_train,
        },
        "phase_start_tokens": phase_start_tokens,
        "seed": seed,
        "wall_time_s": round(wall_s, 1),
        "train_time_s": round(train_s, 1),
        "device": "cpu",
        "threads": threads,
        "hardware": f"trained on CPU, {threads} thread{'s' if threads > 1 else ''}, {wall_s / 60:.0f} minutes",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python -m tools.tiny_model.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "reproduce_with": f"--seed {seed} --steps {steps}",
        "val_history": val_hist,
        "train_history": tr_hist,
    }
    if check_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            say("transformers not installed: skipping the Hugging Face check")
        else:
            from .export import compare_with_transformers, write_tokenizer_json

            diff = compare_with_transformers(out_dir, with_bos(val_w[:1, :256])[0])
            log["hf_max_abs_logit_diff"] = diff
            say(f"transformers LlamaForCausalLM vs engine: max |logit diff| {diff:.2e}")
            if tokenizer_from is not None and (Path(tokenizer_from) / "tokenizer.json").is_file():
                copy_unless_same(Path(tokenizer_from) / "tokenizer.json", out_dir / "tokenizer.json")
                log["tokenizer_json"] = True
            else:
                log["tokenizer_json"] = write_tokenizer_json(out_dir, [b["text"] for b in val_books])
            say("tokenizer.json " + ("written: encodes the held-out books exactly as tokenizer.model"
                                     if log["tokenizer_json"] else "NOT written: it disagreed with tokenizer.model"))
    if copy_tokenizer_config and (Path(tokenizer_from) / "tokenizer_config.json").is_file():
        # byte-for-byte, so a draft's tokenizer fingerprint equals its target's
        copy_unless_same(Path(tokenizer_from) / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot_losses(log, out_dir / "loss_curve.png")
    say(f"wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20:.1f} MiB)")
    return log


if __name__ == "__main__":
    main()
