import pytest
import torch

from dynsplit_sglang.core import dense_decode_attention, sparse_decode_attention


def _pool(b, n, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    size = b * n + 7
    kb = torch.randn(size, hkv, d, generator=g).to(dtype)
    vb = torch.randn(size, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(size, generator=g)[: b * n].view(b, n)  # scattered over the pool
    return kb, vb, slots


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (7, 1), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_selection_equals_dense_sdpa(hq, hkv, dtype):
    b, n, d = 3, 50, 32
    kb, vb, slots = _pool(b, n, hkv, d, dtype, hq)
    q = torch.randn(b, hq, d).to(dtype)
    seq = torch.tensor([50, 17, 33])
    pos = torch.arange(n).expand(b, hkv, n).clone()
    pos[pos >= seq[:, None, None]] = -1
    kv = torch.where(pos >= 0, slots.gather(1, pos.clamp(min=0).view(b, -1)).view(b, hkv, n), -1)
    got = sparse_decode_attention(q, kb, vb, kv)
    ref = dense_decode_attention(q.float(), kb.float(), vb.float(), slots, seq).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_subset_equals_sdpa_on_the_subset_and_lse():
    torch.manual_seed(0)
    kb, vb = torch.randn(40, 2, 8), torch.randn(40, 2, 8)
    q = torch.randn(1, 4, 8)
    kv = torch.tensor([[[3, 9, 27, -1], [5, -1, -1, -1]]])
    out, lse = sparse_decode_attention(q, kb, vb, kv, return_lse=True)
    for h, slots in enumerate([[3, 9, 27], [5]]):
        k, v = kb[slots, h], vb[slots, h]
        for qh in (2 * h, 2 * h + 1):
            logits = q[0, qh] @ k.T / 8 ** 0.5
            torch.testing.assert_close(out[0, qh], torch.softmax(logits, -1) @ v)
            torch.testing.assert_close(lse[0, qh], torch.logsumexp(logits, -1))


def test_head_without_slots_gives_zeros_not_nan():
    out, lse = sparse_decode_attention(torch.randn(1, 2, 4), torch.randn(5, 1, 4),
                                       torch.randn(5, 1, 4), torch.full((1, 1, 3), -1),
                                       return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
