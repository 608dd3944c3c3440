"""Measure MagicDec draft acceptance of the bundled tiny model on a held-out book.

    python -m tools.tiny_model.measure_acceptance --corpus ../shared/corpus/gutenberg-train.jsonl

Prompts are cut from a held-out book (never seen in training). For every prompt length the
prompts *end* at the same fixed positions of the book, so every length continues the same text
and only the amount of context differs. Greedy decoding; for each length it runs plain decoding
once, then self-speculation through each --kv view (StreamingLLM sink + window, SnapKV, the
re-selecting pillar view) at each budget, and the standalone draft model (the bundled draft by
default) with its full cache and through each --draft-kv view of its own cache, for each gamma. It records the acceptance rate and the
mean tokens emitted per round, and checks that every speculative output equals the plain greedy
output token for token.

Writes a JSON file with every run, a Markdown table (command, git commit, date, hardware) and a
plot of acceptance against budget per prompt length."""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import click
import torch

from gpt_fast_magicdec.benchmarking.report import git_commit
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.checkpoint import load_model
from gpt_fast_magicdec.engine import Engine
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.policies import POLICIES, SPARSE_POLICIES, policy_help
from gpt_fast_magicdec.tokenizer import load_tokenizer
from .corpus import DEFAULT_CORPUS, VALIDATION_BOOK_IDS, read_books, repo_root


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def cut_prompts(book_tokens: list[int], bos: int, lengths: list[int], batch: int, new_tokens: int) -> dict:
    """{length: [batch prompts]}: prompt b of every length is `<s>` + the (length - 1) tokens that
    end at the same position end_b; the end positions are spread evenly through the book."""
    longest = max(lengths)
    room = len(book_tokens) - longest - new_tokens
    if room < batch:
        raise UserError(f"the book has {len(book_tokens)} tokens, too few for {batch} prompts of {longest}")
    ends = [longest + (b * room) // batch for b in range(batch)]
    return {L: [[bos] + book_tokens[e - (L - 1):e] for e in ends] for L in lengths}


def draft_label(r: dict) -> str:
    if r.get("draft_model"):
        view = "full KV" if r["draft"] == "full" else f"{r['draft']} {r['budget']}"
        return f"standalone `{r['draft_model']}`, {view}"
    return f"self {r['draft']} {r['budget']}"


def find(results: list[dict], L: int, draft: str, budget: int, gamma: int, model: bool = False) -> Optional[dict]:
    return next((r for r in results if r["prompt_len"] == L and r["draft"] == draft and r["budget"] == budget
                 and r["gamma"] == gamma and bool(r.get("draft_model")) == model), None)


def headline(meta: dict, results: list[dict]) -> list[str]:
    """The long-context claim in two numbers: self streaming 512, gamma 3, at the longest prompt,
    and its drop from the shortest."""
    lo, hi = min(meta["prompt_lens"]), max(meta["prompt_lens"])
    a, b = find(results, lo, "streaming", 512, 3), find(results, hi, "streaming", 512, 3)
    if a is None or b is None:
        return []
    return [f"Self-speculation, streaming budget 512, gamma 3: acceptance **{b['acceptance_rate']:.3f}** at "
            f"{hi} tokens, a drop of **{a['acceptance_rate'] - b['acceptance_rate']:.3f}** from {lo} tokens "
            f"({a['acceptance_rate']:.3f}).", ""]


def write_markdown(path: Path, meta: dict, results: list[dict]) -> None:
    gammas = meta["gammas"]
    lines = [
        "# Tiny model: MagicDec draft acceptance on held-out text",
        "",
        f"Model: the bundled tiny Llama (`gpt_fast_magicdec/tiny/model`, {meta['params'] / 1e6:.1f}M parameters, "
        f"trained at context {meta['train_context']})"
        + (f"; standalone draft `{meta['draft_model']}` ({meta['draft_params'] / 1e6:.2f}M parameters)"
           if meta["draft_model"] else "") + f". Text: held-out book {meta['book']['id']} "
        f"*{meta['book']['title']}* ({meta['book']['tokens']} tokens), never seen in training.",
        f"Batch of {meta['batch']} prompts per length, ending at the same {meta['batch']} positions of the book "
        f"for every length; greedy; {meta['new_tokens']} new tokens per prompt; streaming sink "
        f"{meta['sink']} (window = budget - sink); SnapKV window = budget / 4, observation window 32"
        + ("; pillar: SnapKV's prefill selection, then re-selected from verification's attention every "
           + (f"{meta['reselect']} rounds" if meta.get("reselect") else "round(8 / gamma) rounds")
           + ", same window" if "pillar" in meta.get("kv", []) + meta.get("draft_kv", []) else "") + ".",
        "",
        "Each cell: **acceptance rate** / mean tokens emitted per round (accepted drafts + the bonus "
        "token; the ceiling is gamma + 1). `*`: the budget covers the whole context, so the draft sees "
        "everything.",
        "",
        *headline(meta, results),
        "| prompt | draft | " + " | ".join(f"gamma {g}" for g in gammas) + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in gammas) + " |",
    ]
    rows: dict = {}
    for r in results:
        rows.setdefault((r["prompt_len"], draft_label(r)), {})[r["gamma"]] = r
    for (L, label), by_gamma in rows.items():
        cells = []
        for g in gammas:
            r = by_gamma.get(g)
            cells.append("" if r is None else f"**{r['acceptance_rate']:.3f}** / {r['mean_accepted_per_round']:.2f}"
                         + (" *" if r.get("budget_covers_context") else ""))
        lines.append(f"| {L} | {label} | " + " | ".join(cells) + " |")
    n_bad = sum(not r["matches_greedy"] for r in results)
    beyond = [L for L in meta["prompt_lens"] if meta["train_context"] and L + meta["new_tokens"] > meta["train_context"]]
    if beyond:
        lines += ["", f"Prompts of {', '.join(map(str, beyond))} tokens plus {meta['new_tokens']} new tokens run past the "
                      f"{meta['train_context']}-token training context (positions never trained on)."]
    lines += [
        "",
        f"Lossless check: {len(results) - n_bad} of {len(results)} speculative runs reproduced plain greedy "
        "output token for token" + ("." if not n_bad else f"; {n_bad} differed (see the JSON)."),
        "",
        f"![acceptance vs budget]({Path(meta['plot']).name})",
        "",
        "## How this was measured",
        "",
        f"- command: `{meta['command']}`",
        f"- git commit: `{meta['git_commit']}`",
        f"- date: {meta['date']}",
        f"- hardware: CPU ({meta['cpu']}), {meta['threads']} thread(s), torch {meta['torch']}, float32; "
        f"{meta['wall_time_s'] / 60:.1f} minutes for all runs",
        f"- {meta['new_tokens']} new tokens and {meta['batch']} prompts per length keep the whole sweep short "
        "on a CPU; acceptance is a per-token average over the batch.",
        "",
    ]
    path.write_text("\n".join(lines))


