"""The bundled standalone draft model (gpt_fast_magicdec/tiny/draft): a small Hugging Face Llama with
the target's own tokenizer; it converts into the user cache on first use, agrees with `transformers`,
and as the draft of the bundled target, speculative decoding on held-out text
(tests/data/tiny_passage.txt, from Frankenstein) gives the target's own greedy output."""
import json
from pathlib import Path

import pytest
import torch

from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec import Engine, load_model
from gpt_fast_magicdec.tiny import bundled_draft_hf_dir, bundled_hf_dir
from gpt_fast_magicdec.tokenizer import load_tokenizer
from hf_fixtures import max_logit_diff_vs_transformers

PASSAGE = Path(__file__).parent / "data" / "tiny_passage.txt"
NEW_TOKENS = 32
GAMMA = 3


@pytest.fixture(scope="module")
def checkpoints(bundled_checkpoints):
    return bundled_checkpoints


@pytest.fixture(scope="module")
def setup(checkpoints):
    target_ckpt, draft_ckpt = checkpoints
    tok = load_tokenizer(target_ckpt)
    prompt = tok.encode(PASSAGE.read_text(encoding="utf-8"))
    target = load_model(target_ckpt, "cpu", torch.float32)
    draft = load_model(draft_ckpt, "cpu", torch.float32)
    engine = Engine(target, draft_model=draft)
    plain = engine.generate([prompt], NEW_TOKENS)
    return tok, draft, engine, prompt, plain.tokens


def test_bundled_draft_files_are_a_small_hf_llama():
    d, t = bundled_draft_hf_dir(), bundled_hf_dir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer.json", "tokenizer_config.json", "train_log.json", "loss_curve.png"):
        assert (d / name).is_file(), name
    assert (d / "model.safetensors").stat().st_size < 3 * 2**20
    cfg, tcfg = (json.loads((x / "config.json").read_text()) for x in (d, t))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == tcfg["vocab_size"]
    log = json.loads((d / "train_log.json").read_text())
    assert log["validation_books"] == json.loads((t / "train_log.json").read_text())["validation_books"]
    assert 5 * log["params"]["total"] <= json.loads((t / "train_log.json").read_text())["params"]["total"] * 1.05


def test_draft_shares_the_targets_tokenizer(checkpoints):
    target_ckpt, draft_ckpt = checkpoints
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (bundled_draft_hf_dir() / name).read_bytes() == (bundled_hf_dir() / name).read_bytes(), name
    target_tok, draft_tok = load_tokenizer(target_ckpt), load_tokenizer(draft_ckpt)
    assert draft_tok.fingerprint() == target_tok.fingerprint()
    text = PASSAGE.read_text(encoding="utf-8")
    assert draft_tok.encode(text) == target_tok.encode(text)


def test_transformers_loads_the_draft_and_agrees(setup):
    pytest.importorskip("transformers")
    _, draft, _, prompt, _ = setup
    assert max_logit_diff_vs_transformers(bundled_draft_hf_dir(), draft, prompt[:128]) < 1e-3


@pytest.mark.parametrize("draft_cfg", [DraftConfig(kind="model", kv="full", gamma=GAMMA),
                                       DraftConfig(kind="model", kv="streaming", budget=64, sink=16, gamma=GAMMA)],
                         ids=["full", "streaming-64"])
def test_speculation_with_the_bundled_draft_is_lossless(setup, draft_cfg):
    _, _, engine, prompt, plain = setup
    assert len(prompt) > 64
    out = engine.generate([prompt], NEW_TOKENS, draft=draft_cfg)
    assert out.tokens == plain
    assert out.stats.acceptance_rate > 0
    print(f"bundled draft ({'full' if draft_cfg.full else 'streaming 64'}): acceptance "
          f"{out.stats.acceptance_rate:.3f}, {out.stats.mean_accepted_per_round:.2f} tokens per round")
