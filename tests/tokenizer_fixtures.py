"""Tiny tokenizer checkpoints built on the spot (no downloads), for tokenizer, converter and
end-to-end tests. Each builder writes into `path` (created if missing) and returns it.

    from tokenizer_fixtures import make_sentencepiece_dir, make_tiktoken_dir, make_bpe_dir
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

SAMPLE_TEXT = """\
The river ran low that summer, and the children walked along its stony bed to the old mill.
They counted the stones: one, two, three, and then 42 more before the light began to fade.
"Where are you going?" asked the miller. "To the bridge and back," said the eldest, laughing.
In the evening the lamps were lit in every window of the village, and the bells rang at nine.
A traveller came in from the north road with a pack on his back and 17 coins in his purse;
he asked for bread, cheese and a bed, and paid for them with the last of his silver.
Nobody knew where he had come from, nor where he was going, but he told good stories.
He spoke of mountains higher than clouds, of cities with towers of glass, of ships at sea.
The children listened until the fire burned down, then went home through the dark streets.
"""

# Byte-pair merges for the tiktoken fixture, in rank order (ranks 256, 257, ...).
TIKTOKEN_MERGES = [
    (b"t", b"h"), (b"h", b"e"), (b"th", b"e"), (b" ", b"the"), (b"i", b"n"),
    (b"e", b"r"), (b"a", b"n"), (b"n", b"d"), (b" ", b"a"), (b"in", b"g"), (b" a", b"nd"),
]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def write_configs(path, tokenizer_config=None, generation_config=None, config=None) -> Path:
    """Writes whichever of tokenizer_config.json / generation_config.json / config.json are given
    (dicts) into `path`, e.g. `write_configs(d, generation_config={"eos_token_id": [2, 5]})`."""
    path = Path(path)
    for name, obj in [("tokenizer_config", tokenizer_config), ("generation_config", generation_config),
                      ("config", config)]:
        if obj is not None:
            _write_json(path / f"{name}.json", obj)
    return path


def make_sentencepiece_dir(path, text: str = SAMPLE_TEXT, vocab_size: int = 400) -> Path:
    """A Llama-2-style SentencePiece BPE `tokenizer.model` (byte fallback, identity
    normalization, unk=0 bos=1 eos=2) trained on `text`; round-trips any UTF-8 text that
    does not start with a space. Takes about a second."""
    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text(text * 4, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2,
    )
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    return path


def make_tiktoken_dir(path, merges=TIKTOKEN_MERGES) -> Path:
    """A Llama-3-style tiktoken rank file `tokenizer.model`: the 256 single bytes as ranks
    0..255, then each merged pair of `merges` at ranks 256, 257, ... The loader appends the
    256 Llama-3 special tokens, so `<|begin_of_text|>` is id 256 + len(merges)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for rank, tok in enumerate(tokens)]
    (path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return path


def make_llama3_hf_dir(path, merges=TIKTOKEN_MERGES) -> Path:
    """The HF `tokenizer.json` spelling of `make_tiktoken_dir(path, merges)`: same ids for every
    text, as in an HF-format Llama-3 checkpoint (byte-level BPE, Llama-3 split regex, the 256
    special tokens as added tokens). Also writes a tokenizer_config.json naming BOS/EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from gpt_fast_magicdec.tokenizer import LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS, byte_level_alphabet

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spell = byte_level_alphabet()
    word = lambda tok: "".join(spell[b] for b in tok)  # noqa: E731
    tokens = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    vocab = {word(tok): i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, [(word(a), word(b)) for a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    return write_configs(path, tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})


def make_bpe_dir(path, text: str = SAMPLE_TEXT, vocab_size: int = 400,
                 special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> Path:
    """A Qwen-style byte-level BPE `tokenizer.json` (ByteLevel pre-tokenizer and decoder, all 256
    bytes in the alphabet) trained on `text`, with `special_tokens` at ids 0, 1, ...; writes no
    config files, so the tokenizer has no BOS/EOS until `write_configs` adds some."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True) * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    return path
