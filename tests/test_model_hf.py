"""Our Transformer, loaded through the real converter, matches transformers' logits."""
import pytest
import torch
import transformers

from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint
from gpt_fast_magicdec.attention import AttentionView
from gpt_fast_magicdec import load_model
from hf_fixtures import FAMILIES, make_hf_checkpoint
from tools.tiny_model.causal import causal_logits

SEQ = 80  # longer than the llama3 fixtures' original_max_position_embeddings (64): scaling matters


def converted(tmp_path, family, fmt):
    hf_dir = make_hf_checkpoint(tmp_path / "hf", family, fmt=fmt, seed=3)
    out = convert_hf_checkpoint(hf_dir, tmp_path / "engine")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return load_model(out, "cpu", torch.float32), hf_model


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family, fmt):
    model, hf_model = converted(tmp_path, family, fmt)
    tokens = torch.randint(model.args.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(tokens).logits  # [2, SEQ, V]
        # Cache-free causal pass (the trainer's view).
        torch.testing.assert_close(causal_logits(model, tokens), expected, atol=2e-4, rtol=1e-4)
        # Through the static cache: a prefill of ragged length, then one token at a time, each
        # sequence at its own position.
        model.setup_caches(2, SEQ + 16)
        start = torch.zeros(2, dtype=torch.long)
        prefill = model(tokens[:, :37], AttentionView(cache_len=start, n_tokens=37))
        torch.testing.assert_close(prefill, expected[:, :37], atol=2e-4, rtol=1e-4)
        # Sequence 0 catches up to 50 with a 13-token chunk while sequence 1 re-writes 37..49.
        model(tokens[:, 37:50], AttentionView(cache_len=torch.tensor([37, 37]), n_tokens=13))
        cache_len = torch.tensor([50, 37])  # ragged: each sequence decodes at its own position
        for _ in range(6):
            step_tokens = tokens[torch.arange(2), cache_len][:, None]  # [2, 1]
            logits = model(step_tokens, AttentionView(cache_len=cache_len, n_tokens=1))[:, 0]
            torch.testing.assert_close(logits, expected[torch.arange(2), cache_len], atol=2e-4, rtol=1e-4)
            cache_len = cache_len + 1


def test_verify_shaped_pass_matches(tmp_path):
    """A gamma+1-token pass over the cache (what verification does) gives the same logits."""
    model, hf_model = converted(tmp_path, "llama3", "safetensors")
    tokens = torch.randint(model.args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        model.setup_caches(3, 64)
        lens = torch.tensor([30, 21, 34])
        model(tokens[:, :34], AttentionView(cache_len=torch.zeros(3, dtype=torch.long), n_tokens=34))
        rows = lens[:, None] + torch.arange(4)  # [3, 4]
        logits = model(tokens.gather(1, rows), AttentionView(cache_len=lens, n_tokens=4))
    torch.testing.assert_close(logits, expected[torch.arange(3)[:, None], rows], atol=2e-4, rtol=1e-4)
