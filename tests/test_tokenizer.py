import shutil

import pytest
from tokenizer_fixtures import (
    SAMPLE_TEXT, TIKTOKEN_MERGES, make_bpe_dir, make_llama3_hf_dir, make_sentencepiece_dir,
    make_tiktoken_dir, write_configs,
)

from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.tokenizer import LLAMA3_SPECIAL_TOKENS, load_tokenizer

TEXTS = [
    "Hello, world!",
    "The year 1984 had 365 days; pi is 3.14159...",
    "café, naïve, élan",
    "中文字符 and mixed text",
    "line one\nline two\n\n\ttabbed  double  spaced",
    "quotes \"like\" 'these' (and) [brackets] {braces} <angles> #$%&*+-/=@^_`|~",
]
BASE = 256 + len(TIKTOKEN_MERGES)  # first special-token id of the tiktoken fixture


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "sentencepiece": make_sentencepiece_dir(root / "sp"),
        "tiktoken": make_tiktoken_dir(root / "tt"),
        "hf-bpe": make_bpe_dir(root / "bpe"),
    }


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf-bpe"])
def test_detection_and_round_trip(dirs, kind):
    tok = load_tokenizer(dirs[kind])
    assert tok.kind == kind
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # merges are applied: common text takes fewer tokens than bytes
    assert len(tok.encode(SAMPLE_TEXT, bos=False)) < 0.9 * len(SAMPLE_TEXT.encode())


def test_sentencepiece_specials(dirs):
    tok = load_tokenizer(dirs["sentencepiece"])
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (400, 1, (2,))
    assert tok.encode("the river")[0] == 1 and tok.encode("the river", bos=False)[0] != 1
    assert tok.decode(tok.encode("the river")) == "the river"  # SentencePiece drops <s> itself
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("no-such-piece") is None


def test_tiktoken_specials_and_merges(dirs):
    tok = load_tokenizer(dirs["tiktoken"])
    assert tok.vocab_size == BASE + 256 == BASE + len(LLAMA3_SPECIAL_TOKENS)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>", "<|reserved_special_token_250|>"]
    assert [tok.token_to_id(t) for t in names] == [BASE, BASE + 1, BASE + 6, BASE + 7, BASE + 9, BASE + 255]
    assert tok.bos_id == BASE and tok.eos_ids == (BASE + 1, BASE + 9)
    assert tok.encode("the", bos=False) == [258] and tok.encode(" the", bos=False) == [259]
    assert tok.encode("hi") == [BASE, ord("h"), ord("i")]
    # chat markup in the text becomes special ids, and decodes back to the same text
    chat = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = tok.encode(chat, bos=False)
    assert ids[0] == BASE + 6 and ids[-1] == BASE + 9 and tok.decode(ids) == chat


