import pytest
import torch

from dynsplit_sglang.core import (
    plan_selection, positions_to_slots, score_blocks, select, sparse_decode_attention as twin,
)
from kernel_cases import TOL, make_batch, poisoned, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _launch(q, k, v, slots, dtype, splits=None, **kw):
    """Triton launcher with poisoned output and workspace: every element must be written."""
    from dynsplit_sglang.kernels import sparse_decode as sd

    b, hq, _ = q.shape
    dv = v.shape[2]
    if splits is None:
        splits = sd.num_kv_splits(b, k.shape[1], slots.shape[2], q.device,
                                  kw.get("block_n") or sd.default_block_n(dv))
    mid = (poisoned((b, hq, splits, dv), torch.float32, q.device),
           poisoned((b, hq, splits), torch.float32, q.device))
    out = poisoned((b, hq, dv), dtype, q.device)
    o, lse = sd.sparse_decode_attention(q, k, v, slots, return_lse=True, mid=mid, out=out, **kw)
    assert o is out
    return o.cpu(), lse.cpu()


def _compare(got, q, k, v, slots, dtype, scale=None):
    ref_o, ref_lse = twin(q.cpu(), k.cpu(), v.cpu(), slots.cpu(), scale, return_lse=True)
    o, lse = got
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    empty = (slots.cpu() < 0).all(-1).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    assert torch.isneginf(lse[empty]).all() and (o[empty] == 0).all()
    assert torch.isfinite(lse[~empty]).all() and torch.isfinite(o).all()
    assert rel_err(o, ref_o) < TOL[dtype]
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=1e-4, rtol=1e-5)


# (request lengths, KV heads, GQA ratio, head dim, budget)
PIPELINE = [
    ([300, 17, 120], 3, 3, 64, 96),
    ([512], 8, 8, 128, 128),
    ([64, 200, 33, 90, 150, 7, 260, 480], 1, 7, 64, 100),
    ([128, 250], 4, 1, 128, 160),
    ([40, 500, 333, 12, 270], 2, 8, 64, 256),
    ([460, 99], 1, 3, 128, 72),
]


@pytest.mark.parametrize("lens,hkv,g,d,budget", PIPELINE)
@pytest.mark.parametrize("strategy", ["fixed", "dynsplit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_over_real_selections_matches_twin(lens, hkv, g, d, budget, strategy, dtype,
                                                     device):
    batch = make_batch(lens, hkv, d, dtype, strategy, seed=budget + g, device=device)
    q = torch.randn(len(lens), hkv * g, d, generator=torch.Generator().manual_seed(g)).to(dtype)
    q = q.to(device)
    scores = score_blocks(q.cpu(), batch.center.cpu(), batch.radius.cpu(),
                          batch.summary_index.cpu())
    cpu = batch.to("cpu")
    plan = plan_selection(cpu.table, cpu.seq_lens, budget, 4, 32, max_block_len=20)
    sel = select(scores, plan)
    slots = positions_to_slots(sel.positions, cpu.token_slots).to(device)
    got = _launch(q, batch.k, batch.v, slots, dtype, splits=3, counts=sel.counts.to(device))
    _compare(got, q, batch.k, batch.v, slots, dtype)


def _random_slots(b, hkv, n, pool, seed, holes=True):
    g = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(pool, generator=g)[:n] for _ in range(b * hkv)])
    slots = slots.view(b, hkv, n)
    if holes:
        slots[torch.rand(b, hkv, n, generator=g) < 0.2] = -1  # holes anywhere in the list
        slots[0, -1] = -1  # a head with nothing to attend to
    return slots