def by_length(ax, meta: dict, results: list[dict], gamma: int = 3) -> None:
    """Last panel: acceptance against prompt length at one gamma, one line per draft."""
    lines = [(kv, b, False) for kv in meta["kv"] for b in meta["budgets"]]
    if meta["draft_model"]:
        lines += [("full", -1, True)] + [(kv, meta["draft_budget"], True) for kv in meta.get("draft_kv", ["streaming"])]
    for kv, budget, model in lines:
        pts = [(L, r["acceptance_rate"]) for L in meta["prompt_lens"]
               if (r := find(results, L, kv, budget, gamma, model)) is not None]
        if pts:
            label = draft_label({"draft": kv, "budget": budget, "draft_model": "draft" if model else None})
            ax.plot(*zip(*pts), "--" if model else "-", marker="o", ms=3.5, lw=1.2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(meta["prompt_lens"], [str(L) for L in meta["prompt_lens"]])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_title(f"gamma {gamma}, by prompt length")
    ax.grid(alpha=0.3)


def plot(path: Path, meta: dict, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, gammas = meta["prompt_lens"], meta["gammas"]
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(3.6 * (len(lengths) + 1) + 1.6, 4.5), sharey=True,
                             squeeze=False)
    colors = plt.cm.viridis([i / max(1, len(gammas) - 1) * 0.85 for i in range(len(gammas))])
    for ax, L in zip(axes[0][:-1], lengths):
        for kv, style in zip(meta["kv"], ("-o", "--s", ":^", "-.d")):
            for g, c in zip(gammas, colors):
                pts = [(b, r["acceptance_rate"]) for b in meta["budgets"] if (r := find(results, L, kv, b, g))]
                if pts:
                    ax.plot(*zip(*pts), style, color=c, ms=4, lw=1.2, label=f"{kv}, gamma {g}")
        for kv, style in zip(["full", *meta.get("draft_kv", ["streaming"])], (":", "-.", "--", "-")):
            r = find(results, L, kv, -1 if kv == "full" else meta["draft_budget"], 3, model=True)
            if r is not None:
                ax.axhline(r["acceptance_rate"], color="gray", ls=style, lw=1.2,
                           label=f"standalone draft, {draft_label(r).split(', ')[1]}, gamma 3")
        ax.set_xscale("log", base=2)
        ax.set_xticks(meta["budgets"], [str(b) for b in meta["budgets"]])
        ax.set_title(f"prompt {L} tokens")
        ax.set_xlabel("draft KV budget (tokens)")
        ax.grid(alpha=0.3)
    by_length(axes[0][-1], meta, results)
    lowest = min([r["acceptance_rate"] for r in results] + [1.0])
    axes[0][0].set_ylim(max(0.0, min(0.9, lowest) - 0.05), 1.01)  # standalone-draft rows set the floor
    axes[0][0].set_ylabel("acceptance rate")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"tiny model, held-out book {meta['book']['id']}, greedy, batch {meta['batch']}, "
                 f"{meta['new_tokens']} new tokens (CPU)", fontsize=10)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.24)  # room for the budget panels' legend, below them
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Engine checkpoint directory; default: the bundled tiny model (converted on first use).")
@click.option("--corpus", type=click.Path(path_type=Path), default=None,
              help=f"Gutenberg JSONL corpus holding the held-out book. Default: {DEFAULT_CORPUS} relative to "
                   "the repository root.")
