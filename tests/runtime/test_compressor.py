import dataclasses
import random

import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig

from .sim import VOCAB, SimPool


def _tokens(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


CFG = DynSplitConfig(budget=96, sink=4, recent=16, block_size=12, tolerance=4, future_window=8,
                     dense_layers=1, score_layers=0)


def test_every_shared_block_is_built_once_for_many_requests():
    prefix = _tokens(400, 3)
    pool = SimPool(CFG)
    pool.new_row(0)
    pool.prefill(0, prefix + _tokens(20, 4))
    after_first = pool.comp.stats["blocks_built"]
    for r in range(1, 9):
        pool.new_row(r)
        pool.prefill(r, prefix + _tokens(20, 10 + r), 400, pool.req_to_token[0])
    per_request = (pool.comp.stats["blocks_built"] - after_first) / 8
    assert per_request <= 4  # only the blocks past the prefix (+ the look-ahead tail)
    assert pool.comp.stats["blocks_reused"] >= 8 * (after_first - 4)


def test_budget_above_context_stays_dense_and_below_attends_at_most_budget():
    pool = SimPool(CFG.replace(budget=500))
    pool.new_row(0)
    toks = _tokens(300, 5)
    pool.prefill(0, toks)
    assert all(o is None for o in pool.decode([0], [toks + [1]]))
    pool = SimPool(CFG)
    pool.new_row(0)
    pool.prefill(0, toks)
    outs = pool.decode([0], [toks + [1]])
    assert outs[0] is None and all(o is not None for o in outs[1:])  # first layer dense
    st = pool.comp.counters()
    layers = len(outs) - 1
    assert st["tokens_attended"] <= CFG.budget * 2 * layers  # 2 KV heads
    assert st["tokens_dense"] == 301 * 2 * layers


def test_slot_reuse_invalidates_registered_blocks():
    pool = SimPool(CFG)
    pool.new_row(0)
    toks = _tokens(200, 6)
    pool.prefill(0, toks)
    pool.decode([0], [toks + [1]])
    st = pool.comp.store
    registered = int((st.end_entry >= 0).sum())
    assert registered > 5
    slots = pool.req_to_token[0, :201].long()
    pool.free.extend(slots.tolist()[::-1])  # the request finished, its slots were freed
    pool.new_row(0)
    pool.prefill(0, _tokens(250, 7))  # the new request is written into the same slots
    assert int((st.end_entry[slots] >= 0).sum()) <= len(pool.blocks(0))
    for e in st.end_entry[slots][st.end_entry[slots] >= 0].tolist():
        assert int(st.e_start[e]) < 250  # every surviving entry belongs to the new request


def test_decode_tokens_are_frozen_into_fixed_blocks_and_reused_next_turn():
    pool = SimPool(CFG)
    pool.new_row(0)
    toks = _tokens(150, 8)
    pool.prefill(0, toks)
    seq = list(toks)
    for step in range(40):
        seq = seq + [step % VOCAB]
        pool.decode([0], [seq])
    n_prompt_blocks = sum(1 for s, n in pool.blocks(0) if s < 150)
    decode_blocks = [(s, n) for s, n in pool.blocks(0) if s >= 150]
    assert decode_blocks and all(n == CFG.block_size for _, n in decode_blocks)
    # Next turn: the whole conversation is a radix hit; decode blocks are adopted.
    pool.new_row(1)
    turn2 = seq + _tokens(30, 9)
    pool.prefill(1, turn2, shared_len=len(seq) - 1, shared_slots=pool.req_to_token[0])
    adopted = pool.blocks(1)[: pool.comp.stats["blocks_reused"]]
    assert any(s >= 150 for s, _ in adopted)
    assert len(adopted) >= n_prompt_blocks - 2


@pytest.mark.parametrize("chunks", [[300], [100, 300], [37, 150, 300]])
def test_chunked_prefill_splits_like_one_shot(chunks):
    toks = _tokens(300, 12)
    pool = SimPool(CFG)
    pool.new_row(0)
    start = 0
    for end in chunks:  # each chunk extends the row's own earlier chunks
        pool._forward([0], [toks[:end]], [start], decode=False)
        start = end
    pool.decode([0], [toks + [3]])
    ref = SimPool(CFG)
    ref.new_row(0)
    ref.prefill(0, toks)
    ref.decode([0], [toks + [3]])
    assert pool.blocks(0) == ref.blocks(0)
    assert pool.comp.stats["blocks_reused"] == 0  # own chunks are not a shared prefix


def test_min_sparse_len_decodes_short_contexts_densely():
    """Below min_sparse_len a decode step is dense (SGLang's own attention runs), above it the
    same request compresses; the token budget (what eviction keeps) ignores it."""
    toks = [7 + (i % 50) for i in range(300)]
    cfg = dataclasses.replace(CFG, min_sparse_len=302)
    assert cfg.token_budget(301) == CFG.token_budget(301) < 301 == cfg.decode_budget(301)
    pool = SimPool(cfg)
    pool.new_row(0)
    pool.prefill(0, toks)
    outs = pool.decode([0], [toks + [1]])  # context 301 < 302: dense
    assert all(o is None for o in outs)
    assert pool.comp.stats["dense_steps"] == 1 and pool.comp.stats["sparse_steps"] == 0
    outs = pool.decode([0], [toks + [1, 2]])  # 302: compressed
    assert outs[0] is None and all(o is not None for o in outs[1:])
    assert pool.comp.stats["sparse_steps"] == 1


def test_each_forward_reports_its_counters_once():
    """The reporter gets one snapshot per forward: a sparse decode step reports after its last
    layer (with the tokens it attended), a dense one and an extend when they end."""
    pool = SimPool(CFG)
    calls = []
    report = pool.comp.reporter.report
    pool.comp.reporter.report = lambda stats, dev=None: (calls.append(dict(stats)),
                                                        report(stats, dev))
    pool.new_row(0)
    toks = _tokens(300, 6)
    pool.prefill(0, toks)
    calls.clear()
    pool.decode([0], [toks + [1]])  # sparse: budget 96 < 301
    assert len(calls) == 1 and calls[0]["sparse_layer_steps"] > 0
    dense = SimPool(CFG.replace(budget=500))
    dense.comp.reporter.report = lambda stats, dev=None: calls.append(dict(stats))
    dense.new_row(0)
    dense.prefill(0, toks)
    calls.clear()
    dense.decode([0], [toks + [1]])
    assert len(calls) == 1 and calls[0]["dense_steps"] == 1
