import math

import pytest
import torch

from dynsplit_sglang.core import block_summaries as twin
from kernel_cases import SPREADS, make_batch, poisoned

LAYOUTS = [  # (request lengths, KV heads, head dim)
    ([300, 17, 120], 3, 64),
    ([512], 8, 128),
    ([5, 64, 200, 33, 90, 150, 7, 260], 1, 64),
]


def _run(fn, batch, max_block_len=20, spread=None, **kw):
    m, hkv, d = batch.center.shape
    m += 3  # rows no block maps to
    dev, dt = batch.k.device, batch.k.dtype
    lo, hi = poisoned((m, hkv, d), dt, dev), poisoned((m, hkv, d), dt, dev)
    fn(batch.k, batch.token_slots, batch.table, lo, hi, batch.summary_index, max_block_len,
       spread, **kw)
    return lo.cpu(), hi.cpu()


def _check(got, ref, index, spread):
    written = torch.zeros(got[0].shape[0], dtype=torch.bool)
    index = index.cpu()
    written[index[index >= 0]] = True
    for g, r in zip(got, ref):
        assert torch.isfinite(g[written]).all()
        if spread is None and g.dtype == torch.float32:
            assert torch.equal(g[written], r[written])  # the same fp32 min/max maths
        else:  # sums in another order, or the cast to a half type rounding the other way
            # (Triton's interpreter truncates fp32 -> bf16): one rounding step of the K dtype
            eps = torch.finfo(g.dtype).eps
            torch.testing.assert_close(g[written].float(), r[written].float(), rtol=2 * eps,
                                       atol=1e-5)
        assert torch.isnan(g[~written]).all()  # padding / skipped rows untouched


