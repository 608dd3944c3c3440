"""The package's public surface: the README's Python example, run as written."""
import gpt_fast_magicdec as gfm


def test_readme_example_generates_and_speculates_losslessly():
    # On CPU in fp32 on every machine: greedy identity is exact there (bf16 on a GPU allows near-ties).
    engine, tokenizer = gfm.load_engine(device="cpu", attention="torch")  # the bundled tiny model
    ids = [tokenizer.encode("It was a dark and stormy night, and the rain fell in torrents")]
    plain = engine.generate(ids, 24, draft=gfm.DraftConfig(kind="none"))
    spec = engine.generate(ids, 24, draft=gfm.DraftConfig(kind="self", kv="streaming", budget=8, sink=2, gamma=3))
    assert spec.tokens == plain.tokens and len(plain.tokens[0]) == 24
    assert spec.stats.drafted > 0 and spec.stats.accepted > 0  # it really speculated
    assert isinstance(tokenizer.decode(plain.tokens[0]), str)


def test_public_names_exist():
    for name in gfm.__all__:
        assert hasattr(gfm, name), name
    assert {"streaming", "snapkv", "recent", "full"} <= set(gfm.POLICIES)
