import pytest
import torch

from dynsplit_sglang.core import block_summaries as twin
from kernel_cases import make_batch, poisoned

LAYOUTS = [  # (request lengths, KV heads, head dim)
    ([300, 17, 120], 3, 64),
    ([512], 8, 128),
    ([5, 64, 200, 33, 90, 150, 7, 260], 1, 64),
]


def _run(fn, batch, max_block_len=20, **kw):
    m, hkv, d = batch.kmin.shape
    m += 3  # rows no block maps to
    dev, dt = batch.k.device, batch.k.dtype
    lo, hi = poisoned((m, hkv, d), dt, dev), poisoned((m, hkv, d), dt, dev)
    fn(batch.k, batch.token_slots, batch.table, lo, hi, batch.summary_index, max_block_len, **kw)
    return lo.cpu(), hi.cpu()


def _check(got, ref, index):
    written = torch.zeros(got[0].shape[0], dtype=torch.bool)
    index = index.cpu()
    written[index[index >= 0]] = True
    for g, r in zip(got, ref):
        assert torch.isfinite(g[written]).all()
        assert torch.equal(g[written], r[written])  # a min/max is exact
        assert torch.isnan(g[~written]).all()  # padding / skipped rows untouched


@pytest.mark.parametrize("lens,hkv,d", LAYOUTS)
@pytest.mark.parametrize("strategy", ["fixed", "dynsplit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_summaries_match_twin_exactly(lens, hkv, d, strategy, dtype, device):
    from dynsplit_sglang.kernels import summaries

    batch = make_batch(lens, hkv, d, dtype, strategy, seed=len(lens) + d, device=device)
    got = _run(summaries.block_summaries, batch)
    _check(got, _run(twin, batch.to("cpu")), batch.summary_index)


def test_small_tiles_loop_over_tokens_and_channels(device):
    from dynsplit_sglang.kernels import summaries

    batch = make_batch([200, 77], 3, 64, torch.float32, "dynsplit", seed=3, device=device)
    batch.summary_index[0, 1] = -1  # a real block whose summary is not wanted
    got = _run(summaries.block_summaries, batch, block_t=4, block_c=32)
    _check(got, _run(twin, batch.to("cpu")), batch.summary_index)


def test_blocks_longer_than_max_block_len_are_cut_like_the_twin(device):
    from dynsplit_sglang.kernels import summaries

    batch = make_batch([100], 2, 64, torch.float32, "fixed", block_size=40, tolerance=0,
                       seed=5, device=device)
    got = _run(summaries.block_summaries, batch, max_block_len=16)
    _check(got, _run(twin, batch.to("cpu"), max_block_len=16), batch.summary_index)


@pytest.mark.parametrize("hkv,d", [(3, 64), (8, 128)])
def test_gpu_tiles(hkv, d, device):
    """The tiles a GPU launch picks (the interpreter defaults to larger ones)."""
    from dynsplit_sglang.kernels import summaries

    bt, bc = summaries.default_tiles(20, hkv * d, interpret=False)
    batch = make_batch([300, 45], hkv, d, torch.float16, "dynsplit", seed=hkv, device=device)
    got = _run(summaries.block_summaries, batch, block_t=bt, block_c=bc)
    _check(got, _run(twin, batch.to("cpu")), batch.summary_index)
