"""Tokenizers, detected from what a checkpoint directory holds (never configured):

- `tokenizer.model` that is a SentencePiece protobuf (Llama-2, Mistral, TinyLlama);
- `tokenizer.model` that is a Llama-3 tiktoken rank file (`<base64 bytes> <rank>` lines);
- `tokenizer.json`, loaded with the `tokenizers` library (Qwen2.5, HF-format Llama-3).

BOS/EOS ids come from the checkpoint's config files, else from the tokenizer itself."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Union

from .errors import UserError

# Meta's Llama-3 pre-tokenizer regex and special tokens, appended after the base ranks.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]  # 256 in all


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: how HF `tokenizer.json` spells byte-level tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class Tokenizer:
    """Subclasses implement `_encode(text)`, `_decode(ids)` (ids it has), `token_to_id(token)`
    (None when absent) and `_vocab()` (id -> token string); `load_tokenizer` sets `bos_id` and
    `eos_ids`."""

    kind: str = ""
    vocab_size: int = 0  # 1 + the largest id the tokenizer can produce, specials included
    bos_id: Optional[int] = None
    eos_ids: tuple[int, ...] = ()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, specials included (callers strip what they don't want). An id the
        tokenizer has no piece for is skipped: a model's embedding often has more rows than its
        tokenizer has pieces (vocabularies padded to a multiple of 64 or 128), and the model may
        produce one; `decode_counted` also says how many were skipped."""
        return self.decode_counted(ids)[0]

    def decode_counted(self, ids: Iterable[int]) -> tuple[str, int]:
        """(text, n_unknown): `decode(ids)` and the number of ids skipped for having no piece."""
        ids = [int(i) for i in ids]
        known = [i for i in ids if self.has_id(i)]
        return self._decode(known), len(ids) - len(known)

    def has_id(self, i: int) -> bool:
        """Whether id `i` has a piece (a token string) in this tokenizer."""
        return 0 <= i < self.vocab_size

    def fingerprint(self) -> str:
        """sha256 of the id -> token table, spelled as in HF `tokenizer.json`, so the same vocab
        gives the same fingerprint whatever file it came from (e.g. Llama-2's tokenizer.model
        and its tokenizer.json). BOS/EOS choices are not part of it."""
        if not hasattr(self, "_fingerprint"):
            table = json.dumps(sorted(self._vocab().items()), ensure_ascii=True)
            self._fingerprint = hashlib.sha256(table.encode()).hexdigest()
        return self._fingerprint

    def _default_special_ids(self) -> tuple[Optional[int], tuple[int, ...]]:
        return None, ()  # (BOS, EOS ids) when no config file names them

    def __repr__(self):
        return f"<{self.kind} tokenizer, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids}>"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, sp):
        self.sp = sp
        self.vocab_size = sp.vocab_size()

    def _encode(self, text):
        return self.sp.encode(text)

    def _decode(self, ids):
        return self.sp.decode(ids)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)  # unknown pieces map to unk_id, so check the round trip
        return i if self.sp.id_to_piece(i) == token else None

    def _vocab(self):
        return {i: self.sp.id_to_piece(i) for i in range(self.vocab_size)}

    def _default_special_ids(self):
        bos, eos = self.sp.bos_id(), self.sp.eos_id()  # -1 when the model has none
        return (bos if bos >= 0 else None), ((eos,) if eos >= 0 else ())


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path):
        import tiktoken

        ranks = {}
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error is a ValueError too
                raise UserError(f"{path} is neither a SentencePiece model nor a tiktoken rank file "
                                f"(line {n} is not '<base64 token> <rank>')") from None
        # Specials take ids len(ranks) + i, so the ranks must be exactly 0..len-1.
        if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
            raise UserError(f"{path}: tiktoken ranks must be 0..N-1 without gaps or repeats")
        self.special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.ranks = ranks
        self.enc = tiktoken.Encoding(name=f"llama3:{path}", pat_str=LLAMA3_PAT_STR,
                                     mergeable_ranks=ranks, special_tokens=self.special)
        self.vocab_size = self.enc.n_vocab

    def _encode(self, text):
        # Special-token text (chat markup) becomes its id, as with HF-format Llama-3 tokenizers.
        return self.enc.encode(text, allowed_special="all", disallowed_special=())

    def _decode(self, ids):
        return self.enc.decode(ids)

    def token_to_id(self, token):
        return self.special.get(token, self.ranks.get(token.encode("utf-8")))

    def _vocab(self):
        alphabet = byte_level_alphabet()
        vocab = {i: "".join(alphabet[b] for b in tok) for tok, i in self.ranks.items()}
        return {**vocab, **{i: t for t, i in self.special.items()}}

    def _default_special_ids(self):
        s = self.special
        return s["<|begin_of_text|>"], (s["<|end_of_text|>"], s["<|eot_id|>"])


