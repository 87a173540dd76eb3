import pytest
import torch

from dynsplit_sglang.core import score_blocks as twin
from kernel_cases import SPREADS, make_batch, rel_err

CASES = [  # (request lengths, KV heads, GQA ratio, head dim)
    ([300, 17, 120], 3, 3, 64),
    ([512], 8, 8, 128),
    ([64, 200, 33, 90, 150, 7, 260, 480], 1, 7, 64),
    ([128, 250], 4, 1, 128),
    ([40, 500, 333, 12], 2, 8, 64),
]


def _query(b, hq, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, hq, d + 32, generator=g).to(dtype)  # strided rows, as from a qkv split
    return wide[..., :d].to(device)


@pytest.mark.parametrize("lens,hkv,g,d", CASES)
@pytest.mark.parametrize("strategy", ["fixed", "dynsplit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spread", SPREADS)
def test_scores_match_twin(lens, hkv, g, d, strategy, dtype, spread, device):
    from dynsplit_sglang.kernels import scoring

    batch = make_batch(lens, hkv, d, dtype, strategy, seed=g * d, device=device, spread=spread)
    q = _query(len(lens), hkv * g, d, dtype, device, seed=hkv)
    out = torch.full((len(lens), hkv, batch.summary_index.shape[1]), float("nan"), device=device)
    got = scoring.score_blocks(q, batch.center, batch.radius, batch.summary_index, batch.l2,
                               out=out).cpu()
    cpu = batch.to("cpu")
    ref = twin(q.cpu(), cpu.center, cpu.radius, cpu.summary_index, batch.l2)
    real = (cpu.summary_index >= 0)[:, None, :].expand_as(ref)
    assert torch.isfinite(got[real]).all()
    assert torch.isneginf(got[~real]).all()
    assert rel_err(got[real], ref[real]) < 1e-5  # fp32 maths whatever the input dtype


def test_several_block_tiles_per_request(device):
    from dynsplit_sglang.kernels import scoring

    batch = make_batch([500, 260], 2, 64, torch.float32, "dynsplit", block_size=8, tolerance=2,
                       seed=1, device=device)
    q = _query(2, 6, 64, torch.float32, device, seed=2)
    got = scoring.score_blocks(q, batch.center, batch.radius, batch.summary_index,
                               block_nb=16).cpu()
    cpu = batch.to("cpu")
    ref = twin(q.cpu(), cpu.center, cpu.radius, cpu.summary_index)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(got[fin], ref[fin]) < 1e-5


@pytest.mark.parametrize("d", [64, 96, 128])
def test_gpu_tiles_and_odd_head_dim(d, device):
    """The block tile a GPU launch picks (the interpreter defaults to a larger one)."""
    from dynsplit_sglang.kernels import scoring

    batch = make_batch([500, 130, 260], 2, d, torch.float16, "dynsplit", seed=d, device=device,
                       spread=1.5)
    q = _query(3, 6, d, torch.float16, device, seed=d)
    l2 = torch.tensor([True, False, True], device=device)  # a per-request norm
    got = scoring.score_blocks(q, batch.center, batch.radius, batch.summary_index, l2,
                               block_nb=scoring.default_block_nb(d, interpret=False)).cpu()
    cpu = batch.to("cpu")
    ref = twin(q.cpu(), cpu.center, cpu.radius, cpu.summary_index, l2.cpu())
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(got[fin], ref[fin]) < 1e-5