def test_hf_bpe_specials(dirs):
    tok = load_tokenizer(dirs["hf-bpe"])
    assert tok.vocab_size == 400 and tok.bos_id is None and tok.eos_ids == ()
    assert tok.encode("hi") == tok.encode("hi", bos=False)  # no BOS to add
    assert tok.encode("a<|im_end|>", bos=False)[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode([2]) == "<|im_end|>"


def test_hf_llama3_matches_tiktoken(dirs, tmp_path):
    tt = load_tokenizer(dirs["tiktoken"])
    hf = load_tokenizer(make_llama3_hf_dir(tmp_path))
    assert hf.kind == "hf-bpe" and hf.vocab_size == tt.vocab_size
    for text in TEXTS + ["<|begin_of_text|>the end<|eot_id|>"]:
        assert hf.encode(text) == tt.encode(text)
    assert hf.bos_id == BASE and hf.eos_ids == (BASE + 9,)  # from its tokenizer_config.json
    assert hf.fingerprint() == tt.fingerprint()  # same vocab, two file formats


def test_sentencepiece_model_wins_over_tokenizer_json(dirs, tmp_path):
    d = shutil.copytree(dirs["sentencepiece"], tmp_path / "both")
    shutil.copy(dirs["hf-bpe"] / "tokenizer.json", d)
    assert load_tokenizer(d).kind == "sentencepiece"
    assert load_tokenizer(d / "tokenizer.model").kind == "sentencepiece"  # a file means its dir


def test_missing_or_bad_tokenizer(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="tokenizer.model") as e:
        load_tokenizer(empty)
    assert str(empty) in str(e.value) and "tokenizer.json" in str(e.value)
    (tmp_path / "tokenizer.model").write_text("this is not base64 !!\n")
    with pytest.raises(UserError, match="neither a SentencePiece model nor a tiktoken"):
        load_tokenizer(tmp_path)


def test_bos_eos_from_config_files(dirs, tmp_path):
    d = shutil.copytree(dirs["tiktoken"], tmp_path / "gen")
    write_configs(d, generation_config={"bos_token_id": 65, "eos_token_id": [66, BASE + 9]},
                  config={"bos_token_id": 70, "eos_token_id": 67})
    tok = load_tokenizer(d)
    assert tok.bos_id == 65 and tok.eos_ids == (66, BASE + 9, 67)  # eos: union of the files
    assert tok.encode("x")[0] == 65

    d = shutil.copytree(dirs["hf-bpe"], tmp_path / "qwen")
    write_configs(d, tokenizer_config={"bos_token": None, "eos_token": {"content": "<|im_end|>"}},
                  generation_config={"bos_token_id": 0, "eos_token_id": 0})
    tok = load_tokenizer(d)
    assert tok.bos_id is None and tok.eos_ids == (2, 0)  # tokenizer_config's null BOS wins

    write_configs(d, tokenizer_config={"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"})
    tok = load_tokenizer(d)
    assert tok.bos_id == 1 and tok.eos_ids == (0,) and tok.encode("hi")[0] == 1

    tok = load_tokenizer(d, bos_id=5, eos_ids=[7, 8])  # explicit arguments win
    assert tok.bos_id == 5 and tok.eos_ids == (7, 8)


def test_bad_special_ids_are_user_errors(dirs, tmp_path):
    d = shutil.copytree(dirs["hf-bpe"], tmp_path / "bad")
    write_configs(d, tokenizer_config={"eos_token": "<|no_such_token|>"})
    with pytest.raises(UserError, match="no_such_token"):
        load_tokenizer(d)
    with pytest.raises(UserError, match="outside"):
        load_tokenizer(dirs["hf-bpe"], eos_ids=[400])


def test_fingerprint(dirs, tmp_path):
    fps = {k: load_tokenizer(d).fingerprint() for k, d in dirs.items()}
    assert len(set(fps.values())) == 3
    for kind, d in dirs.items():
        copy = shutil.copytree(d, tmp_path / f"copy-{kind}")
        write_configs(copy, generation_config={"eos_token_id": 3})  # specials are not the vocab
        assert load_tokenizer(copy).fingerprint() == fps[kind]
    others = {
        "sentencepiece": make_sentencepiece_dir(tmp_path / "sp380", vocab_size=380),
        "tiktoken": make_tiktoken_dir(tmp_path / "tt", TIKTOKEN_MERGES[:-1]),
        "hf-bpe": make_bpe_dir(tmp_path / "bpe", vocab_size=399),
    }
    for kind, d in others.items():
        assert load_tokenizer(d).fingerprint() != fps[kind], kind


# ---- ids beyond the tokenizer (a padded embedding) ---------------------------------------------
@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf-bpe"])
@pytest.mark.parametrize("beyond", [lambda n: [n], lambda n: [n, n + 63, 2**40], lambda n: [-1]])
def test_ids_without_a_piece_are_skipped_and_counted(dirs, kind, beyond):
    """A model whose embedding has more rows than its tokenizer has pieces can produce an id the
    tokenizer never saw; decoding skips it (the raw libraries raise) and says how many."""
    tok = load_tokenizer(dirs[kind])
    ids = tok.encode("the river ran low", bos=False)
    extra = beyond(tok.vocab_size)
    mixed = ids[:2] + extra + ids[2:]
    assert tok.decode(mixed) == "the river ran low"
    assert tok.decode_counted(mixed) == ("the river ran low", len(extra))
    assert tok.decode_counted(ids) == ("the river ran low", 0)
    assert tok.decode_counted(extra) == ("", len(extra))
    assert not any(tok.has_id(i) for i in extra) and all(tok.has_id(i) for i in ids)


def test_the_raw_libraries_do_raise_on_such_ids(dirs):
    """What the skip protects against (so the test above tests something)."""
    sp = load_tokenizer(dirs["sentencepiece"])
    with pytest.raises(IndexError, match="out of range"):
        sp.sp.decode([sp.vocab_size])
    tt = load_tokenizer(dirs["tiktoken"])
    with pytest.raises(Exception):
        tt.enc.decode([tt.vocab_size + 5])


def test_hf_tokenizer_with_a_gap_in_its_ids(dirs, tmp_path):
    """tokenizer.json ids need not be contiguous: an added token far above the rest leaves a gap."""
    import json

    path = shutil.copytree(dirs["hf-bpe"], tmp_path / "gap") / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["model"]["vocab"]["Ġpadding"] = 1000  # reachable by no merge, but a piece all the same
    path.write_text(json.dumps(spec))
    tok = load_tokenizer(path.parent)
    assert tok.vocab_size == 1001 and tok.has_id(1000) and not tok.has_id(999)
    assert tok.decode_counted([999, 1000]) == (" padding", 1)