class HFTokenizer(Tokenizer):
    kind = "hf-bpe"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise UserError(f"{path} needs the 'tokenizers' package: pip install tokenizers") from None
        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception on bad JSON
            raise UserError(f"cannot load {path}: {e}") from None
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids  # BOS is ours to add

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def has_id(self, i):  # a tokenizer.json's ids may have gaps below its largest
        if not hasattr(self, "_ids"):
            self._ids = frozenset(self._vocab())
        return i in self._ids

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def _vocab(self):
        return {i: t for t, i in self.tok.get_vocab(with_added_tokens=True).items()}


def _detect(d: Path) -> Tokenizer:
    model, js = d / "tokenizer.model", d / "tokenizer.json"
    if model.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(model))
            if sp.vocab_size() > 0:
                return SentencePieceTokenizer(sp)
        except (RuntimeError, OSError):
            pass  # not a protobuf: a Llama-3 tiktoken rank file, or garbage
        return TiktokenTokenizer(model)
    if js.is_file():
        return HFTokenizer(js)
    raise UserError(f"no tokenizer in {d}: looked for tokenizer.model (SentencePiece or tiktoken) "
                    "and tokenizer.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _ids(value) -> list[int]:  # config ids are an int, a list of ints, or null
    return [] if value is None else [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _config_special_ids(tok: Tokenizer, d: Path) -> tuple[Optional[int], tuple[int, ...]]:
    tc_path = d / "tokenizer_config.json"
    tc, gc, cc = _read_json(tc_path), _read_json(d / "generation_config.json"), _read_json(d / "config.json")

    def named(key):  # tokenizer_config names tokens by string, sometimes as {"content": ...}
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v is None:
            return []
        i = tok.token_to_id(v)
        if i is None:
            raise UserError(f"{tc_path}: {key} {v!r} is not in the tokenizer's vocabulary")
        return [i]

    default_bos, default_eos = tok._default_special_ids()
    # BOS: the first file that says wins; tokenizer_config's `"bos_token": null` (Qwen) means none.
    if tc.get("add_bos_token") is False:
        bos = None
    elif "bos_token" in tc:
        bos = (named("bos_token") or [None])[0]
    else:
        found = _ids(gc.get("bos_token_id")) or _ids(cc.get("bos_token_id"))
        bos = found[0] if found else default_bos
    # EOS: the union, since instruct checkpoints split them (tokenizer_config: <|eot_id|>,
    # generation_config: [<|end_of_text|>, <|eot_id|>]); stopping at any of them is right.
    eos = named("eos_token") + _ids(gc.get("eos_token_id")) + _ids(cc.get("eos_token_id"))
    return bos, tuple(dict.fromkeys(eos)) or default_eos


def load_tokenizer(
    directory: Union[str, Path], bos_id: Optional[int] = None, eos_ids: Optional[Iterable[int]] = None
) -> Tokenizer:
    """The tokenizer in `directory` (a file path means its directory). Explicit `bos_id` /
    `eos_ids` win over the checkpoint's config files, which win over the tokenizer's defaults."""
    d = Path(directory)
    d = d.parent if d.is_file() else d
    tok = _detect(d)
    cfg_bos, cfg_eos = _config_special_ids(tok, d)
    tok.bos_id = bos_id if bos_id is not None else cfg_bos
    tok.eos_ids = tuple(_ids(eos_ids)) if eos_ids is not None else cfg_eos
    for i in ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.eos_ids):
        if not 0 <= i < tok.vocab_size:
            raise UserError(f"special token id {i} is outside the vocab of the {tok.kind} tokenizer "
                            f"in {d} (ids 0..{tok.vocab_size - 1})")
    return tok


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, where) -> None:
    """Refuse at load a tokenizer that can produce ids the model has no embedding for (it would
    fail mid-run with an IndexError, or on GPU read garbage). A tokenizer smaller than the model's
    padded vocabulary is fine."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the {tokenizer.kind} tokenizer of {where} produces ids up to "
                        f"{tokenizer.vocab_size - 1}, but the model's vocabulary has {vocab_size} entries: "
                        "this tokenizer does not belong to this model")


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, draft_where) -> None:
    """Speculative decoding compares token ids: the draft must use the target's vocabulary, token
    for token (equal sizes are not enough)."""
    if draft.fingerprint() != target.fingerprint():
        raise UserError(f"the draft's tokenizer ({draft_where}) differs from the target's: speculative "
                        "decoding needs both models to share one vocabulary")
