import math

import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig, ImportanceAccumulator, causal_lse, importance


def brute_force_scores(layers, cfg):
    """Direct transcription of the formula over a materialised causal attention map."""
    votes = None
    for q, k in layers:
        length, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qh = q.view(length, hkv, g, d).permute(1, 2, 0, 3)
        logits = qh @ k.permute(1, 2, 0).unsqueeze(1) / math.sqrt(d)
        logits = logits + torch.triu(torch.full((length, length), float("-inf")), 1)
        attn = torch.softmax(logits.double(), dim=-1)  # [Hkv, G, L, L]
        if votes is None:
            votes = [[] for _ in range(length)]
        for i in range(length):
            for qq in range(i + 1, min(i + cfg.future_window, length - 1) + 1):
                kept = attn[:, :, qq, i + 1 : qq + 1].sum(-1)
                dist = attn[:, :, qq, cfg.sink : i + 1].sum(-1) if i >= cfg.sink else 0 * kept
                votes[i].append((kept - cfg.alpha * dist).mean())
    return torch.tensor(
        [float(torch.stack(v).mean()) if v else float("-inf") for v in votes], dtype=torch.float64
    )


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (7, 1), (8, 1)])
@pytest.mark.parametrize("alpha,sink,wf", [(1.0, 4, 16), (0.5, 0, 8), (2.0, 2, 5)])
def test_matches_the_materialised_formula(hq, hkv, alpha, sink, wf):
    torch.manual_seed(hq * 100 + wf)
    cfg = DynSplitConfig(alpha=alpha, sink=sink, future_window=wf)
    length, d = 70, 16
    layers = [(torch.randn(length, hq, d), torch.randn(length, hkv, d)) for _ in range(2)]
    acc = ImportanceAccumulator(cfg)
    for q, k in layers:
        acc.add_layer(q, k)
    got = acc.scores(length).double()
    ref = brute_force_scores(layers, cfg)
    assert torch.isinf(got[-1]) and torch.isinf(ref[-1])
    torch.testing.assert_close(got[:-1], ref[:-1], atol=2e-6, rtol=1e-5)


def test_chunked_prefill_equals_one_shot():
    torch.manual_seed(1)
    cfg = DynSplitConfig()
    q, k = torch.randn(300, 6, 32), torch.randn(300, 2, 32)
    whole = ImportanceAccumulator(cfg)
    whole.add_layer(q, k)
    chunked = ImportanceAccumulator(cfg)
    for a, b in [(0, 37), (37, 150), (150, 300)]:
        chunked.add_layer(q[a:b], k[:b], q_start=a)
    torch.testing.assert_close(chunked.scores(300), whole.scores(300))


def test_causal_prefix_scores_do_not_depend_on_the_suffix():
    torch.manual_seed(2)
    cfg = DynSplitConfig(future_window=16)
    q, k = torch.randn(200, 4, 16), torch.randn(200, 2, 16)
    q2, k2 = q.clone(), k.clone()
    q2[120:], k2[120:] = torch.randn(80, 4, 16), torch.randn(80, 2, 16)  # another continuation
    a, b = ImportanceAccumulator(cfg), ImportanceAccumulator(cfg)
    a.add_layer(q, k)
    b.add_layer(q2, k2)
    settled = 120 - cfg.future_window  # all its voters lie before the divergence
    torch.testing.assert_close(a.scores(200)[:settled], b.scores(200)[:settled])
    assert not torch.allclose(a.scores(200)[settled:120], b.scores(200)[settled:120])


def test_external_lse_is_used_as_given():
    torch.manual_seed(3)
    cfg = DynSplitConfig()
    q, k = torch.randn(50, 4, 16), torch.randn(50, 2, 16)
    lse = causal_lse(q, k, 0, 0.25)
    a, b = ImportanceAccumulator(cfg), ImportanceAccumulator(cfg)
    a.add_layer(q, k, scale=0.25)
    b.add_layer(q, k, scale=0.25, lse=lse)
    torch.testing.assert_close(a.scores(), b.scores())
    c = ImportanceAccumulator(cfg)
    c.add_layer(q, k, scale=0.25, lse=lse + 1.0)  # a wrong lse must change the result
    assert not torch.allclose(a.scores()[:-1], c.scores()[:-1])


@pytest.mark.parametrize("lq,q_start,hq,hkv,dtype", [
    (1, 0, 4, 2, torch.float32), (300, 0, 9, 3, torch.float32), (300, 500, 9, 3, torch.float32),
    (1, 999, 14, 2, torch.float32), (257, 33, 4, 4, torch.float32), (64, 100, 8, 2, torch.bfloat16)])
def test_fused_lse_equals_the_exact_chunked_one(lq, q_start, hq, hkv, dtype):
    """The fused CPU kernel's LSE (keys before the chunk + the chunk's own keys, merged) against
    the chunked logits, which an all-True key_ok forces; a chunk's later keys stay hidden."""
    g = torch.Generator().manual_seed(lq + q_start)
    q = (torch.randn(lq, hq, 64, generator=g) * 2).to(dtype)
    k = (torch.randn(q_start + lq + 5, hkv, 64, generator=g) * 2).to(dtype)
    assert importance._fused_lse(q, k, q_start, 0.125) is not None  # the path under test ran
    fused = causal_lse(q, k, q_start, 0.125)
    chunked = causal_lse(q, k, q_start, 0.125, key_ok=torch.ones(len(k), dtype=torch.bool))
    torch.testing.assert_close(fused, chunked, atol=1e-4 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5)
    k[q_start + lq:] += 50.0  # keys after the chunk: seen by no query
    torch.testing.assert_close(causal_lse(q, k, q_start, 0.125), fused)


def test_empty_input():
    acc = ImportanceAccumulator(DynSplitConfig())
    acc.add_layer(torch.zeros(0, 4, 8), torch.zeros(0, 2, 8))
    assert acc.scores(0).numel() == 0
