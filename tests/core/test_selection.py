import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsplit_sglang.core import (
    BlockTable, DynSplitConfig, block_summaries, candidate_plan, contiguous_slots, plan_selection,
    positions_to_slots, score_blocks, score_blocks_ragged, segment, select, select_positions,
    select_refined,
    summarize, summarize_ragged,
)


def _table(seq_lens, cfg, seed=0):
    ends = []
    for i, n in enumerate(seq_lens):
        g = torch.Generator().manual_seed(seed + i)
        ends.append(segment(cfg, n, torch.randn(n, generator=g),
                            torch.rand(n, generator=g) < 0.3).ends)
    return BlockTable.from_ends(ends)


@pytest.mark.parametrize("spread", [None, 1.5])
def test_summaries_equal_ragged_and_skip_negative_index(spread):
    torch.manual_seed(0)
    cfg = DynSplitConfig()
    k = torch.randn(2, 90, 3, 8)
    table = _table([90, 61], cfg)
    center, radius = summarize(k, table, cfg.max_block_len, spread)
    for b in range(2):
        nb = int(table.counts[b])
        ends = (table.starts[b, :nb] + table.lens[b, :nb] - 1).long()
        c, r = summarize_ragged(k[b], ends, spread)
        torch.testing.assert_close(center[b, :nb], torch.stack(c))
        torch.testing.assert_close(radius[b, :nb], torch.stack(r))
        blk = k[b, int(table.starts[b, 1]): int(ends[1]) + 1]  # the summary's definition
        if spread is None:
            torch.testing.assert_close(center[b, 1], (blk.amax(0) + blk.amin(0)) / 2)
            torch.testing.assert_close(radius[b, 1], (blk.amax(0) - blk.amin(0)) / 2)
        else:
            z = math.sqrt(2 * math.log(blk.shape[0]))
            torch.testing.assert_close(center[b, 1], blk.mean(0))
            torch.testing.assert_close(radius[b, 1], spread * z * blk.std(0, unbiased=False))
    out = torch.full((5, 3, 8), float("nan"))
    idx = torch.full(table.starts.shape, -1, dtype=torch.long)
    idx[0, 2] = 4
    block_summaries(k.view(-1, 3, 8), contiguous_slots(2, 90), table, out, out.clone(), idx, 20,
                    spread)
    assert torch.equal(out[4], center[0, 2]) and torch.isnan(out[:4]).all()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (7, 1), (32, 8)])
