"""The fused CPU kernels (kernels/native.c) against the core twins, their argument checks, and
the planned step's fallback to torch ops where they cannot be built."""

import math

import pytest
import torch

from dynsplit_sglang.core import plan_selection, positions_to_slots, score_blocks, select
from dynsplit_sglang.core import sparse_decode_attention as twin_attention
from dynsplit_sglang.kernels import SparseDecodeWrapper, cpu, native
from kernel_cases import make_batch, rel_err

LIB = native.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler on this host")


def _u8(flags, b):
    return torch.as_tensor(flags).expand(b).to(torch.uint8).contiguous()


@needs_lib
@pytest.mark.parametrize("hkv,g,d", [(3, 3, 64), (8, 4, 128), (1, 7, 96), (2, 1, 64)])
@pytest.mark.parametrize("l2", [True, False, "per-request"])
def test_native_score_equals_the_twin(hkv, g, d, l2, threads):
    batch = make_batch([300, 17, 120], hkv, d, torch.float32, "dynsplit", seed=d + g,
                       spread=1.5)
    norm = torch.tensor([True, False, True]) if l2 == "per-request" else l2
    q = torch.randn(3, hkv * g, d, generator=torch.Generator().manual_seed(g))
    index = torch.where(batch.summary_index >= 0, batch.summary_index, -1).contiguous()
    got = native.score(LIB, q, batch.center, batch.radius, index, _u8(norm, 3),
                       native.index_max(index))
    ref = score_blocks(q, batch.center, batch.radius, batch.summary_index, norm)
    real = (index >= 0)[:, None, :].expand_as(ref)
    assert rel_err(got[real], ref[real]) < 1e-6
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))  # the caller masks these


@needs_lib
@pytest.mark.parametrize("b,hkv,g,d,dv", [(3, 3, 3, 64, 64), (3, 8, 4, 128, 128),
                                           (3, 2, 8, 64, 32), (3, 1, 71, 64, 64),  # MQA
                                           (1, 3, 3, 64, 64), (1, 1, 4, 64, 64)])
def test_native_attention_equals_the_twin(b, hkv, g, d, dv, threads):
    """Also where a list is cut into parts merged by their log-sum-exp (fewer lists than the
    threads keep busy: one request with 1 or 3 KV heads)."""
    gen = torch.Generator().manual_seed(d + dv)
    n, slots = 300, 2000
    q = torch.randn(b, hkv * g, d, generator=gen)
    k = torch.randn(slots, hkv, d, generator=gen)
    v = torch.randn(slots, hkv, dv, generator=gen)
    kv_slots = torch.randint(0, slots, (b, hkv, n), generator=gen)
    kv_slots[0, :, 250:] = -1  # padding
    kv_slots[0, -1, :160] = -1  # a list whose first part is empty
    kv_slots[-1, :, ::7] = -1  # holes
    if b > 1:
        kv_slots[1, 0, :] = -1  # a head with no valid entry: zeros, lse -inf
    heads = torch.arange(hkv).view(1, hkv, 1)
    rows = (kv_slots.clamp(min=0) * hkv + heads).contiguous()
    work = torch.full((native.attend_work(LIB, b, hkv, g, n, dv),), float("nan"))
    out, lse = native.attend(LIB, q, k.view(-1, d), v.view(-1, dv), rows, kv_slots >= 0,
                             1 / math.sqrt(d), work, native.index_max(rows))
    ref, ref_lse = twin_attention(q, k, v, kv_slots, return_lse=True)
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    if b > 1:
        assert torch.equal(out[1, :g], torch.zeros(g, dv)) and torch.isinf(lse[1, :g]).all()


