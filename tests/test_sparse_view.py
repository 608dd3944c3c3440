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
