"""Held-out loss by position: does a model use a long context, or break past its training length?

    python -m tools.tiny_model.position_loss --corpus ../shared/corpus/gutenberg-train.jsonl \\
        --model gpt_fast_magicdec/tiny/model --context 8192

Cuts windows of `--context` tokens (`<s>` + text) every `--stride` tokens from the two held-out
books, runs each model over each window in one cache-free causal pass, and averages the next-token
cross-entropy at each position over the windows. With a stride of a quarter of the context every
stretch of text is scored at four positions, so what the curve shows is the position, not which
text happens to sit there. A model that uses its context has a curve that
falls and then stays flat; one asked for positions it never trained on has a curve that rises
there. Writes PREFIX.json (per-bin means, the command, commit and date) and PREFIX.png."""
from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import click
import torch

from gpt_fast_magicdec.benchmarking.report import git_commit
from .causal import FULL_CAUSAL, CausalView
from .corpus import DEFAULT_CORPUS, read_books, repo_root, split_books
from .export import load_hf_model
from .train import parse_self_draft, score_window, tokenize_books


def held_out_windows(hf_dir: Path, corpus: Path, context: int, stride: int) -> torch.Tensor:
    """[N, context] a window every `stride` tokens of the held-out books, in the model's tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(hf_dir) / "tokenizer.model"))
    _, val_books = split_books(read_books(corpus))
    rows = []
    for book in tokenize_books(sp, val_books):
        rows.extend(book[start:start + context] for start in range(0, len(book) - context + 1, stride))
    return torch.stack(rows)


def scores_by_position(hf_dir: Path, windows: torch.Tensor, self_draft: Optional[CausalView] = None) -> dict:
    """{"loss": [context]} mean next-token cross-entropy at each position over `windows`. With a
    `self_draft` twin view, also "kl" and "agreement" (`train.score_window`) at each position."""
    model = load_hf_model(hf_dir).eval()  # the cache-free pass builds RoPE for any length
    total: dict = {}
    for row in windows:
        for name, per_position in score_window(model, row, self_draft or FULL_CAUSAL).items():
            total[name] = total.get(name, 0) + per_position.double()
    return {name: t / len(windows) for name, t in total.items()}


def binned(per_position: torch.Tensor, bin_size: int) -> list[float]:
    n = len(per_position) // bin_size
    return [round(float(per_position[i * bin_size:(i + 1) * bin_size].mean()), 4) for i in range(n)]


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_draft = any("self_draft_agreement_by_bin" in m for m in report["models"])
    fig, axes = plt.subplots(1, 2 if with_draft else 1, figsize=(14 if with_draft else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    size = report["bin_size"]
    for m in report["models"]:
        xs = [(i + 0.5) * size for i in range(len(m["loss_by_bin"]))]
        ax.plot(xs, m["loss_by_bin"], "-o", ms=2.5, lw=1.4, label=f"{m['label']} (mean {m['mean_loss']:.3f})")
        if m.get("train_context"):
            ax.axvline(m["train_context"], color=ax.lines[-1].get_color(), ls=":", lw=1)
    ax.set_xlabel(f"position in the window (bins of {size} tokens)")
    ax.set_ylabel("held-out cross-entropy (nats / token)")
    ax.set_title(f"loss by position, {report['windows']} windows of {report['context']} tokens, one every "
                 f"{report['stride']} tokens of the held-out books\n(dotted: each model's training context)", fontsize=10)
    low = min(min(m["loss_by_bin"][1:] or m["loss_by_bin"]) for m in report["models"])
    high = max(max(m["loss_by_bin"][1:] or m["loss_by_bin"]) for m in report["models"])
    ax.set_ylim(low - 0.1, high + 0.1)  # the first bin (no context yet) would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if with_draft:
        ax = axes[0][1]
        for m in report["models"]:
            xs = [(i + 0.5) * size for i in range(len(m["self_draft_agreement_by_bin"]))]
            ax.plot(xs, m["self_draft_agreement_by_bin"], "-o", ms=2.5, lw=1.4, label=m["label"])
        ax.set_xlabel(f"position in the window (bins of {size} tokens)")
        ax.set_ylabel("argmax agreement, full cache vs streaming view")
        ax.set_title(f"the model's greedy choice through its self-draft view ({report['self_draft']}: sink:window)"
                     "\nagrees with its choice over the full cache, teacher-forced", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", "models", multiple=True, required=True, metavar="DIR[=LABEL]",
              help="Hugging Face model directory to score, optionally with a plot label (repeatable).")
@click.option("--corpus", type=click.Path(path_type=Path), default=None,
              help=f"Gutenberg JSONL corpus holding the held-out books. Default: {DEFAULT_CORPUS} relative "
                   "to the repository root.")
@click.option("--context", type=int, default=8192, help="Window length in tokens (<s> included).")
@click.option("--stride", type=int, default=0,
              help="Tokens between window starts; 0 = --context (non-overlapping windows).")
@click.option("--bin-size", type=int, default=256, help="Positions averaged into one plotted point.")
@click.option("--self-draft", default=None, metavar="SINK:WINDOW",
              help="Also score each model as its own streaming self-draft through this view (e.g. 16:496, "
                   "the engine's default 512-key budget): the KL and argmax agreement between the full "
                   "cache's and the view's next-token distributions at each position, plotted beside the loss.")
@click.option("--threads", type=int, default=2, help="torch.set_num_threads.")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path),
              default=Path("benchmarks/tiny_model_position_loss"),
              help="Output prefix: writes PREFIX.json and PREFIX.png.")
def main(models, corpus, context, stride, bin_size, self_draft, threads, out_prefix):
    """Held-out next-token loss by position in the window, for one or more models."""
    torch.set_num_threads(threads)
    view = parse_self_draft(self_draft)
    corpus = Path(corpus) if corpus is not None else repo_root() / DEFAULT_CORPUS
    entries = []
    for spec in models:
        directory, _, label = spec.partition("=")
        directory = Path(directory)
        log_path = directory / "train_log.json"
        train_context = json.loads(log_path.read_text())["config"]["context"] if log_path.is_file() else None
        windows = held_out_windows(directory, corpus, context, stride or context)
        scores = scores_by_position(directory, windows, view)
        entries.append({"label": label or directory.name, "dir": str(directory), "train_context": train_context,
                        "mean_loss": round(float(scores["loss"].mean()), 4),
                        "loss_by_bin": binned(scores["loss"], bin_size)})
        if view is not None:
            entries[-1].update({"self_draft_kl_by_bin": binned(scores["kl"], bin_size),
                                "self_draft_agreement_by_bin": binned(scores["agreement"], bin_size)})
            agreement = entries[-1]["self_draft_agreement_by_bin"]
            click.echo(f"{entries[-1]['label']}: self-draft agreement by bin {agreement}", err=True)
        click.echo(f"{entries[-1]['label']}: mean {entries[-1]['mean_loss']:.4f} over {len(windows)} windows; "
                   f"by bin {entries[-1]['loss_by_bin']}", err=True)
    report = {"command": "python -m tools.tiny_model.position_loss " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "git_commit": git_commit() or "unknown",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "context": context, "stride": stride or context, "bin_size": bin_size, "windows": len(windows),
              "self_draft": self_draft, "torch": torch.__version__,
              "models": entries}
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_prefix.with_suffix(".png"), report)
    click.echo(f"wrote {out_prefix}.json and .png", err=True)


if __name__ == "__main__":
    main()
