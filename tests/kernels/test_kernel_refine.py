"""Two-stage selection (refine) through the plan/run wrapper on every kernel side: the fused C
layer (ds_layer's exact_scores stage), the CPU torch formulation, the core twins and the Triton
side (interpreter here), against core.select_refined + the core's sparse attention."""

import pytest
import torch

from dynsplit_sglang.core import (
    candidate_plan, plan_selection, positions_to_slots, score_blocks, select_refined,
    sparse_decode_attention,
)
from dynsplit_sglang.kernels import SparseDecodeWrapper, native
from kernel_cases import TOL, make_batch, rel_err

SINK, RECENT = 4, 32
SIDES = [("torch", "1"), ("torch", "0"), ("twin", "0"), ("triton", "0")]


def _case(lens, hkv, g, d, evicted, seed, dtype=torch.float32):
    batch = make_batch(lens, hkv, d, dtype, "dynsplit", seed=seed, spread=1.5)
    if evicted:  # evicted slots (-1): no key, in no score and no attention
        batch.token_slots[0, 40:90] = -1
    q = torch.randn(len(lens), hkv * g, d, generator=torch.Generator().manual_seed(seed))
    return batch, q.to(dtype)


def _reference(batch, q, plan, cand):
    scores = score_blocks(q, batch.center, batch.radius, batch.summary_index, batch.l2)
    sel = select_refined(scores, plan, cand, q, batch.k, batch.token_slots)
    slots = positions_to_slots(sel.positions, batch.token_slots)
    return sparse_decode_attention(q, batch.k, batch.v, slots, return_lse=True), sel


def _same_selection(sel, ref):
    """The same blocks and tokens per list (the exact scores' last bits may order two kept
    blocks differently, which changes where they are laid out, not what is attended)."""
    assert torch.equal(sel.counts.cpu(), ref.counts)
    assert torch.equal(sel.blocks.cpu(), ref.blocks)
    assert torch.equal(sel.positions.cpu().sort(-1).values, ref.positions.sort(-1).values)


@pytest.mark.parametrize("side,fused", SIDES)
@pytest.mark.parametrize("lens,hkv,g,d,budget,factor,evicted", [
    ([300, 17, 120], 3, 3, 64, 96, 2.0, False),
    ([512, 250, 480], 2, 4, 128, 128, 1.5, True),
    ([400, 260], 1, 7, 64, 100, 4.0, False),
    ([300, 200, 480], 2, 2, 64, 112, (1.0, 2.0, 3.0), True),  # a factor per request
    ([1500], 3, 3, 64, 300, 2.0, True),  # 3 lists on 2 threads: each list's keys in 2 parts
])
def test_refined_plan_run_equals_the_core(side, fused, lens, hkv, g, d, budget, factor, evicted,
                                          threads, monkeypatch):
    """threads: the fused call splits each list's candidate keys into the attention's parts
    (native.attend_splits: one request's 3 KV heads on 2 threads, 2 parts each)."""
    monkeypatch.setenv("DYNSPLIT_KERNELS", side)
    monkeypatch.setenv("DYNSPLIT_NATIVE", fused)
    batch, q = _case(lens, hkv, g, d, evicted, seed=budget)
    plan = plan_selection(batch.table, batch.seq_lens, budget, SINK, RECENT, max_block_len=20)
    cand = candidate_plan(plan, torch.tensor(factor) if isinstance(factor, tuple) else factor)
    w = SparseDecodeWrapper(hkv * g, hkv, d)
    w.plan(plan, batch.summary_index, batch.token_slots, batch.l2, refine=cand)
    assert (w._step is not None and w._step.native is not None) == (fused == "1"
                                                                    and native.load() is not None)
    out, lse = w.run(q, batch.k, batch.v, batch.center, batch.radius, return_lse=True)
    (ref, ref_lse), ref_sel = _reference(batch, q, plan, cand)
    _same_selection(w.last_selection, ref_sel)
    assert rel_err(out, ref) < TOL[torch.float32]
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    alone = w.select(q, batch.center, batch.radius, batch.k)  # the selection without attention
    _same_selection(alone, ref_sel)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_run_layer_refines_each_layer_on_its_own_keys(fused, monkeypatch):
    """The server's hot path (run_layer, the step's bound fused call) refines with the layer's
    own key pool: equal to run on that layer, and not to another layer's selection."""
    monkeypatch.setenv("DYNSPLIT_KERNELS", "torch")
    monkeypatch.setenv("DYNSPLIT_NATIVE", fused)
    lens, hkv, g, d = [300, 150, 220], 2, 4, 64
    batches = [_case(lens, hkv, g, d, False, seed=s)[0] for s in (3, 3)]
    gen = torch.Generator().manual_seed(9)
    batches[1].k.copy_(torch.randn(batches[1].k.shape, generator=gen))  # same table, other keys
    center = torch.stack([b.center for b in batches])
    radius = torch.stack([b.radius for b in batches])
    plan = plan_selection(batches[0].table, batches[0].seq_lens, 96, SINK, RECENT,
                          max_block_len=20)
    cand = candidate_plan(plan, 2)
    bound, plain = SparseDecodeWrapper(hkv * g, hkv, d), SparseDecodeWrapper(hkv * g, hkv, d)
    bound.plan(plan, batches[0].summary_index, batches[0].token_slots, True,
               summaries=(center, radius), refine=cand)
    plain.plan(plan, batches[0].summary_index, batches[0].token_slots, True, refine=cand)
    assert (bound._layer_set is not None) == (fused == "1" and native.load() is not None)
    q = torch.randn(len(lens), hkv * g, d, generator=gen)
    for li, b in enumerate(batches):
        out = bound.run_layer(li, q, b.k, b.v, 0.1)
        ref = plain.run(q, b.k, b.v, center[li], radius[li], 0.1)
        assert rel_err(out, ref) < 1e-6, li
        assert torch.equal(bound.layer_counts[li], plain.tokens_attended())
    (_, _), one = _reference(batches[0], q, plan, cand)
    (_, _), two = _reference(batches[1], q, plan, cand)
    assert not torch.equal(one.blocks, two.blocks)  # the keys decide: the test can tell


