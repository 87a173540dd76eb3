"""SparseDecodeWrapper.run_layer, the decode step's per-layer hot path: every compressed layer
of a planned step bound once (kernels.native.LayerSet), against run with the same layer's
summaries and pools; its fallbacks, counts and argument checks."""

import pytest
import torch

from dynsplit_sglang.core import plan_selection
from dynsplit_sglang.kernels import SparseDecodeWrapper, native
from kernel_cases import make_batch

LIB = native.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler on this host")
LAYERS = 3


def _layers(lens, hkv, d, dv, seed=0):
    """LAYERS layers over one block table: each its own pools and summaries (stacked [L, ...]
    as the block store keeps them)."""
    batches = [make_batch(lens, hkv, d, torch.float32, "dynsplit", seed=seed, dv=dv,
                          spread=1.5) for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(seed + 1)
    for i, b in enumerate(batches[1:], 1):  # same table and slots, other keys and values
        b.k.copy_(torch.randn(b.k.shape, generator=g))
        b.v.copy_(torch.randn(b.v.shape, generator=g))
        b.center.copy_(torch.randn(b.center.shape, generator=g))
        b.radius.copy_(torch.rand(b.radius.shape, generator=g))
    center = torch.stack([b.center for b in batches])
    radius = torch.stack([b.radius for b in batches])
    return batches, center, radius


def _wrappers(batch, hq, hkv, dv, center, radius, budget=96):
    plan = plan_selection(batch.table, batch.seq_lens, budget, 4, 32, max_block_len=20)
    bound, plain = (SparseDecodeWrapper(hq, hkv, dv) for _ in range(2))
    bound.plan(plan, batch.summary_index, batch.token_slots, True, summaries=(center, radius))
    plain.plan(plan, batch.summary_index, batch.token_slots, True)
    return bound, plain


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("lens,hkv,g,d,dv", [([300, 17, 120], 3, 3, 64, 64),
                                              ([400], 2, 4, 128, 32)])
def test_run_layer_equals_run_on_that_layers_summaries(lens, hkv, g, d, dv, fused,
                                                       monkeypatch):
    """Each layer's output and tokens attended equal run's with that layer's summaries and
    pools; an earlier layer's output is not overwritten by a later one (each has its own)."""
    monkeypatch.setenv("DYNSPLIT_NATIVE", fused)
    batches, center, radius = _layers(lens, hkv, d, dv, seed=d)
    bound, plain = _wrappers(batches[0], hkv * g, hkv, dv, center, radius)
    assert (bound._layer_set is not None) == (fused == "1" and LIB is not None)
    gen = torch.Generator().manual_seed(g)
    qs = [torch.randn(len(lens), hkv * g, d, generator=gen) for _ in range(LAYERS)]
    outs = [bound.run_layer(li, qs[li], b.k, b.v, 0.1) for li, b in enumerate(batches)]
    for li, b in enumerate(batches):
        ref = plain.run(qs[li], b.k, b.v, center[li], radius[li], 0.1)
        assert torch.equal(outs[li], ref), li
        assert torch.equal(bound.layer_counts[li], plain.tokens_attended())
    assert not torch.equal(outs[0], outs[1])


@needs_lib
def test_run_layer_falls_back_where_the_fused_call_cannot_take_the_tensors():
    """A strided query or fp16 pools run the layer through run (same result), and are counted."""
    batches, center, radius = _layers([300, 120], 3, 64, 64)
    bound, plain = _wrappers(batches[0], 9, 3, 64, center, radius)
    b = batches[1]
    q = torch.randn(9, 2, 64).transpose(0, 1)  # [2, 9, 64], not contiguous
    assert not q.is_contiguous()
    got = bound.run_layer(1, q, b.k, b.v)
    assert torch.equal(got, plain.run(q, b.k, b.v, center[1], radius[1]))
    assert torch.equal(bound.layer_counts[1], plain.tokens_attended())
    q = q.contiguous()
    got = bound.run_layer(2, q, b.k.half(), b.v.half())
    ref = plain.run(q, b.k.half(), b.v.half(), center[2], radius[2])
    assert torch.equal(got, ref)
    assert torch.equal(bound.layer_counts[2], plain.tokens_attended())
    assert bound.layer_counts[0].sum() == 0  # not run: nothing counted


@needs_lib
def test_run_layer_rebinds_a_layer_given_other_pools():
    batches, center, radius = _layers([300], 3, 64, 64)
    bound, plain = _wrappers(batches[0], 9, 3, 64, center, radius)
    q, b = torch.randn(1, 9, 64), batches[0]
    first = bound.run_layer(0, q, b.k, b.v).clone()
    k2, v2 = b.k * 2, b.v + 1  # new tensors: the layer's pools moved
    got = bound.run_layer(0, q, k2, v2)
    assert torch.equal(got, plain.run(q, k2, v2, center[0], radius[0]))
    assert not torch.equal(got, first)


@needs_lib
def test_run_layer_refuses_what_it_cannot_read():
    batches, center, radius = _layers([300, 120], 3, 64, 64)
    bound, _ = _wrappers(batches[0], 9, 3, 64, center, radius)
    q, b = torch.randn(2, 9, 64), batches[0]
    with pytest.raises(IndexError, match="layer 3 of 3"):
        bound.run_layer(LAYERS, q, b.k, b.v)
    with pytest.raises(IndexError, match="layer -1"):
        bound.run_layer(-1, q, b.k, b.v)
    with pytest.raises(IndexError, match="pool row index"):  # a pool with too few slots
        bound.run_layer(0, q, b.k[:10], b.v[:10])
    plan = plan_selection(b.table, b.seq_lens, 96, 4, 32, max_block_len=20)
    with pytest.raises(IndexError, match="summary index"):  # summaries with too few rows
        bound.plan(plan, b.summary_index, b.token_slots, True,
                   summaries=(center[:, :3].contiguous(), radius[:, :3].contiguous()))
    plain = SparseDecodeWrapper(9, 3, 64)
    plain.plan(plan, b.summary_index, b.token_slots, True)
    with pytest.raises(RuntimeError, match="summaries"):
        plain.run_layer(0, q, b.k, b.v)


@needs_lib
def test_pools_checked_in_an_earlier_step_are_checked_again_for_a_plan_reaching_further():
    """The pools a layer was bound to are kept across plans; a later plan naming pool rows
    past them must not read out of bounds."""
    batches, center, radius = _layers([300], 3, 64, 64)
    b = batches[0]
    small_k = b.k[: int(b.token_slots.max()) + 1].clone()
    small_v = b.v[: small_k.shape[0]].clone()
    bound, _ = _wrappers(b, 9, 3, 64, center, radius)
    q = torch.randn(1, 9, 64)
    bound.run_layer(0, q, small_k, small_v)  # binds layer 0 to the small pools
    slots = b.token_slots.clone()
    slots[0, 5] = small_k.shape[0] + 3  # the next step's plan names a slot past them
    plan = plan_selection(b.table, b.seq_lens, 96, 4, 32, max_block_len=20)
    bound.plan(plan, b.summary_index, slots, True, summaries=(center, radius))
    with pytest.raises(IndexError, match="pool row index"):
        bound.run_layer(0, q, small_k, small_v)
