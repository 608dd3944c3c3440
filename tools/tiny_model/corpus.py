"""The Gutenberg corpus the bundled tiny model is trained on: reading it, the fixed train /
validation split by book, and training the SentencePiece tokenizer on a sample of it.

The corpus is JSON Lines, one book per line: `{"id": <Project Gutenberg number>, "title", "text"}`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gpt_fast_magicdec.errors import UserError

# Two whole books never seen in training (neither by the tokenizer nor the model): the validation
# loss and every acceptance measurement use them. Fixed here so results stay comparable.
VALIDATION_BOOK_IDS = (84, 2852)  # Frankenstein; The Hound of the Baskervilles
# Where the corpus lives by default, relative to the repository root.
DEFAULT_CORPUS = "../shared/corpus/gutenberg-train.jsonl"

# Llama-2's special-token layout.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def read_books(path: Path) -> list[dict]:
    """All books of the JSONL corpus at `path`, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus {path} not found: pass --corpus PATH to the Gutenberg JSONL file "
                        f"(default {DEFAULT_CORPUS} relative to the repository root)")
    books = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                book = json.loads(line)
                books.append({"id": int(book["id"]), "title": str(book["title"]), "text": str(book["text"])})
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n} is not a book record {{id, title, text}} ({e})") from None
    return books


def split_books(books: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, validation): validation is VALIDATION_BOOK_IDS, in that order."""
    by_id = {b["id"]: b for b in books}
    missing = [i for i in VALIDATION_BOOK_IDS if i not in by_id]
    if missing:
        raise UserError(f"the corpus lacks the validation book(s) {missing}; use the Gutenberg corpus "
                        "described in shared/corpus/README.md")
    val = [by_id[i] for i in VALIDATION_BOOK_IDS]
    train = [b for b in books if b["id"] not in VALIDATION_BOOK_IDS]
    return train, val


def tokenizer_sample(books: list[dict], total_chars: int, chunk_chars: int = 4000) -> list[str]:
    """About `total_chars` of text as lines: evenly spaced chunks from every book, the same share
    of each book's length, so long books do not crowd out short ones. Deterministic."""
    lines: list[str] = []
    all_chars = sum(len(b["text"]) for b in books)
    for book in books:
        text = book["text"]
        want = max(chunk_chars, int(total_chars * len(text) / all_chars))
        n_chunks = max(1, want // chunk_chars)
        stride = max(chunk_chars, len(text) // n_chunks)
        for start in range(0, len(text), stride)[:n_chunks]:
            lines.extend(l for l in text[start:start + chunk_chars].split("\n") if l.strip())
    return lines


def train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    """Train a Llama-2-style SentencePiece BPE tokenizer on `lines`; returns the `.model` file.

    Llama-2's choices: BPE, byte fallback (no text is ever <unk>), digits split, whitespace kept
    as written (no normalisation), a dummy-prefix space, <unk>=0 <s>=1 </s>=2, no padding id.
    Newlines are not pieces, so "\\n" encodes as the byte token <0x0A>, as in Llama-2."""
    import sentencepiece as spm

    # The trainer records its output prefix inside the model file: train under a temporary
    # working directory with a bare prefix so the file is byte-identical run to run.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix="tokenizer", vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.9995,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
                input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16,
                num_threads=1, minloglevel=2,
            )
            return Path("tokenizer.model").read_bytes()
        finally:
            os.chdir(cwd)