@needs_lib
def test_native_kernels_refuse_bad_arguments():
    q, c = torch.randn(1, 4, 64), torch.randn(10, 2, 64)
    index = torch.tensor([[0, 9, -1]])
    l2 = _u8(True, 1)
    with pytest.raises(IndexError, match="out of range"):
        native.score(LIB, q, c, c, index, l2, top=10)  # a row past the summaries
    with pytest.raises(ValueError, match="unsupported"):
        native.score(LIB, q.double(), c, c, index, l2, top=9)
    with pytest.raises(ValueError, match="unsupported"):
        native.score(LIB, q, c.transpose(0, 1), c.transpose(0, 1), index, l2, top=1)
    rows = torch.zeros(1, 2, 5, dtype=torch.int64)
    ok = torch.ones(1, 2, 5, dtype=torch.bool)
    kv = torch.randn(20, 64)
    with pytest.raises(IndexError, match="out of range"):
        native.attend(LIB, q, kv, kv, rows, ok, 0.1, torch.empty(1000), top=20)
    with pytest.raises(ValueError, match="unsupported"):
        native.attend(LIB, q, kv, kv, rows, ok, 0.1, torch.empty(13), top=0)  # work too small


def test_a_host_without_a_compiler_keeps_the_torch_path(monkeypatch, tmp_path):
    """A failed build warns once and the planned step runs torch ops, with the same result."""
    monkeypatch.setenv("DYNSPLIT_KERNELS", "torch")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DYNSPLIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_STATE", {})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert native.load() is None
    b = make_batch([300, 120], 2, 64, torch.float32, "dynsplit", seed=4, spread=1.5)
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(4))
    plan = plan_selection(b.table, b.seq_lens, 96, 4, 32, max_block_len=20)
    w = SparseDecodeWrapper(6, 2, 64, device="cpu")
    w.plan(plan, b.summary_index, b.token_slots, True)
    assert w._step.native is None
    out = w.run(q, b.k, b.v, b.center, b.radius)
    ref_sel = select(score_blocks(q, b.center, b.radius, b.summary_index, True), plan)
    ref = twin_attention(q, b.k, b.v, positions_to_slots(ref_sel.positions, b.token_slots))
    assert torch.equal(w.last_selection.positions, ref_sel.positions)
    assert rel_err(out, ref) < 1e-5


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DYNSPLIT_NATIVE", "0")
    assert native.load() is None
    b = make_batch([200], 2, 64, torch.float32, "dynsplit", seed=1)
    w = SparseDecodeWrapper(6, 2, 64, device="cpu", backend="torch")
    w.plan(plan_selection(b.table, b.seq_lens, 64, 4, 32, max_block_len=20), b.summary_index,
           b.token_slots)
    assert w._step.native is None


@needs_lib
@pytest.mark.parametrize("seed", range(6))
def test_native_keep_equals_the_core_selection(seed, monkeypatch, threads):
    """The planned step's block choice in C (ds_keep) against core.select and the torch
    formulation: same positions, counts, order and kept lengths, with exact ties, -0.0 / +0.0
    and unselectable blocks among the scores."""
    lens = [300, 17, 120, 512, 260, 90][: 1 + seed % 6]
    batch = make_batch(lens, 3, 64, torch.float32, "dynsplit", seed=seed)
    q = torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(seed))
    plan = plan_selection(batch.table, batch.seq_lens, 64 + 16 * seed, 4, 32, max_block_len=20)
    steps = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("DYNSPLIT_NATIVE", fused)
        steps[fused] = cpu.DecodeStep(plan, batch.summary_index, batch.token_slots, 3, True)
    assert steps["1"].native is not None and steps["0"].native is None
    scores = steps["0"].score(q, batch.center, batch.radius)
    if seed % 2 == 0:
        scores = scores.round()  # many exact ties
    if seed % 3 == 0:
        scores[..., ::5] = scores[..., ::5].masked_fill(torch.isfinite(scores[..., ::5]), -0.0)
        scores[..., 1::5] = scores[..., 1::5].masked_fill(torch.isfinite(scores[..., 1::5]), 0.0)
    got = steps["1"].keep(scores)
    ref = select(scores, plan)
    k = got.order.shape[2]
    assert k == steps["0"].max_kept and k < ref.order.shape[2]  # a top-k, not a full sort
    assert torch.equal(got.positions, ref.positions) and torch.equal(got.counts, ref.counts)
    assert torch.equal(got.blocks, ref.blocks)
    assert torch.equal(got.order, ref.order[..., :k])
    assert torch.equal(got.kept_len, ref.kept_len[..., :k])
    if seed % 3:  # the torch side's keys assume no -0.0 (DecodeStep.score's bias removes it)
        torch_side = steps["0"].keep(scores)
        assert torch.equal(got.order, torch_side.order)


