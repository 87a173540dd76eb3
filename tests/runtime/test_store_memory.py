"""The block store's size, its reservation in the KV budget, and what happens when it runs short
(simulated pool, no SGLang)."""

import logging
import random

import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig
from dynsplit_sglang.patches.memory import tokens_with_store
from dynsplit_sglang.runtime.store import StoreGeometry

from .sim import D, HKV, LAYERS, VOCAB, SimPool


def _tokens(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


CFG = DynSplitConfig(budget=96, sink=4, recent=16, block_size=12, tolerance=4, future_window=8,
                     dense_layers=1, score_layers=0)


@pytest.mark.parametrize("cfg,dtype", [
    (CFG, torch.float32),
    (CFG.replace(dense_layers=0, future_window=16, block_size=16), torch.float16),
    (CFG.replace(evict=True), torch.bfloat16),
])
def test_geometry_counts_exactly_what_the_store_allocates(cfg, dtype):
    pool = SimPool(cfg.replace(evict=False), slots=3000, rows=5, max_ctx=1000)
    from dynsplit_sglang.runtime.compressor import Compressor

    from .sim import HQ, vocab_masks
    comp = Compressor(cfg, LAYERS, HQ, HKV, D, dtype, "cpu", 3000, 5, 1000, pool.req_to_token,
                      lambda l: pool.k[l], vocab_masks(), free_slots=lambda s: None)
    token = comp.blocks.token  # the row blocks' token id per slot
    allocated = comp.store.nbytes + token.numel() * token.element_size()
    size = torch.empty(0, dtype=dtype).element_size()
    g = StoreGeometry.for_pool(cfg, LAYERS, HKV, D, size, 3000, 5, 1000)
    assert comp.geometry == g and g.nbytes == allocated == comp.store_bytes
    # Per slot: its votes and bookkeeping, plus two entries per shortest block, each with the
    # summary (center and radius, one K row each) of every compressed layer.
    lc = LAYERS - cfg.dense_layers
    assert g.entry_bytes == 48 + 2 * lc * HKV * D * size
    assert g.max_entries == 2 * (3000 // (cfg.block_size - cfg.tolerance)) + 8 * 5 + 64


@pytest.mark.parametrize("dense,cell,page", [(8192, 2048, 1), (100_000, 23_040, 1),
                                             (5000, 4096, 16), (40, 1000, 1)])
def test_tokens_with_store_fit_the_dense_budget_and_are_the_most_that_do(dense, cell, page):
    def store(t):
        return StoreGeometry.for_pool(CFG, 30, 3, 64, 2, t + page, 9, 8196).nbytes

    t = tokens_with_store(dense, cell, page, store)
    assert t % page == 0 and 0 <= t < dense
    if t == 0:  # not even one page fits next to the store: the hook refuses to start
        assert page * cell + store(page) > dense * cell
        return
    assert t * cell + store(t) <= dense * cell
    if t + page <= dense:
        assert (t + page) * cell + store(t + page) > dense * cell


def _per_row_configs(pool, configs):
    """Requests with their own settings (as an override would give them): {row: config}."""
    begin = pool.comp.begin_forward

    def with_configs(view):
        view.configs = [configs.get(r) for r in view.rows]
        begin(view)

    pool.comp.begin_forward = with_configs


def test_a_reused_row_never_shows_its_previous_requests_blocks():
    # Row 1 first serves a long dynsplit request, then one with blocks twice as long (fewer
    # entries in its table) that decodes next to a long row 2: the batch's block table is as
    # wide as row 2's, and row 1 must attend as if alone.
    long_a, short, long_b = _tokens(600, 1), _tokens(200, 2), _tokens(420, 3)
    coarse = CFG.replace(strategy="fixed", block_size=24)
    pool = SimPool(CFG)
    pool.new_row(1)
    pool.prefill(1, long_a)
    pool.decode([1], [long_a + [5]])
    _per_row_configs(pool, {1: coarse})
    pool.new_row(1)
    pool.prefill(1, short)
    pool.new_row(2)
    pool.prefill(2, long_b)
    together = pool.decode([1, 2], [short + [7], long_b + [9]])
    alone = SimPool(CFG)
    _per_row_configs(alone, {1: coarse})
    alone.new_row(1)
    alone.prefill(1, short)
    ref = alone.decode([1], [short + [7]])
    assert pool.comp.rows[1].nblocks < pool.comp.rows[2].nblocks
    for got, want in zip(together[1:], ref[1:]):  # layer 0 is dense
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def _with_allocator(pool, live):
    """Give the compressor's row blocks the allocator's and the request pool's views, as
    batch.py does."""
    pool.comp.blocks.free_slot_ids = lambda: torch.tensor(pool.free, dtype=torch.int64)
    pool.comp.blocks.live_rows = lambda: set(live)


def _free_row(pool, row, n):
    pool.free.extend(pool.req_to_token[row, :n].tolist()[::-1])


def test_blocks_at_freed_slots_and_of_freed_rows_are_reclaimed_first():
    # Room for 2*(2048//8) + 8*3 + 64 = 600 entries. A finished (row and slots freed); C is a
    # cached prompt whose slots are still held; B needs entries when only 5 are left.
    pool = SimPool(CFG, slots=2048, rows=3, max_ctx=1024)
    live = {0, 2}
    _with_allocator(pool, live)
    a, c = _tokens(700, 1), _tokens(300, 3)
    for row, toks in ((0, a), (2, c)):
        pool.new_row(row)
        pool.prefill(row, toks)
        pool.decode([row], [toks + [1]])
    store = pool.comp.store
    a_slots, c_slots = pool.req_to_token[0, :701].long(), pool.req_to_token[2, :301].long()
    c_blocks = int((store.end_entry[c_slots] >= 0).sum())
    live.discard(0)
    live.discard(2)  # C's request finished too, but its slots stay (the radix tree holds them)
    pool.free[:0] = a_slots.tolist()  # to the back of the allocator's queue: not rewritten yet
    assert int((store.end_entry[a_slots] >= 0).sum()) > 40
    store.alloc_entries(len(store.free_entries) - 5)
    live.add(1)
    pool.new_row(1)
    b = _tokens(200, 2)
    pool.prefill(1, b)
    pool.decode([1], [b + [1]])
    st = pool.comp.stats
    assert st["fallback_rows"] == 0 and st["entries_reclaimed"] > 40
    assert int((store.end_entry[a_slots] >= 0).sum()) == 0
    assert int((store.end_entry[c_slots] >= 0).sum()) == c_blocks  # idle, but not needed
    assert 0 not in pool.comp.rows  # the freed row's state went with its entries


def test_idle_cached_blocks_give_way_to_live_requests_latest_first():
    # A cached prompt (its request finished, its slots still in the tree) fills most of the
    # store; a new live request needs room: the cached prompt's last blocks go first.
    pool = SimPool(CFG, slots=2048, rows=2, max_ctx=1536)
    live = {0}
    _with_allocator(pool, live)
    cached = _tokens(1200, 7)
    pool.new_row(0)
    pool.prefill(0, cached)
    pool.decode([0], [cached + [1]])
    first_blocks = pool.blocks(0)[:10]
    live.discard(0)
    store = pool.comp.store
    store.alloc_entries(len(store.free_entries) - 5)  # the rest of the store is taken
    live.add(1)
    pool.new_row(1)
    new = _tokens(120, 8)
    pool.prefill(1, new)
    assert pool.comp.stats["fallback_rows"] == 0 and pool.comp.stats["entries_reclaimed"] > 0
    slots0 = pool.req_to_token[0, :1201].long()
    still = [(int(store.e_start[e]), int(store.e_len[e]))
             for e in store.end_entry[slots0].tolist() if e >= 0]
    assert set(first_blocks) <= set(still)  # the chain from position 0 is kept


def test_live_demand_beyond_the_store_falls_back_counted_and_logged(caplog):
    # Fifteen live requests each split a 1000-token shared prompt their own way (another
    # strategy): ~80 private blocks each, 1200 in all, for a store of 2*(2048//8)+8*16+64 = 704.
    pool = SimPool(CFG, slots=2048, rows=16, max_ctx=2048)
    live = set(range(16))
    _with_allocator(pool, live)
    prompt = _tokens(1000, 11)
    pool.new_row(0)
    pool.prefill(0, prompt + [3])
    _per_row_configs(pool, {r: CFG.replace(strategy="fixed") for r in range(1, 16)})
    with caplog.at_level(logging.WARNING, logger="dynsplit_sglang"):
        for r in range(1, 16):
            pool.new_row(r)
            pool.prefill(r, prompt + [r], 1000, pool.req_to_token[0])
    st = pool.comp.stats
    assert st["fallback_rows"] == st["fallback_rows_store"] > 0
    assert sum(1 for r in range(1, 16) if pool.comp.rows[r].fallback) == st["fallback_rows"]
    warned = [m for m in caplog.messages if "attends densely" in m]
    assert warned and "fallback_rows_store" in warned[0]
    # A row that fell back attends to every position: its decode equals dense attention.
    row = next(r for r in range(1, 16) if pool.comp.rows[r].fallback)
    assert all(o is None for o in pool.decode([row], [prompt + [row, 4]]))


def test_a_row_table_overflow_falls_back_counted():
    # A conversation of many short turns: each closes its prompt with a short tail block, so
    # the row holds more blocks than its context over the shortest block (+4).
    cfg = CFG.replace(budget=40, recent=8)
    pool = SimPool(cfg, slots=4096, rows=4, max_ctx=96)  # 96 // 8 + 4 = 16 blocks per row
    seq = _tokens(9, 20)
    for turn in range(20):
        row = turn % 2
        pool.new_row(row)
        prev = turn and (turn - 1) % 2
        shared = len(seq) - 3 if turn else 0
        if shared:
            pool.req_to_token[row, :shared] = pool.req_to_token[prev, :shared]
        pool.prefill(row, seq, shared, pool.req_to_token[row] if shared else None)
        seq = seq + [turn % VOCAB]
        pool.decode([row], [seq])
        if pool.comp.rows[row].fallback or len(seq) + 6 > 96:
            break
        seq = seq + _tokens(2, 40 + turn)
    st = pool.comp.stats
    assert st["fallback_rows"] == st["fallback_rows_table"] >= 1