@pytest.mark.parametrize("lens,hkv,d", LAYOUTS)
@pytest.mark.parametrize("strategy", ["fixed", "dynsplit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spread", SPREADS)
def test_summaries_match_twin(lens, hkv, d, strategy, dtype, spread, device):
    from dynsplit_sglang.kernels import summaries

    batch = make_batch(lens, hkv, d, dtype, strategy, seed=len(lens) + d, device=device)
    got = _run(summaries.block_summaries, batch, spread=spread)
    _check(got, _run(twin, batch.to("cpu"), spread=spread), batch.summary_index, spread)


@pytest.mark.parametrize("spread", SPREADS)
def test_small_tiles_loop_over_tokens_and_channels(spread, device):
    from dynsplit_sglang.kernels import summaries

    batch = make_batch([200, 77], 3, 64, torch.float32, "dynsplit", seed=3, device=device)
    batch.summary_index[0, 1] = -1  # a real block whose summary is not wanted
    got = _run(summaries.block_summaries, batch, spread=spread, block_t=4, block_c=32)
    _check(got, _run(twin, batch.to("cpu"), spread=spread), batch.summary_index, spread)


@pytest.mark.parametrize("spread", SPREADS)
def test_blocks_longer_than_max_block_len_are_cut_like_the_twin(spread, device):
    from dynsplit_sglang.kernels import summaries

    batch = make_batch([100], 2, 64, torch.float32, "fixed", block_size=40, tolerance=0,
                       seed=5, device=device)
    got = _run(summaries.block_summaries, batch, max_block_len=16, spread=spread)
    ref = _run(twin, batch.to("cpu"), max_block_len=16, spread=spread)
    _check(got, ref, batch.summary_index, spread)


@pytest.mark.parametrize("hkv,d", [(3, 64), (8, 128)])
@pytest.mark.parametrize("spread", SPREADS)
def test_gpu_tiles(hkv, d, spread, device):
    """The tiles a GPU launch picks (the interpreter defaults to larger ones)."""
    from dynsplit_sglang.kernels import summaries

    bt, bc = summaries.default_tiles(20, hkv * d, interpret=False)
    batch = make_batch([300, 45], hkv, d, torch.float16, "dynsplit", seed=hkv, device=device)
    got = _run(summaries.block_summaries, batch, spread=spread, block_t=bt, block_c=bc)
    _check(got, _run(twin, batch.to("cpu"), spread=spread), batch.summary_index, spread)


def _layered_reference(keys, batch, spread, max_block_len=20):
    """Each layer's summaries block by block, from the definition: the box's middle and
    half-width (spread None), else the mean and spread * sqrt(2 ln n) * the population std of
    the block's first max_block_len keys; written at the block's summary row."""
    m, hkv, d = batch.center.shape
    out = torch.full((2, len(keys), m + 3, hkv, d), float("nan"))
    starts, lens, index = batch.table.starts, batch.table.lens, batch.summary_index
    for li, k in enumerate(keys):
        for b, j in (lens > 0).nonzero().tolist():
            row = int(index[b, j])
            if row < 0:
                continue
            n = min(int(lens[b, j]), max_block_len)
            x = k[batch.token_slots[b, int(starts[b, j]):int(starts[b, j]) + n]].double()
            if spread is None:
                c, r = (x.amin(0) + x.amax(0)) / 2, (x.amax(0) - x.amin(0)) / 2
            else:
                c = x.mean(0)
                r = spread * math.sqrt(2 * math.log(max(n, 2))) * x.std(0, correction=0)
            out[0, li, row], out[1, li, row] = c.float(), r.float()
    return out


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("group_bytes", [None, 1])  # all layers at once, or one at a time
def test_layered_summaries_match_each_layer_alone(spread, group_bytes, monkeypatch):
    """What a block freeze builds in one call for every compressed layer equals each layer's
    summaries built alone (a slice per block), and rows no block maps to stay untouched."""
    from dynsplit_sglang.core import mapping

    if group_bytes is not None:
        monkeypatch.setattr(mapping, "LAYER_GROUP_BYTES", group_bytes)
    batch = make_batch([300, 17, 120], 3, 64, torch.float32, "dynsplit", seed=5)
    batch.summary_index[0, 2] = -1  # a real block whose summary is not wanted
    g = torch.Generator().manual_seed(9)
    keys = [torch.randn(batch.k.shape, generator=g) for _ in range(4)]
    m, hkv, d = batch.center.shape
    center = poisoned((4, m + 3, hkv, d), torch.float32, "cpu")
    radius = poisoned((4, m + 3, hkv, d), torch.float32, "cpu")
    mapping.block_summaries_layers(keys, batch.token_slots, batch.table, center, radius,
                                   batch.summary_index, 20, spread)
    ref = _layered_reference(keys, batch, spread)
    torch.testing.assert_close(center, ref[0], equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(radius, ref[1], equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spread", SPREADS)
def test_layered_summaries_on_each_kernel_side(spread, device):
    """Every side's block_summaries_layers (the Triton side: one launch per layer) writes what
    the core writes."""
    from dynsplit_sglang.core.mapping import block_summaries_layers
    from dynsplit_sglang.kernels.dispatch import implementation

    batch = make_batch([200, 77], 3, 64, torch.float32, "dynsplit", seed=4, device=device)
    keys = [batch.k, batch.k * 2 + 1]
    m, hkv, d = batch.center.shape
    for side in ("triton", "torch", "twin"):  # Triton: the interpreter on CPU (conftest)
        kernels = implementation(device, side)
        got = [poisoned((2, m + 3, hkv, d), torch.float32, device) for _ in range(2)]
        kernels.block_summaries_layers(keys, batch.token_slots, batch.table, *got,
                                       batch.summary_index, 20, spread)
        ref = [poisoned((2, m + 3, hkv, d), torch.float32, "cpu") for _ in range(2)]
        block_summaries_layers([k.cpu() for k in keys], batch.token_slots.cpu(),
                               batch.to("cpu").table, *ref, batch.summary_index.cpu(), 20,
                               spread)
        for g_, r_ in zip(got, ref):
            for li in range(2):
                _check((g_[li].cpu(), g_[li].cpu()), (r_[li], r_[li]), batch.summary_index,
                       spread)
