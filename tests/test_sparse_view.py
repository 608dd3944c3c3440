"""The draft's sparse view reads exactly the selected positions plus the window, each once."""
import pytest
import torch

from kernels import decode_attention_reference


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
    from kernels import full_view_mask

    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    qg = q.float().reshape(B, H_kv, (H // H_kv) * T, D)
    scores = torch.matmul(qg, k_cache[:, :, :S].float().transpose(-1, -2)) * D ** -0.5  # [B, H_kv, G*T, S]
    mask = full_view_mask(cache_len, T, S).repeat(1, H // H_kv, 1)[:, None]  # [B, 1, G*T, S]
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).sum(dim=2)  # [B, H_kv, S]


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