def test_quest_bound_upper_bounds_every_key_and_matches_ragged(hq, hkv):
    torch.manual_seed(hq)
    cfg = DynSplitConfig()
    d = 16
    k = torch.randn(1, 120, hkv, d)
    q = torch.randn(1, hq, d)
    table = _table([120], cfg)
    center, radius = summarize(k, table, cfg.max_block_len)  # the box: Quest's bound
    nb = int(table.counts[0])
    idx = torch.arange(table.capacity)[None].masked_fill(table.lens == 0, -1)
    s = score_blocks(q, center[0], radius[0], idx)
    assert torch.isinf(s[..., nb:]).all()
    qg = q[0].view(hkv, hq // hkv, d)
    for j in range(nb):
        a, n = int(table.starts[0, j]), int(table.lens[0, j])
        true_max = torch.einsum("hgd,thd->hgt", qg, k[0, a : a + n]).amax(dim=(1, 2))
        assert bool((s[0, :, j] >= true_max - 1e-5).all())
        lo, hi = k[0, a:a + n].amin(0), k[0, a:a + n].amax(0)  # Quest's own formula
        quest = torch.maximum(qg * hi[:, None], qg * lo[:, None]).sum(-1).amax(-1)
        torch.testing.assert_close(s[0, :, j], quest)
    ragged = score_blocks_ragged(q[0], list(center[0, :nb]), list(radius[0, :nb]))
    torch.testing.assert_close(s[0, :, :nb], ragged)


def test_gauss_score_is_exact_for_equal_keys_and_does_not_grow_with_length_like_the_bound():
    """The reason for the default score (docs/accuracy.md): Quest's bound adds each channel's
    extreme, so its excess over the true max grows with the block length; the gauss estimate's
    barely does, and it is exact for a block of equal keys."""
    g = torch.Generator().manual_seed(0)
    d, blocks = 64, 400
    q = torch.randn(1, 1, d, generator=g)
    over = {}
    for spread, n in ((None, 12), (None, 20), (1.5, 12), (1.5, 20)):
        k = torch.randn(1, blocks * n, 1, d, generator=torch.Generator().manual_seed(n))
        table = BlockTable.from_ends([torch.arange(n - 1, blocks * n, n)])
        center, radius = summarize(k, table, n, spread)
        idx = torch.arange(blocks)[None]
        est = score_blocks(q, center[0], radius[0], idx, spread is not None)[0, 0]
        true = (k[0, :, 0] @ q[0, 0]).view(blocks, n).amax(1)
        over[(spread, n)] = float((est - true).mean())
    assert over[(None, 12)] > 0 and over[(None, 20)] > over[(None, 12)]
    bound_growth = over[(None, 20)] - over[(None, 12)]
    gauss_growth = abs(over[(1.5, 20)] - over[(1.5, 12)])
    assert gauss_growth < 0.25 * bound_growth, over
    same = torch.randn(1, 1, 1, d, generator=g).expand(1, 16, 1, d)
    center, radius = summarize(same, BlockTable.from_ends([torch.tensor([15])]), 16, 1.5)
    est = score_blocks(q, center[0], radius[0], torch.zeros(1, 1, dtype=torch.long), True)
    torch.testing.assert_close(est[0, 0, 0], (same[0, 0, 0] @ q[0, 0]))


@settings(max_examples=80, deadline=None)
@given(lens=st.lists(st.integers(1, 300), min_size=1, max_size=5),
       budget=st.integers(20, 400), sink=st.integers(0, 8), recent=st.integers(1, 12),
       seed=st.integers(0, 1000))
def test_selection_invariants(lens, budget, sink, recent, seed):
    budget = max(budget, sink + recent)
    cfg = DynSplitConfig(budget=budget, sink=sink, recent=recent, block_size=12, tolerance=4)
    torch.manual_seed(seed)
    table = _table(lens, cfg, seed)
    hkv = 2
    scores = torch.randn(len(lens), hkv, table.capacity).masked_fill(table.lens[:, None] == 0,
                                                                     float("-inf"))
    seq = torch.tensor(lens)
    sel = select_positions(scores, table, seq, budget, sink, recent)
    assert sel.positions.shape == (len(lens), hkv, max(min(budget, n) for n in lens))
    for b, n in enumerate(lens):
        for h in range(hkv):
            row = sel.positions[b, h]
            real = row[row >= 0]
            assert real.numel() == int(sel.counts[b, h]) <= budget  # never over budget
            assert torch.equal(row[: real.numel()], real)  # padding only at the end
            assert len(set(real.tolist())) == real.numel() and int(real.max()) < n
            have = set(real.tolist())
            if n <= budget:
                assert have == set(range(n))  # short requests run dense
                continue
            assert set(range(sink)) <= have  # sink always kept
            assert set(range(n - recent, n)) <= have  # recent window always kept
            # Kept blocks: the longest prefix of the score order that fits the block budget,
            # each whole once clipped to the middle region [sink, n - recent).
            clip = {}
            for j in range(int(table.counts[b])):
                a = max(int(table.starts[b, j]), sink)
                e = min(int(table.starts[b, j] + table.lens[b, j]), n - recent)
                if e > a:
                    clip[j] = (a, e)
            order = sorted(clip, key=lambda j: (-float(scores[b, h, j]), j))
            want, used = [], 0
            for j in order:
                if used + clip[j][1] - clip[j][0] > budget - sink - recent:
                    break
                used += clip[j][1] - clip[j][0]
                want.append(j)
            assert sorted(want) == sel.blocks[b, h].nonzero().flatten().tolist()
            expect = set(range(sink)) | set(range(n - recent, n))
            for j in want:
                expect |= set(range(*clip[j]))
            assert have == expect


def test_plan_once_select_per_layer_equals_one_shot():
    cfg = DynSplitConfig(budget=100, recent=20)
    table = _table([400, 250], cfg)
    seq = torch.tensor([400, 250])
    plan = plan_selection(table, seq, 100, 4, 20)
    for seed in range(3):
        scores = torch.randn(2, 3, table.capacity, generator=torch.Generator().manual_seed(seed))
        a = select(scores, plan)
        b = select_positions(scores, table, seq, 100, 4, 20)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.counts, b.counts)


def test_per_request_budget_and_recent():
    cfg = DynSplitConfig(budget=200, recent=10)
    table = _table([500, 500], cfg)
    scores = torch.randn(2, 1, table.capacity)
    sel = select_positions(scores, table, torch.tensor([500, 500]), torch.tensor([200, 80]), 4,
                           torch.tensor([10, 76]))
    assert int(sel.counts[0, 0]) <= 200 and int(sel.counts[1, 0]) == 80
    assert set(range(424, 500)) <= set(sel.positions[1, 0].tolist())


def test_positions_to_slots_keeps_padding():
    pos = torch.tensor([[[0, 2, -1]]])
    slots = torch.tensor([[10, 11, 12]])
    assert positions_to_slots(pos, slots).tolist() == [[[10, 12, -1]]]


def test_capacity_is_what_the_batch_can_attend_not_the_largest_budget():
    # Issue 14: a dense request's budget (2**31 - 1 once, or any large per-request override)
    # sized the [B, Hkv, capacity] selection output and killed the server (103 GB).
    cfg = DynSplitConfig(block_size=8, tolerance=2)
    table = _table([100, 300, 40], cfg)
    seq = torch.tensor([100, 300, 40])
    budgets = torch.tensor([2**31 - 1, 64, 10**12])
    plan = plan_selection(table, seq, budgets, 4, 16, max_block_len=4096)
    assert plan.capacity == 100  # the dense row's length; the sparse row needs 64
    assert plan.max_clip_len <= plan.capacity  # a block longer than the budget is never kept
    sel = select(torch.randn(3, 2, table.capacity, generator=torch.Generator().manual_seed(0)),
                 plan)
    assert sel.positions.shape == (3, 2, 100)
    assert sel.counts[0].tolist() == [100, 100] and sel.counts[2].tolist() == [40, 40]
    assert sel.positions[0, 0].tolist() == list(range(100))
    assert int(sel.counts[1].max()) <= 64