@pytest.mark.parametrize("side,fused", SIDES)
def test_a_refined_selection_needs_the_keys(side, fused, monkeypatch):
    monkeypatch.setenv("DYNSPLIT_KERNELS", side)
    monkeypatch.setenv("DYNSPLIT_NATIVE", fused)
    batch, q = _case([200, 90], 2, 2, 64, False, seed=1)
    plan = plan_selection(batch.table, batch.seq_lens, 80, SINK, RECENT, max_block_len=20)
    w = SparseDecodeWrapper(4, 2, 64)
    w.plan(plan, batch.summary_index, batch.token_slots, True, refine=candidate_plan(plan, 2))
    with pytest.raises(ValueError, match="k_buffer"):
        w.select(q, batch.center, batch.radius)


def test_refine_changes_what_the_gauss_score_alone_keeps():
    """Not a no-op: on these keys two-stage selection keeps other blocks than the score alone,
    and its blocks hold a larger max q·k (the quantity the exact stage ranks by)."""
    batch, q = _case([480, 400], 2, 4, 64, False, seed=5)
    plan = plan_selection(batch.table, batch.seq_lens, 96, SINK, RECENT, max_block_len=20)
    w1, w2 = SparseDecodeWrapper(8, 2, 64), SparseDecodeWrapper(8, 2, 64)
    w1.plan(plan, batch.summary_index, batch.token_slots, True)
    w2.plan(plan, batch.summary_index, batch.token_slots, True, refine=candidate_plan(plan, 2))
    one = w1.select(q, batch.center, batch.radius, batch.k)
    two = w2.select(q, batch.center, batch.radius, batch.k)
    assert not torch.equal(one.blocks, two.blocks)

    def kept_max(sel):
        slots = positions_to_slots(sel.positions, batch.token_slots)
        keys = batch.k[slots.clamp(min=0), torch.arange(2)[None, :, None]]
        logit = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 4, 64), keys).amax(2)
        logit = logit.masked_fill(slots < 0, float("-inf"))
        return torch.topk(logit, 32, dim=-1).values.sum()

    assert kept_max(two) > kept_max(one)
