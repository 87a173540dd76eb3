import os
import subprocess
import sys

import pytest
import torch

from dynsplit_sglang import kernels
from dynsplit_sglang.core import score_blocks as twin_score
from dynsplit_sglang.core import sparse_decode_attention as twin_attention
from dynsplit_sglang.kernels import cpu
from kernel_cases import TOL, make_batch, rel_err


def test_importing_the_package_does_not_import_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DYNSPLIT_KERNELS")}
    code = ("import sys, dynsplit_sglang.kernels as k, torch;"
            "k.implementation('cpu').score_blocks(torch.zeros(1, 2, 4), torch.zeros(1, 1, 4),"
            " torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long));"
            "k.SparseDecodeWrapper(2, 1, 4, device='cpu');"
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode,want", [(None, "torch"), ("auto", "torch"), ("triton", "triton"),
                                       ("TORCH", "torch"), ("twin", "twin")])
def test_auto_backend_on_a_cpu_device_follows_the_environment(mode, want, monkeypatch):
    if mode is None:
        monkeypatch.delenv("DYNSPLIT_KERNELS", raising=False)
    else:
        monkeypatch.setenv("DYNSPLIT_KERNELS", mode)
    assert kernels.resolve("auto", "cpu") == want
    assert kernels.implementation("cpu").side == want


def test_auto_backend_on_a_cuda_device_is_triton_and_an_explicit_one_wins(monkeypatch):
    monkeypatch.delenv("DYNSPLIT_KERNELS", raising=False)
    assert kernels.resolve("auto", "cuda") == "triton"
    assert kernels.resolve("auto", torch.device("cuda", 1)) == "triton"
    monkeypatch.setenv("DYNSPLIT_KERNELS", "triton")
    assert kernels.resolve("twin", "cpu") == "twin"  # the variable only steers "auto"


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("DYNSPLIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DYNSPLIT_KERNELS"):
        kernels.resolve("auto", "cpu")
    monkeypatch.delenv("DYNSPLIT_KERNELS")
    with pytest.raises(ValueError, match="kernel backend"):
        kernels.implementation("cpu", backend="cuda")


def test_the_side_is_chosen_once_when_the_wrapper_is_built(monkeypatch):
    monkeypatch.setenv("DYNSPLIT_KERNELS", "twin")
    w = kernels.SparseDecodeWrapper(6, 2, 64, device="cpu")
    monkeypatch.setenv("DYNSPLIT_KERNELS", "triton")  # too late for w
    assert w.kernels.side == "twin"
    assert w.kernels.score_blocks.__wrapped__ is twin_score
    assert kernels.SparseDecodeWrapper(6, 2, 64, device="cpu", backend="torch").kernels.side \
        == "torch"


@pytest.mark.parametrize("mode", ["triton", "torch", "twin"])
def test_every_side_gives_the_twins_result(mode):
    impl = kernels.implementation("cpu", backend=mode)
    assert impl.side == mode
    batch = make_batch([150, 90], 2, 64, torch.float32, "dynsplit", seed=1, spread=1.5)
    q = torch.randn(2, 6, 64)
    s = impl.score_blocks(q, batch.center, batch.radius, batch.summary_index, True)
    ref = twin_score(q, batch.center, batch.radius, batch.summary_index, True)
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    assert rel_err(s[torch.isfinite(ref)], ref[torch.isfinite(ref)]) < 1e-5
    slots = batch.token_slots[:, None, :64].expand(2, 2, 64).contiguous()
    o, lse = impl.sparse_decode_attention(q, batch.k, batch.v, slots, return_lse=True)
    ro, rl = twin_attention(q, batch.k, batch.v, slots, return_lse=True)
    assert rel_err(o, ro) < 1e-5 and rel_err(lse, rl) < 1e-5
    lo = torch.full_like(batch.center, float("nan"))
    hi = lo.clone()
    impl.block_summaries(batch.k, batch.token_slots, batch.table, lo, hi, batch.summary_index, 20,
                         1.5)
    rows = batch.summary_index[batch.summary_index >= 0]
    torch.testing.assert_close(lo[rows], batch.center[rows])
    torch.testing.assert_close(hi[rows], batch.radius[rows])


