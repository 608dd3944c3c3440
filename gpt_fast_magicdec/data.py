"""Prompt sources for generate.py and bench.py.

  read_jsonl_prompts   a prompt file: JSONL with a `text` field per line, or one plain-text prompt
  check_prompt_text    refuse a prompt that is not encodable text (a lone surrogate)
  check_writable       refuse an output path before any work is done
  long_document_prompts  fixed-length token windows cut from long documents (PG-19-style JSONL)
  random_prompts       random token ids (random-weight benchmarks)
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator, Union

import torch

from .errors import UserError

PathLike = Union[str, Path]

# A token is at most this many characters of running text in any tokenizer we support (~4 on
# average in English), so encoding CHARS_PER_TOKEN * length characters yields >= length tokens
# whenever the document has them, without encoding whole 400 KB books.
CHARS_PER_TOKEN = 16


def read_text(path: PathLike) -> str:
    """A file's text, refusing what is not UTF-8 with one line (not a UnicodeDecodeError). A byte-order
    mark at the start (Windows editors write one) is dropped: it is not part of the text, and left in
    it would hide a JSONL file's first `{` and make the whole file one plain-text prompt."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, e.g. "
                        "`iconv -f latin1 -t utf-8`") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def _numbered_rows(text: str, path: PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line of JSONL `text` (from `path`, for messages)."""
    for n, line in enumerate(text.splitlines(), 1):
        line = line.lstrip("\ufeff")  # files joined with `cat` keep each one's byte-order mark
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {n}: not JSON ({err.msg})")
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n}: expected a JSON object")
        yield n, row


def check_writable(path: PathLike, option: str = "--out") -> None:
    """Fail before any work when `path` cannot be written: its directory is missing, is a file,
    or is read-only, or `path` itself is a directory."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"{option} {path}: {parent} {what}; create it first or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write into {parent}; choose another path")


def looks_like_jsonl(text: str) -> bool:
    """JSONL when the first non-blank line is a JSON object; anything else is plain text. The
    content decides, not the file name. (The first line, not every line: a JSONL file with one
    broken line must be an error naming that line, not silently become one text prompt.)"""
    first = next((line for line in text.splitlines() if line.strip()), "").lstrip("\ufeff")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_jsonl_prompts(path: PathLike) -> list[str]:
    """Prompt texts: a JSONL file (see `looks_like_jsonl`) gives its lines' `text` fields; any
    other file is one prompt. An empty file, or one whose prompts are all empty, is refused."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path} is empty: give it prompt text, or JSONL lines with a 'text' field")
    if not looks_like_jsonl(text):
        return [text]
    texts = []
    for n, row in _numbered_rows(text, path):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{path} line {n}: the object has no 'text' string field")
        if not row["text"]:
            raise UserError(f"{path} line {n}: the object has an empty 'text'")
        texts.append(check_prompt_text(row["text"], f"{path} line {n}: 'text'"))
    return texts


def check_prompt_text(text: str, where: str) -> str:
    """`text` unchanged when it can be encoded as UTF-8; else one UserError naming `where` (e.g.
    "--prompt", "docs.jsonl line 3: 'text'"). What cannot be encoded is a lone surrogate: from a
    JSON escape such as "\\ud800" without its pair, or, in a command-line argument, from a byte
    that is not UTF-8 (Python keeps those as U+DC80..U+DCFF). No tokenizer can take it, and
    replacing it would change the prompt without a word, so it is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        source = f"a lone \\u{code:04x} escape" + (f", or the byte 0x{code - 0xDC00:02x} that is not UTF-8"
                                                     if 0xDC80 <= code <= 0xDCFF else "")
        raise UserError(f"{where} holds an unpaired surrogate U+{code:04X} at character {err.start} ({source}): "
                        "it is not text a tokenizer can encode; fix or remove it") from None
    return text


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
