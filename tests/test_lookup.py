"""Prompt-lookup (n-gram) drafting: the matcher, its proposals, and lossless generation with it
alone and chained in front of a model draft."""
import copy
import types
from pathlib import Path

import pytest
import torch

from gpt_fast_magicdec import Engine
from gpt_fast_magicdec.drafters.lookup import LookupDrafter, most_recent_match
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.sampling import SamplingParams
from test_speculative import sharp_model


def history(*rows, width=16):
    """[B, width] token rows padded with a token that never matches (stale history past the end)."""
    out = torch.full((len(rows), width), 999)
    for b, row in enumerate(rows):
        out[b, :len(row)] = torch.tensor(row)
    return out


def test_most_recent_match_finds_the_latest_earlier_occurrence():
    h = history([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3],  # "1 2 3" ends the text; it occurred at 0 and 4
                [5, 6, 5, 6, 8],  # "6 8" never occurred before: no 2-gram match
                [4, 4])  # a 1-gram: position 0 holds the same token as the last one
    last = torch.tensor([10, 4, 1])  # positions of the last known token
    assert most_recent_match(h, last, 3).tolist() == [7, -1, -1]  # after the match at 4: position 7
    assert most_recent_match(h, last, 2).tolist() == [7, -1, -1]
    assert most_recent_match(h, last, 1).tolist() == [7, -1, 1]
    assert most_recent_match(h, torch.tensor([2, 4, 1]), 3).tolist() == [-1, -1, -1]  # only the suffix itself


def test_proposals_copy_what_followed_and_never_read_past_the_text():
    drafter = LookupDrafter(DraftConfig(kind="lookup", ngram=2, gamma=3))
    tokens = history([1, 2, 3, 4, 1, 2], [7, 8, 9, 7, 8, 9, 7, 8], [5, 6, 7])
    state = types.SimpleNamespace(tokens=tokens, cache_len=torch.tensor([5, 7, 2]))
    proposal = drafter.propose(state, 3, SamplingParams())
    assert proposal.probs is None  # deterministic: verified as a one-hot draft
    assert proposal.tokens[0].tolist() == [3, 4, 1] and proposal.count[0] == 3
    # "7 8" last occurred at 3..4; what followed is "9 7 8", all known
    assert proposal.tokens[1].tolist() == [9, 7, 8] and proposal.count[1] == 3
    assert proposal.count[2] == 0  # no earlier "6 7", no earlier "7": nothing proposed
    near_end = types.SimpleNamespace(tokens=history([3, 4, 3]), cache_len=torch.tensor([2]))
    proposal = drafter.propose(near_end, 3, SamplingParams())  # "3" at 0 was followed by "4 3", then the end
    assert proposal.count.tolist() == [2] and proposal.tokens[0, :2].tolist() == [4, 3]


def test_ngram_min_leaves_short_matches_unproposed():
    tokens = history([4, 4], [1, 2, 9, 1, 2])  # row 0 only has a 1-gram match, row 1 a 2-gram
    state = types.SimpleNamespace(tokens=tokens, cache_len=torch.tensor([1, 4]))
    for ngram_min, counts in ((1, [1, 2]), (2, [0, 2])):
        drafter = LookupDrafter(DraftConfig(kind="lookup", ngram=3, ngram_min=ngram_min, gamma=2))
        assert drafter.propose(state, 2, SamplingParams()).count.tolist() == counts


def test_ngram_must_be_positive():
    with pytest.raises(UserError, match="^ngram must be >= 1"):
        DraftConfig(kind="lookup", ngram=0)
    with pytest.raises(UserError, match="^ngram_min must be between 1 and ngram"):
        DraftConfig(kind="lookup", ngram=2, ngram_min=3)


def repetitive_prompts():
    """Ragged prompts that repeat phrases, so a lookup draft finds matches (and misses some)."""
    return [[5, 6, 7, 8, 9] * 3 + [5, 6], [11, 12, 13, 11, 12, 13, 11], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def target():
    return sharp_model()


DRAFTS = {
    "lookup": DraftConfig(kind="lookup", gamma=3),
    "lookup ngram 1": DraftConfig(kind="lookup", ngram=1, gamma=4),
    "lookup+self": DraftConfig(kind="lookup+self", budget=16, sink=4, gamma=3),
    "lookup+model": DraftConfig(kind="lookup+model", kv="full", gamma=2),
}


@pytest.mark.parametrize("name", sorted(DRAFTS))
def test_greedy_lookup_is_lossless_batched_and_ragged(target, name):
    draft = DRAFTS[name]
    engine = Engine(target, draft_model=copy.deepcopy(target) if "model" in draft.stages else None,
                    attention="torch")
    plain = engine.generate(repetitive_prompts(), 40).tokens
    result = engine.generate(repetitive_prompts(), 40, draft=draft)
    assert result.tokens == plain
    assert result.stats.drafted > 0 and 0 < result.stats.accepted


def test_lookup_accepts_what_the_text_repeats(tmp_path, monkeypatch):
    """The bundled model, prompted with its own looping continuation of a held-out passage, goes on
    repeating it: the lookup draft copies that from the context and is mostly accepted."""
    import gpt_fast_magicdec as gfm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine, tokenizer = gfm.load_engine(device="cpu", attention="torch")
    text = (Path(__file__).parent / "data" / "long_passage.txt").read_text()
    prompt = tokenizer.encode(text[:1400])
    prompt += engine.generate([prompt], 120).tokens[0]
    plain = engine.generate([prompt], 48)
    lookup = engine.generate([prompt], 48, draft=DraftConfig(kind="lookup", gamma=3))
    assert lookup.tokens == plain.tokens
    assert lookup.stats.acceptance_rate > 0.5 and lookup.stats.mean_accepted_per_round > 2, lookup.stats
