"""Prompt sources for generate.py and bench.py.

  read_jsonl_prompts   a prompt file: JSONL with a `text` field per line, or one plain-text prompt
  write_jsonl          one JSON object per line
  long_document_prompts  fixed-length token windows cut from long documents (PG-19-style JSONL)
  random_prompts       random token ids (random-weight benchmarks)
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Iterator, Union

import torch

from .errors import UserError

PathLike = Union[str, Path]

# A token is at most this many characters of running text in any tokenizer we support (~4 on
# average in English), so encoding CHARS_PER_TOKEN * length characters yields >= length tokens
# whenever the document has them, without encoding whole 400 KB books.
CHARS_PER_TOKEN = 16


def read_jsonl(path: PathLike) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one per non-empty line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {n}: not JSON ({err.msg})")
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n}: expected a JSON object")
            yield row


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl_prompts(path: PathLike) -> list[str]:
    """Prompt texts: a `.jsonl` file gives its lines' `text` fields; any other file is one prompt."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path}: object {n} has no 'text' string field")
        texts.append(row["text"])
    return texts


def long_document_prompts(path: PathLike, tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of exactly `length` tokens (BOS + length - 1 text tokens when the tokenizer has a
    BOS) cut from the documents of a PG-19-style JSONL file (`text` field).

    Documents are visited in an order shuffled by `seed`; those shorter than a prompt are skipped.
    Each document gives one window at a seeded offset, so a batch spans as many books as there are;
    when n exceeds the long-enough documents, further passes take the next non-overlapping window
    of each document in turn. Raises UserError if the file cannot supply n windows."""
    if n < 1 or length < 2:
        raise UserError(f"need n >= 1 prompts of length >= 2, got n={n}, length={length}")
    rng = random.Random(seed)
    texts = read_jsonl_prompts(path)
    rng.shuffle(texts)
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    body = length - len(head)
    per_doc = []  # per long-enough document: its windows [start, start + body) in the order taken
    for text in texts:
        ids = tokenizer.encode(text[:CHARS_PER_TOKEN * body * n], bos=False)  # never more than n windows
        count = len(ids) // body
        if count == 0:
            continue
        first = rng.randrange(count)
        starts = [(first + k) % count * body for k in range(count)]
        per_doc.append([ids[s:s + body] for s in starts])
        if len(per_doc) >= n:
            break
    prompts = []
    for k in range(max(map(len, per_doc), default=0)):  # round-robin: pass k takes window k of each
        prompts += [head + windows[k] for windows in per_doc if k < len(windows)]
    if len(prompts) < n:
        raise UserError(f"{path}: only {len(prompts)} windows of {length} tokens in {len(per_doc)} long-enough "
                        f"documents, {n} needed; use a larger file or shorter --prompt-lengths")
    return prompts[:n]


def random_prompts(vocab_size: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` uniform random token ids (for random-weight benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (n, length), generator=gen).tolist()