# The CPU formulations (dispatch's torch side) against the core twins: a wide, cheap matrix.
@pytest.mark.parametrize("g", [1, 3, 7, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("l2", [False, True, "per-request"])
def test_cpu_scoring_equals_twin(g, d, dtype, l2):
    batch = make_batch([300, 17, 120, 512], 2, d, dtype, "dynsplit", seed=g,
                       spread=None if l2 is False else 1.5)
    if l2 == "per-request":
        l2 = torch.tensor([True, False, False, True])
    q = torch.randn(4, 2 * g, d).to(dtype)
    got = cpu.score_blocks(q, batch.center, batch.radius, batch.summary_index, l2)
    ref = twin_score(q, batch.center, batch.radius, batch.summary_index, l2)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(got[fin], ref[fin]) < 1e-5


@pytest.mark.parametrize("g", [1, 3, 7, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_attention_equals_twin(g, d, dtype):
    gen = torch.Generator().manual_seed(g * d)
    b, hkv, n, pool = 3, 2, 200, 900
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    k = torch.randn(pool, hkv, d, generator=gen).to(dtype)
    v = torch.randn(pool, hkv, d, generator=gen).to(dtype)
    slots = torch.stack([torch.randperm(pool, generator=gen)[:n] for _ in range(b * hkv)])
    slots = slots.view(b, hkv, n)
    slots[torch.rand(b, hkv, n, generator=gen) < 0.3] = -1
    slots[1, 0] = -1
    o, lse = cpu.sparse_decode_attention(q, k, v, slots, return_lse=True)
    ro, rl = twin_attention(q, k, v, slots, return_lse=True)
    assert o.dtype == dtype and not torch.isnan(o).any()
    assert rel_err(o, ro) < TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def test_cpu_paths_fall_back_to_the_twin_for_strided_pools():
    kv = torch.randn(100, 2, 128)
    k, v = kv[..., :64], kv[..., 64:]
    q = torch.randn(1, 4, 64)
    slots = torch.arange(40).view(1, 2, 20)
    assert rel_err(cpu.sparse_decode_attention(q, k, v, slots),
                   twin_attention(q, k, v, slots)) < 1e-6


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("budget", [72, 96, 150, 400])
def test_cpu_topk_select_equals_twin_select(seed, budget):
    """Same positions, counts and kept blocks, ties (equal scores, ±0.0, -inf) included."""
    from dynsplit_sglang.core import plan_selection, select

    lens = [300, 17, 120, 512, 260, 90][: 1 + seed % 6]
    batch = make_batch(lens, 3, 64, torch.float32, "dynsplit", seed=seed)
    q = torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(seed))
    scores = cpu.score_blocks(q, batch.center, batch.radius, batch.summary_index)
    if seed % 3 == 0:
        scores = scores.round()  # many exact ties
    if seed % 4 == 0:
        scores[..., ::5], scores[..., 1::5] = -0.0, 0.0
    plan = plan_selection(batch.table, batch.seq_lens, budget, 4, 32, max_block_len=20)
    ref = select(scores, plan)
    for max_kept in (cpu.max_kept_blocks(plan), None):
        got = cpu.select(scores, plan, max_kept)
        assert torch.equal(got.positions, ref.positions)
        assert torch.equal(got.counts, ref.counts) and torch.equal(got.blocks, ref.blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_in_many_chunks_equal_twins(dtype, monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1 << 12)  # several gather chunks per call
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 12, 64, generator=gen).to(dtype)
    k = torch.randn(5000, 4, 64, generator=gen).to(dtype)
    v = torch.randn(5000, 4, 64, generator=gen).to(dtype)
    slots = torch.randint(-1, 5000, (3, 4, 700), generator=gen)
    assert rel_err(cpu.sparse_decode_attention(q, k, v, slots),
                   twin_attention(q, k, v, slots)) < TOL[dtype]
    index = torch.randint(-1, 5000, (3, 900), generator=gen)
    for l2 in (False, True):
        got, ref = cpu.score_blocks(q, k, v.abs(), index, l2), twin_score(q, k, v.abs(), index, l2)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        assert rel_err(got[torch.isfinite(ref)], ref[torch.isfinite(ref)]) < 1e-5
