"""Prompt lookup beside self-speculation on the bundled model: acceptance and tokens per round.

    python -m benchmarks.lookup_acceptance          # writes benchmarks/lookup_acceptance.md / .json

Three tasks on the held-out passage (tests/data/long_passage.txt, a chapter the model never saw),
eight prompts each, decoded side by side:
  continue   a ~1,200-character window of the passage; the model goes on writing
  repeat     a paragraph, a blank line, then the paragraph's first words again: a text that asks
             to be copied from the context ("repeat the paragraph that begins ...")
  loop       a window followed by the model's own 120-token continuation of it: a 6M-parameter
             model falls into loops, so its next words are already in the context
Drafts: the self-draft (StreamingLLM view, the default budget clipped to a quarter of the shortest
prompt, gamma 3), prompt lookup (n-gram <= 3, gamma 3), the chain lookup+self, and the chain with
only 3-gram matches allowed to override the self-draft (--ngram-min 3). Every run is
checked token for token against plain decoding (greedy, fp32).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import gpt_fast_magicdec as gfm
from gpt_fast_magicdec.benchmarking.report import device_name, git_commit, utc_now

ROOT = Path(__file__).resolve().parents[1]
PASSAGE = ROOT / "tests" / "data" / "long_passage.txt"
NEW_TOKENS = 64
N_PROMPTS = 8


def tasks(engine, tokenizer) -> dict:
    text = PASSAGE.read_text()
    starts = [600 + 1400 * i for i in range(N_PROMPTS)]
    windows = [text[s:s + 1200] for s in starts]
    paragraphs = [text[s:s + 700] for s in starts]
    cont = [tokenizer.encode(w) for w in windows]
    looped = engine.generate(cont, 120).tokens
    return {"continue": cont,
            "repeat": [tokenizer.encode(p + "\n\n" + p[:120]) for p in paragraphs],
            "loop": [c + t for c, t in zip(cont, looped)]}


def main() -> None:
    torch.set_num_threads(2)
    engine, tokenizer = gfm.load_engine(device="cpu", attention="torch")
    rows = []
    for task, prompts in tasks(engine, tokenizer).items():
        plain = engine.generate(prompts, NEW_TOKENS).tokens
        shortest = min(map(len, prompts))
        drafts = {"self": gfm.DraftConfig(kind="self", gamma=3).for_context(shortest),
                  "lookup": gfm.DraftConfig(kind="lookup", gamma=3),
                  "lookup+self": gfm.DraftConfig(kind="lookup+self", gamma=3).for_context(shortest),
                  "lookup+self, 3-grams": gfm.DraftConfig(kind="lookup+self", ngram_min=3, gamma=3).for_context(shortest)}
        for name, draft in drafts.items():
            result = engine.generate(prompts, NEW_TOKENS, draft=draft)
            st = result.stats
            rows.append(dict(task=task, draft=name, describe=draft.describe(), prompt_tokens=shortest,
                             acceptance=round(st.acceptance_rate or 0.0, 3),
                             tokens_per_round=round(st.mean_accepted_per_round or 1.0, 2),
                             rounds=st.rounds, drafted=st.drafted, lossless=result.tokens == plain))
            print(rows[-1], file=sys.stderr)
    meta = dict(command="python -m benchmarks.lookup_acceptance", git_commit=git_commit(), date=utc_now(),
                device=device_name(torch.device("cpu")), torch=torch.__version__, model="bundled tiny model",
                new_tokens=NEW_TOKENS, prompts_per_task=N_PROMPTS)
    out = ROOT / "benchmarks"
    (out / "lookup_acceptance.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    (out / "lookup_acceptance.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list) -> str:
    lines = ["# Prompt lookup beside self-speculation (bundled tiny model, CPU, fp32, greedy)", "",
             f"`{meta['command']}` at commit `{meta['git_commit']}`, {meta['date']}, {meta['device']}, torch "
             f"{meta['torch']}; {meta['prompts_per_task']} prompts per task decoded side by side, "
             f"{meta['new_tokens']} new tokens each. Acceptance: accepted / proposed draft tokens; tokens per "
             "round: tokens each sequence emits per target pass (accepted drafts + the target's own).", "",
             "| task | draft | shortest prompt | acceptance | tokens / round | rounds | drafts proposed | lossless |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['describe']} | {r['prompt_tokens']} | {r['acceptance']} | "
                     f"{r['tokens_per_round']} | {r['rounds']} | {r['drafted']} | {'yes' if r['lossless'] else 'NO'} |")
    lines += ["", "Most tokens per round, by task: " + "; ".join(
        f"{task}: {best['draft']} ({best['tokens_per_round']})" for task, best in
        ((t, max((r for r in rows if r["task"] == t), key=lambda r: r["tokens_per_round"]))
         for t in dict.fromkeys(r["task"] for r in rows))) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