@click.option("--book", type=int, default=VALIDATION_BOOK_IDS[0],
              help=f"Held-out book id to cut prompts from (one of {VALIDATION_BOOK_IDS}).")
@click.option("--prompt-lens", default="1024,2048,4096,8192", help="Prompt lengths in tokens (<s> included).")
@click.option("--budgets", default="128,256,512", help="Draft KV budgets (keys the draft reads per query).")
@click.option("--kv", "kv_kinds", default="streaming,snapkv",
              help=f"Self-speculation KV selection policies to measure ({policy_help(SPARSE_POLICIES)}).")
@click.option("--gammas", default="2,3,4,5", help="Draft lengths.")
@click.option("--sink", type=int, default=16, help="StreamingLLM attention-sink tokens.")
@click.option("--batch", type=int, default=8, help="Prompts per length (one batch).")
@click.option("--new-tokens", type=int, default=64, help="Tokens generated per prompt.")
@click.option("--draft-checkpoint", type=click.Path(path_type=Path), default=Path("bundled-draft"),
              help="Standalone draft model to measure beside self-speculation ('bundled-draft': the bundled "
                   "tiny draft), with its full cache and with a --draft-budget streaming view of it.")
@click.option("--draft-budget", type=int, default=512,
              help="Keys the standalone draft reads through each --draft-kv view of its cache.")
@click.option("--draft-kv", "draft_kinds", default="streaming",
              help="Comma-separated views of the standalone draft's own cache, at --draft-budget.")
@click.option("--reselect", type=int, default=None,
              help="pillar: rounds between re-selections (default: the policy's, round(8 / gamma)).")
@click.option("--standalone/--no-standalone", default=True, help="Measure the standalone draft model at all.")
@click.option("--threads", type=int, default=1, help="torch.set_num_threads.")
@click.option("--out", "out_prefix", type=click.Path(path_type=Path),
              default=Path("benchmarks/tiny_model_acceptance"),
              help="Output prefix: writes PREFIX.json, PREFIX.md and PREFIX.png.")
