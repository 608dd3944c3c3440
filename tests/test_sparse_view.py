"""The draft's sparse view reads exactly the selected positions plus the window, each once."""
import pytest
import torch

from gpt_fast_magicdec.kernels import decode_attention_reference
from gpt_fast_magicdec.kernels.reference import masked_softmax_


def brute_force(q, k, v, cache_len, sel_pos, window, scale):
    """Attention built key by key from the definition: a Python set per query."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            hk = h // (H // H_kv)
            for t in range(T):
                p = int(cache_len[b]) + t
                keys = {s for s in range(max(0, p - window + 1), p + 1)}
                keys |= {int(s) for s in sel_pos[b, hk] if 0 <= s <= p - window}
                idx = torch.tensor(sorted(keys))
                w = torch.softmax((k[b, hk, idx] @ q[b, h, t]) * scale, dim=0)
                out[b, h, t] = w @ v[b, hk, idx]
    return out


@pytest.mark.parametrize("window", [1, 3, 8, 40])
@pytest.mark.parametrize("T", [1, 4])
def test_sparse_view_equals_dense_attention_over_its_key_set(window, T):
    g = torch.Generator().manual_seed(window * 10 + T)
    B, H, H_kv, S, D = 3, 4, 2, 48, 8
    q, k, v = (torch.randn(B, n, s, D, generator=g) for n, s in ((H, T), (H_kv, S), (H_kv, S)))
    cache_len = torch.tensor([0, 17, 40])
    # Selected positions overlap the window, repeat across heads, include -1 padding and a slot
    # reserved for a future position (past the live cache).
    sel_pos = torch.tensor([[[0, 1, 2, -1, 47], [3, 9, 15, 16, -1]]]).repeat(B, 1, 1)
    sel_pos[1, 0] = torch.tensor([0, 5, 12, 16, 20])
    ref = decode_attention_reference(q, k, v, cache_len, scale=0.4, sel_pos=sel_pos, window=window)
    torch.testing.assert_close(ref, brute_force(q, k, v, cache_len, sel_pos, window, 0.4))
    gathered = [torch.gather(x, 2, sel_pos.clamp(min=0)[..., None].expand(-1, -1, -1, D)) for x in (k, v)]
    compact = decode_attention_reference(q, k, v, cache_len, scale=0.4, sel_pos=sel_pos, window=window,
                                         sel_k=gathered[0], sel_v=gathered[1])
    torch.testing.assert_close(compact, ref)


def one_shot_votes(q, k_cache, cache_len, S):
    """SnapKV's votes as first written: the whole [B, H_kv, G*T, S] score matrix at once, in fp32."""
    from gpt_fast_magicdec.kernels import full_view_mask

    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    qg = q.float().reshape(B, H_kv, (H // H_kv) * T, D)
    scores = torch.matmul(qg, k_cache[:, :, :S].float().transpose(-1, -2)) * D ** -0.5  # [B, H_kv, G*T, S]
    mask = full_view_mask(cache_len, T, S).repeat(1, H // H_kv, 1)[:, None]  # [B, 1, G*T, S]
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).sum(dim=2)  # [B, H_kv, S]


@pytest.mark.parametrize("mask_heads", [1, 2])
def test_masked_softmax_applies_each_tokens_mask_to_every_query_head_of_its_group(mask_heads):
    g = torch.Generator().manual_seed(mask_heads)
    B, H_kv, G, T, S = 2, 2, 3, 4, 9
    scores = torch.randn(B, H_kv, G * T, S, generator=g)
    mask = torch.rand(B, mask_heads, T, S, generator=g) < 0.6
    mask[0, 0, 1] = False  # a token that sees no key: its rows are zeros, not NaN
    expected = torch.zeros_like(scores)
    for b, h, r in ((b, h, r) for b in range(B) for h in range(H_kv) for r in range(G * T)):
        visible = mask[b, h % mask_heads, r % T]  # row r = g * T + t
        if visible.any():
            expected[b, h, r, visible] = torch.softmax(0.3 * scores[b, h, r, visible], dim=0)
    torch.testing.assert_close(masked_softmax_(scores.clone(), mask, 0.3), expected)


@pytest.mark.parametrize("chunk", [1, 5, 16, 2048])
def test_chunked_snapkv_votes_equal_the_one_shot_softmax(chunk):
    """Scoring in chunks with a two-pass log-sum-exp gives the same votes, hence the same picks."""
    from gpt_fast_magicdec.policies.snapkv import SnapKVObserver, attention_votes
    from gpt_fast_magicdec.attention import AttentionView

    g = torch.Generator().manual_seed(chunk)
    B, H, H_kv, T, S_max, D = 3, 4, 2, 6, 64, 8
    q = torch.randn(B, H, T, D, generator=g)
    k_cache = torch.randn(B, H_kv, S_max, D, generator=g)
    prompt_len = torch.tensor([40, 17, 29])
    cache_len = prompt_len - T  # the observation window: the last T prompt tokens
    S = int(prompt_len.max())
    expected = one_shot_votes(q, k_cache, cache_len, S)
    torch.testing.assert_close(attention_votes(q, k_cache, cache_len, S, chunk), expected)
    view = AttentionView(cache_len=cache_len, n_tokens=T)
    chunked, whole = SnapKVObserver(8, prompt_len, chunk=chunk), SnapKVObserver(8, prompt_len, chunk=S)
    chunked(0, q, k_cache, view)
    whole(0, q, k_cache, view)
    assert torch.equal(chunked.selected[0], whole.selected[0])



@pytest.mark.parametrize("sink,window,chunk,T", [(4, 16, 8, 61), (0, 16, 16, 40), (4, 7, 5, 33), (3, 64, 8, 50)])
def test_twin_view_draft_reads_what_a_draft_step_reads(sink, window, chunk, T):
    """The draft half of a twin CausalView sees, at every position p, exactly what a streaming
    draft step at p sees: the target's K/V through sink + window, and its own K/V at p."""
    from tools.tiny_model.causal import CausalView, causal_attention

    g = torch.Generator().manual_seed(T + window)
    B, H, H_kv, D = 2, 4, 2, 8
    q, k, v = (torch.randn(2 * B, n, T, D, generator=g) for n in (H, H_kv, H_kv))
    out = causal_attention(q, k, v, CausalView(draft_window=window, sink=sink, chunk=chunk))
    torch.testing.assert_close(out[:B], decode_attention_reference(q[:B], k[:B], v[:B], torch.zeros(B), scale=D ** -0.5))
    sel_pos = torch.arange(sink).expand(B, H_kv, sink)
    for p in range(T):  # the cache holds the target's K/V before p and the draft's own at p
        k_cache, v_cache = k[:B].clone(), v[:B].clone()
        k_cache[:, :, p], v_cache[:, :, p] = k[B:, :, p], v[B:, :, p]
        ref = decode_attention_reference(q[B:, :, p:p + 1], k_cache, v_cache, torch.full((B,), p),
                                         scale=D ** -0.5, sel_pos=sel_pos, window=window)
        torch.testing.assert_close(out[B:, :, p:p + 1], ref, msg=f"position {p}")


def test_twin_view_logits_equal_a_prefill_then_a_draft_step():
    """End to end on a model: after the target prefills positions 0..88, the streaming draft's
    logits for position 89 equal the twin pass's draft row there (so a model trained through the
    twin view is trained for the draft it will run), and the target rows equal the plain pass."""
    from gpt_fast_magicdec.attention import AttentionView
    from gpt_fast_magicdec.config import ModelArgs
    from gpt_fast_magicdec.model import Transformer
    from tools.tiny_model.causal import CausalView, causal_logits

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=128)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 64, (2, 90))
    sink, window = 4, 20
    with torch.no_grad():
        twin = causal_logits(model, tokens, CausalView(draft_window=window, sink=sink, chunk=16))
        full = causal_logits(model, tokens)
        torch.testing.assert_close(twin[:2], full)
        model.setup_caches(2, 128, torch.float32)
        model(tokens[:, :89], AttentionView(cache_len=torch.zeros(2, dtype=torch.long), n_tokens=89))
        selected = [torch.arange(sink).expand(2, 2, sink)] * args.n_layers
        draft = AttentionView(cache_len=torch.full((2,), 89), n_tokens=1, window=window, selected=selected)
        torch.testing.assert_close(model(tokens[:, 89:], draft)[:, 0], twin[2:, 89])
    assert (twin[2:, 89] - full[:, 89]).abs().max() > 1e-3  # the view really leaves keys out