@pytest.mark.parametrize("g", [1, 3, 7, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scattered_slot_lists_with_holes(g, d, dtype, device):
    b, hkv, n, pool = 3, 2, 200, 1000
    gen = torch.Generator().manual_seed(d + g)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype).to(device)
    k = torch.randn(pool, hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(pool, hkv, d, generator=gen).to(dtype).to(device)
    slots = _random_slots(b, hkv, n, pool, seed=g).to(device)
    got = _launch(q, k, v, slots, dtype, splits=2, block_n=32)
    _compare(got, q, k, v, slots, dtype)


@pytest.mark.parametrize("splits,block_n", [(1, None), (4, 32), (7, 16), (None, None)])
def test_split_counts_and_tiles_do_not_change_the_result(splits, block_n, device):
    b, hkv, g, d, n, pool = 2, 2, 4, 64, 300, 900
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(*s, generator=gen).to(device)
               for s in ((b, hkv * g, d), (pool, hkv, d), (pool, hkv, d)))
    slots = _random_slots(b, hkv, n, pool, seed=3).to(device)
    got = _launch(q, k, v, slots, torch.float32, splits=splits, block_n=block_n, scale=0.3)
    _compare(got, q, k, v, slots, torch.float32, scale=0.3)


def test_value_head_dim_differs_and_strided_views(device):
    b, hkv, g, d, dv, n, pool = 2, 3, 2, 64, 128, 150, 600
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, hkv * g, d + 16, generator=gen)[..., :d].to(device)
    kv = torch.randn(pool, hkv, d + dv, generator=gen).to(device)  # K and V views of one pool
    k, v = kv[..., :d], kv[..., d:]
    slots = _random_slots(b, hkv, n, pool, seed=9).to(device)
    got = _launch(q, k, v, slots, torch.float32, splits=2)
    _compare(got, q, k, v, slots, torch.float32)


def test_counts_stop_early_without_changing_the_result(device):
    from dynsplit_sglang.kernels import sparse_decode as sd

    b, hkv, g, d, n, pool = 2, 2, 3, 64, 256, 800
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*s, generator=gen).to(device)
               for s in ((b, hkv * g, d), (pool, hkv, d), (pool, hkv, d)))
    slots = _random_slots(b, hkv, n, pool, seed=4, holes=False)
    counts = torch.tensor([[256, 100], [1, 0]])
    slots[torch.arange(n)[None, None, :] >= counts[..., None]] = -1
    slots, counts = slots.to(device), counts.to(device)
    got = _launch(q, k, v, slots, torch.float32, splits=3, block_n=32, counts=counts)
    _compare(got, q, k, v, slots, torch.float32)
    plain = sd.sparse_decode_attention(q, k, v, slots, num_splits=3, block_n=32)
    assert torch.equal(got[0], plain.cpu())


def test_without_lse_returns_only_the_output(device):
    from dynsplit_sglang.kernels import sparse_decode as sd

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 64, generator=gen).to(device)
    k = torch.randn(50, 2, 64, generator=gen).to(device)
    slots = torch.arange(40).view(1, 2, 20).to(device)
    out = sd.sparse_decode_attention(q, k, k, slots)
    assert torch.is_tensor(out) and out.shape == (1, 4, 64)
    assert rel_err(out, twin(q.cpu(), k.cpu(), k.cpu(), slots.cpu())) < 1e-5


@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tiles_and_odd_head_dims(d, dtype, device):
    """The key tile a GPU launch picks (the interpreter defaults to a larger one)."""
    from dynsplit_sglang.kernels import sparse_decode as sd

    b, hkv, g, n, pool = 2, 2, 5, 180, 700
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(*s, generator=gen).to(dtype).to(device)
               for s in ((b, hkv * g, d), (pool, hkv, d), (pool, hkv, d)))
    slots = _random_slots(b, hkv, n, pool, seed=d).to(device)
    got = _launch(q, k, v, slots, dtype, block_n=sd.default_block_n(d, interpret=False))
    _compare(got, q, k, v, slots, dtype)


def test_split_heuristic_is_static_and_bounded(monkeypatch):
    from dynsplit_sglang.kernels import sparse_decode as sd

    cpu = torch.device("cpu")
    assert sd.num_kv_splits(1, 8, 2048, cpu) == 1  # interpreter: one "SM"
    # On a GPU the count depends on shapes and the SM count only (mocked: 132 SMs).
    monkeypatch.setattr(sd, "sm_count", lambda dev: 132)
    assert sd.num_kv_splits(1, 8, 2048, cpu) == 16  # 128 programs ~ one per SM
    assert sd.num_kv_splits(1, 3, 32768, cpu) == sd.MAX_SPLITS
    assert sd.num_kv_splits(64, 8, 2048, cpu) == 1  # the batch alone fills the GPU
    assert sd.num_kv_splits(1, 8, 100, cpu) == 1  # never below two tiles per split