def _refined_reference(scores, plan, q, k, token_slots, factor, starts, lens):
    """Two-stage selection written out per (request, KV head) with Python lists: candidates =
    the greedy prefix of the estimate's order within factor x the block budget; each scored by
    the max q·k over its attended (clipped) positions and the group's query heads; then the
    greedy prefix of that order within the block budget. factor: a number or one per request;
    an evicted slot (< 0) is no key."""
    b, hkv, nb = scores.shape
    g = q.shape[1] // hkv
    kept = torch.zeros(b, hkv, nb, dtype=torch.bool)
    for i in range(b):
        if bool(plan.dense[i]):
            continue
        clen, cst = plan.clip_len[i].tolist(), plan.clip_start[i].tolist()
        room = int(plan.block_budget[i])
        for h in range(hkv):
            def greedy(score, cap):
                order = sorted((j for j in range(nb) if clen[j] > 0 and math.isfinite(score[j])),
                               key=lambda j: (-score[j], j))
                out, used = [], 0
                for j in order:
                    if used + clen[j] > cap:
                        break
                    out.append(j)
                    used += clen[j]
                return out
            f = factor[i] if isinstance(factor, (list, tuple)) else factor
            cand = greedy(scores[i, h].tolist(), math.floor(room * f))
            exact = [-math.inf] * nb
            for j in cand:
                held = [s for s in token_slots[i, cst[j]:cst[j] + clen[j]].tolist() if s >= 0]
                if held:
                    ks = k[held, h]  # [n, D]
                    exact[j] = float((q[i, h * g:(h + 1) * g] @ ks.T).max())
            for j in greedy(exact, room):
                kept[i, h, j] = True
    return kept


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0, 4.0, 100.0, (1.5, 3.0, 2.0)])
@pytest.mark.parametrize("evicted", [False, True])
def test_two_stage_selection_equals_a_per_head_reference(factor, evicted):
    """select_refined: the estimate's candidates for factor x the budget, re-ranked by their
    exact max q·k over the attended keys (gathered through the slot map), against a loop; at a
    factor that makes every block a candidate it is the exact (oracle) selection, and its
    positions stay within the real plan's budget. A factor per request (a tensor) and evicted
    slots (-1: no key, a block of them all is out of the race) too."""
    torch.manual_seed(3)
    cfg = DynSplitConfig()
    seq_lens = [300, 171, 40]  # the last runs dense at this budget
    table = _table(seq_lens, cfg, seed=5)
    hq, hkv, d = 8, 2, 16
    pool = 700
    k = torch.randn(pool, hkv, d)
    token_slots = torch.stack([torch.randperm(pool)[:300] for _ in seq_lens])
    q = torch.randn(len(seq_lens), hq, d)
    keys = torch.stack([k[token_slots[i]] for i in range(len(seq_lens))])  # [B, T, Hkv, D]
    center, radius = summarize(keys, table, cfg.max_block_len, 1.5)
    nb = table.capacity
    index = torch.arange(len(seq_lens) * nb).view(len(seq_lens), nb)
    index = index.masked_fill(table.lens == 0, -1)
    scores = score_blocks(q, center.flatten(0, 1), radius.flatten(0, 1), index, True)
    plan = plan_selection(table, torch.tensor(seq_lens), 64, 4, 16)
    if evicted:
        token_slots[0, 50:120] = -1
    cand = candidate_plan(plan, list(factor) if isinstance(factor, tuple) else factor)
    sel = select_refined(scores, plan, cand, q, k, token_slots)
    want = _refined_reference(scores, plan, q, k, token_slots, factor,
                              table.starts, table.lens)
    assert torch.equal(sel.blocks, want)
    assert bool((sel.counts <= torch.tensor(seq_lens).clamp(max=64)[:, None]).all())
    assert int(sel.counts[2].min()) == 40  # dense request: every position


def test_candidate_plan_rejects_factors_below_one_and_grows_capacity():
    table = _table([300], DynSplitConfig())
    plan = plan_selection(table, torch.tensor([300]), 64, 4, 16)
    cand = candidate_plan(plan, 2)
    assert int(cand.block_budget[0]) == 2 * int(plan.block_budget[0])
    assert cand.capacity == plan.capacity + int(plan.block_budget[0])
    assert candidate_plan(plan, 100).capacity == 300
    assert candidate_plan(plan, 2, capacity=500, max_block_len=20).capacity == 500
    assert torch.equal(candidate_plan(plan, [1.5]).block_budget,
                       candidate_plan(plan, torch.tensor([1.5])).block_budget)
    for bad in (0.5, -1, float("nan"), True, torch.tensor([0.5]), torch.tensor([2.0, 2.0]),
                [0.5], [2, 2], [True]):
        with pytest.raises(ValueError, match="refine factor"):
            candidate_plan(plan, bad)