def main(checkpoint, corpus, book, prompt_lens, budgets, kv_kinds, gammas, sink, batch, new_tokens,
         draft_checkpoint, draft_budget, draft_kinds, reselect, standalone, threads, out_prefix):
    """Acceptance rate of MagicDec drafts (streaming / SnapKV self-speculation, full-KV standalone
    draft, full and sparse) for the bundled tiny model on held-out text, at several prompt lengths,
    budgets and gammas."""
    try:
        run(checkpoint, corpus, book, _ints(prompt_lens), _ints(budgets),
            [k.strip() for k in kv_kinds.split(",") if k.strip()], _ints(gammas), sink, batch, new_tokens,
            draft_checkpoint if standalone else None, draft_budget, threads, out_prefix,
            [k.strip() for k in draft_kinds.split(",") if k.strip()], reselect)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def run(checkpoint, corpus, book_id, lengths, budgets, kv_kinds, gammas, sink, batch, new_tokens,
        draft_checkpoint, draft_budget, threads, out_prefix, draft_kinds=("streaming",), reselect=None) -> dict:
    t0 = time.perf_counter()
    for flag, kinds in (("--kv", kv_kinds), ("--draft-kv", draft_kinds)):
        unknown = [k for k in kinds if k not in SPARSE_POLICIES]
        if unknown:
            raise UserError(f"{flag} {','.join(unknown)}: sparse policies are {', '.join(SPARSE_POLICIES)}")

    def config(kind: str, kv: str, budget: int, g: int) -> DraftConfig:
        return DraftConfig(kind=kind, kv=kv, budget=budget, sink=sink, gamma=g,
                           reselect=reselect if POLICIES[kv].dynamic else None)
    torch.set_num_threads(threads)
    train_context = None
    if checkpoint is None:
        from gpt_fast_magicdec.tiny import bundled_checkpoint, bundled_hf_dir

        checkpoint = bundled_checkpoint()
        train_log = bundled_hf_dir() / "train_log.json"
        if train_log.is_file():
            train_context = json.loads(train_log.read_text())["config"]["context"]
    if book_id not in VALIDATION_BOOK_IDS:
        raise UserError(f"--book {book_id} was seen in training; use a held-out book {VALIDATION_BOOK_IDS}")
    corpus = Path(corpus) if corpus is not None else repo_root() / DEFAULT_CORPUS
    book = next(b for b in read_books(corpus) if b["id"] == book_id)
    tok = load_tokenizer(checkpoint)
    book_tokens = tok.encode(book["text"], bos=False)
    prompts = cut_prompts(book_tokens, tok.bos_id, lengths, batch, new_tokens)

    # Separate model objects: each engine attaches its own KV caches to the layers it runs.
    target = load_model(checkpoint, "cpu", torch.float32)
    self_engine = Engine(target)
    model_engine, draft_model_name, draft_params = None, None, 0
    if draft_checkpoint is not None:
        from gpt_fast_magicdec.tiny import resolve_draft_checkpoint
        from gpt_fast_magicdec.tokenizer import check_same_tokenizer

        draft_ckpt = resolve_draft_checkpoint(draft_checkpoint)
        check_same_tokenizer(tok, load_tokenizer(draft_ckpt), draft_ckpt)
        draft_model_name = str(draft_checkpoint)
        draft = load_model(draft_ckpt, "cpu", torch.float32)
        draft_params = sum(p.numel() for p in draft.parameters())
        model_engine = Engine(load_model(checkpoint, "cpu", torch.float32), draft_model=draft)
    results = []

    def record(L, draft_name, budget, cfg, engine, reference):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # budget covering the context: expected for the small prompts
            out = engine.generate(prompts[L], new_tokens, draft=cfg)
        s = out.stats
        r = {"prompt_len": L, "draft": draft_name, "budget": budget, "gamma": cfg.gamma,
             "draft_model": draft_model_name if cfg.kind == "model" else None,
             "acceptance_rate": round(s.acceptance_rate, 4),
             "mean_accepted_per_round": round(s.mean_accepted_per_round, 4),
             "accepted": s.accepted, "drafted": s.drafted, "rounds": s.rounds,
             "budget_covers_context": budget >= L + new_tokens,
             "matches_greedy": out.tokens == reference, "seconds": round(time.perf_counter() - t, 2)}
        results.append(r)
        kind = "model" if cfg.kind == "model" else "self"
        click.echo(f"prompt {L:5d}  {kind:5s} {draft_name:9s} budget {budget:5d} gamma {cfg.gamma}: acceptance "
                   f"{r['acceptance_rate']:.3f}, {r['mean_accepted_per_round']:.2f} tokens/round"
                   f"{'' if r['matches_greedy'] else '  (OUTPUT DIFFERS FROM GREEDY)'} [{r['seconds']:.1f}s]",
                   err=True)

    for L in lengths:
        reference = self_engine.generate(prompts[L], new_tokens).tokens  # plain greedy
        for kv in kv_kinds:
            for budget in budgets:
                for g in gammas:
                    record(L, kv, budget, config("self", kv, budget, g), self_engine, reference)
        if model_engine is not None:
            for g in gammas:
                record(L, "full", -1, DraftConfig(kind="model", kv="full", gamma=g), model_engine, reference)
                for kv in draft_kinds:
                    record(L, kv, draft_budget, config("model", kv, draft_budget, g), model_engine, reference)

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m tools.tiny_model.measure_acceptance "
                   + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "git_commit": git_commit() or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "CPU", "cpu": platform.processor() or platform.machine(), "threads": threads,
        "torch": torch.__version__, "dtype": "float32",
        "params": sum(p.numel() for p in target.parameters()), "train_context": train_context,
        "book": {"id": book["id"], "title": book["title"], "tokens": len(book_tokens)},
        "prompt_lens": lengths, "budgets": budgets, "kv": kv_kinds, "gammas": gammas, "sink": sink,
        "batch": batch, "new_tokens": new_tokens, "draft_model": draft_model_name, "draft_params": draft_params,
        "draft_budget": draft_budget, "draft_kv": list(draft_kinds), "reselect": reselect, "plot": str(out_prefix.with_suffix(".png")),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    report = {"meta": meta, "results": results}
    out_prefix.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out_prefix.with_suffix(".png"), meta, results)
    write_markdown(out_prefix.with_suffix(".md"), meta, results)
    click.echo(f"wrote {out_prefix}.json/.md/.png in {meta['wall_time_s'] / 60:.1f} minutes", err=True)
    return report


if __name__ == "__main__":
    main()