@needs_lib
@pytest.mark.parametrize("lens,hkv,g,d,dv", [([300, 17, 120], 3, 3, 64, 64),
                                              ([700], 3, 3, 64, 64),  # lists cut into parts
                                              ([400, 260], 8, 4, 128, 128),
                                              ([250], 1, 7, 96, 32)])
@pytest.mark.parametrize("evicted", [False, True])
def test_native_layer_equals_select_then_attend(lens, hkv, g, d, dv, evicted, threads,
                                                monkeypatch):
    """The fused layer (ds_layer: score, keep, pool rows, attention in one call) against the
    planned step's torch formulation, and the selection against core.select: the same
    positions, counts, order and kept lengths, the same output. Evicted slots (-1) are masked
    like padding."""
    batch = make_batch(lens, hkv, d, torch.float32, "dynsplit", seed=len(lens) + d, dv=dv,
                       spread=1.5)
    slots = batch.token_slots.clone()
    if evicted:
        slots[0, 40:90] = -1
    q = torch.randn(len(lens), hkv * g, d, generator=torch.Generator().manual_seed(g))
    budget = max(96, lens[0] // 3)
    plan = plan_selection(batch.table, batch.seq_lens, budget, 4, 32, max_block_len=20)
    steps = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("DYNSPLIT_NATIVE", fused)
        steps[fused] = cpu.DecodeStep(plan, batch.summary_index, slots, hkv, True)
    got = steps["1"].run(q, batch.k, batch.v, batch.center, batch.radius, return_lse=True)
    assert steps["0"].run(q, batch.k, batch.v, batch.center, batch.radius) is None
    (out, lse), sel = got
    if threads == 2 and lens == [700]:  # one request of 3 KV heads: 2 parts per list
        assert next(iter(steps["1"]._layers.values())).args.S == 2
    ref_sel = steps["0"].select(q, batch.center, batch.radius)
    core_sel = select(score_blocks(q, batch.center, batch.radius, batch.summary_index, True), plan)
    assert torch.equal(sel.positions, core_sel.positions)
    assert torch.equal(sel.counts, core_sel.counts)
    assert torch.equal(sel.order, ref_sel.order) and torch.equal(sel.kept_len, ref_sel.kept_len)
    alone = steps["1"].select(q, batch.center, batch.radius)  # the fused selection alone
    for got_t, want in ((alone.positions, sel.positions), (alone.counts, sel.counts),
                        (alone.order, sel.order), (alone.kept_len, sel.kept_len)):
        assert torch.equal(got_t, want)
    ref, ref_lse = steps["0"].attend(q, batch.k, batch.v, ref_sel, return_lse=True)
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    if not evicted:
        twin = twin_attention(q, batch.k, batch.v, positions_to_slots(core_sel.positions, slots))
        assert rel_err(out, twin) < 1e-5


@needs_lib
def test_native_layer_refuses_bad_arguments(monkeypatch):
    batch = make_batch([200, 90], 2, 64, torch.float32, "dynsplit", seed=3)
    plan = plan_selection(batch.table, batch.seq_lens, 64, 4, 32, max_block_len=20)
    step = cpu.DecodeStep(plan, batch.summary_index, batch.token_slots, 2, True)
    q = torch.randn(2, 6, 64)
    step.run(q, batch.k, batch.v, batch.center, batch.radius)  # binds the layer
    with pytest.raises(IndexError, match="summary index"):  # summaries with too few rows
        step.run(q, batch.k, batch.v, batch.center[:3], batch.radius[:3])
    with pytest.raises(IndexError, match="pool row index"):  # a pool with too few slots
        step.run(q, batch.k[:10], batch.v[:10], batch.center, batch.radius)
    with pytest.raises(ValueError, match="unsupported"):
        step.run(q[:1], batch.k, batch.v, batch.center, batch.radius)  # another batch size
    with pytest.raises(IndexError, match="summary index"):
        step.select(q, batch.center[:3], batch.radius[:3])
    with pytest.raises(ValueError, match="unsupported"):
        step.select(q[:1], batch.center, batch.radius)
