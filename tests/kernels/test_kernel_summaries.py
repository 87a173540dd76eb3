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
