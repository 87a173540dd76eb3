"""The compressor's decode-graph path (runtime/graphs.py): captured once, replayed over changing
batches, it attends exactly like the eager path (simulated pool, no SGLang; GraphTape stands in
for CUDA-graph capture and replay on the CPU)."""

import math
import random

import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig
from dynsplit_sglang.runtime.compressor import BatchView
from dynsplit_sglang.runtime.graphs import GraphDecode

from .graph_tape import GraphTape
from .sim import D, HKV, HQ, LAYERS, VOCAB, SimPool, _feat

CFG = DynSplitConfig(budget=96, sink=4, recent=16, block_size=12, tolerance=4, future_window=8,
                     dense_layers=1, score_layers=0)
MAX_BS = 4


@pytest.fixture(autouse=True)
def core_kernels(monkeypatch):
    # On a GPU the graph runs the Triton kernels (capture-safe, tests/kernels); on the CPU the
    # core twins, the static-shape formulation those kernels are checked against.
    monkeypatch.setenv("DYNSPLIT_KERNELS", "twin")


def _tokens(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


def _decode_inputs(pool, rows, seqs):
    """One decode step's view and per-layer queries; writes the new tokens' K/V (what the
    attention layer does before attending)."""
    ids, locs, qs = [], [], [[] for _ in range(LAYERS)]
    for row, toks in zip(rows, seqs):
        p = len(toks) - 1
        slot = pool.alloc(1)
        pool.req_to_token[row, p] = slot[0]
        ids.append(toks[p])
        locs.append(int(slot[0]))
        t, pos = torch.tensor([toks[p]]), torch.tensor([p])
        for layer in range(LAYERS):
            pool.k[layer][slot.long()] = _feat(t, pos, layer, "k", HKV * D).view(-1, HKV, D)
            pool.v[layer][slot.long()] = _feat(t, pos, layer, "v", HKV * D).view(-1, HKV, D)
            qs[layer].append(_feat(t, pos, layer, "q", HQ * D).view(-1, HQ, D))
    view = BatchView(list(rows), [pool.gen[r] for r in rows], [len(s) for s in seqs],
                     [len(s) - 1 for s in seqs], torch.tensor(ids), torch.tensor(locs), True)
    return view, [torch.cat(q) for q in qs]


class Captured:
    """A GraphDecode captured for `bs` rows: static query inputs and outputs per layer."""

    def __init__(self, pool, bs):
        self.pool, self.bs = pool, bs
        self.graph = GraphDecode(pool.comp, MAX_BS)
        self.q = [torch.zeros(bs, HQ, D) for _ in range(LAYERS)]
        self.out = [torch.zeros(bs, HQ, D) for _ in range(LAYERS)]
        self.graph.capture(bs)
        self.tape = GraphTape()
        scale = 1 / math.sqrt(D)
        with torch.no_grad(), self.tape:
            for layer in range(LAYERS):
                o = self.graph.decode_layer(layer, self.q[layer], pool.k[layer], pool.v[layer],
                                            scale)
                if o is not None:
                    self.out[layer].copy_(o)

    def step(self, view, qs):
        n = len(view.rows)
        self.graph.replay(view, self.bs)
        for layer in range(LAYERS):
            self.q[layer].zero_()
            self.q[layer][:n].copy_(qs[layer])
        self.tape.replay()
        return [o[:n].clone() for o in self.out]


def _twin_pools(requests):
    pools = []
    for _ in range(2):
        pool = SimPool(CFG, slots=4096, rows=8, max_ctx=1024)
        for row, toks in requests.items():
            pool.new_row(row)
            pool.prefill(row, toks)
        pools.append(pool)
    return pools


def test_replays_attend_like_the_eager_path_while_batches_and_blocks_change():
    # Rows of 60 (dense: under the budget), 300 and 500 tokens; batches of 3, 2, 1 and 3 rows in
    # a graph captured for 4 (1-3 padding rows); 30 steps, so decode blocks freeze on the way.
    requests = {1: _tokens(60, 1), 2: _tokens(300, 2), 3: _tokens(500, 3), 5: _tokens(150, 5)}
    eager, graphed = _twin_pools(requests)
    cap = Captured(graphed, MAX_BS)
    assert cap.tape.violations == []
    seqs = {r: list(t) for r, t in requests.items()}
    batches = [[1, 2, 3], [2, 3], [3], [5, 1, 2]]
    scale = 1 / math.sqrt(D)
    for step in range(30):
        rows = batches[step % len(batches)]
        for r in rows:
            seqs[r].append((7 * step + r) % VOCAB)
        v_e, q_e = _decode_inputs(eager, rows, [seqs[r] for r in rows])
        v_g, q_g = _decode_inputs(graphed, rows, [seqs[r] for r in rows])
        assert cap.graph.fits(v_g.rows, v_g.seq_lens)
        eager.comp.begin_forward(v_e)
        want = [eager.comp.decode_layer(layer, q_e[layer], eager.k[layer], eager.v[layer], scale)
                for layer in range(LAYERS)]
        got = cap.step(v_g, q_g)
        for layer in range(CFG.dense_layers, LAYERS):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    assert graphed.blocks(3) == eager.blocks(3) and len(eager.blocks(3)) > 500 // 16
    # The device counters cover the real rows only (not the padding), like the eager ones.
    assert graphed.comp._attended.tolist() == eager.comp._attended.tolist()
    assert graphed.comp.stats["graph_steps"] == 30


def test_a_replay_reads_the_plan_written_in_place_not_the_captures():
    # The capture saw an all-padding batch; if a replay did not refresh the buffers in place,
    # the graph would attend to slot 0 only.
    requests = {1: _tokens(400, 11)}
    eager, graphed = _twin_pools(requests)
    cap = Captured(graphed, 2)
    seq = requests[1] + [3]
    v_g, q_g = _decode_inputs(graphed, [1], [seq])
    plan_ptrs = [t.data_ptr() for t in cap.graph.buf.values()]
    got = cap.step(v_g, q_g)
    assert [t.data_ptr() for t in cap.graph.buf.values()] == plan_ptrs
    v_e, q_e = _decode_inputs(eager, [1], [seq])
    eager.comp.begin_forward(v_e)
    want = eager.comp.decode_layer(1, q_e[1], eager.k[1], eager.v[1], 1 / math.sqrt(D))
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], torch.zeros_like(got[1]))


def test_batches_outside_the_captured_shapes_do_not_fit():
    pool = SimPool(CFG, slots=4096, rows=8, max_ctx=1024)
    graph = GraphDecode(pool.comp, MAX_BS)
    assert graph.capacity == CFG.budget and graph.max_block_len == 16
    pool.new_row(1)
    pool.prefill(1, _tokens(200, 1))
    assert graph.fits([1], [201])
    assert not graph.fits([1] * (MAX_BS + 1), [201] * (MAX_BS + 1))  # larger than captured
    bigger = CFG.replace(budget=200)  # a request whose budget exceeds the capacity
    pool.comp.rows[1].cfg = bigger
    assert not graph.fits([1], [201])
    pool.comp.rows[1].cfg = CFG.replace(block_size=24, tolerance=4)  # longer blocks
    assert not graph.fits([1], [201])
    frac = SimPool(CFG.replace(budget_fraction=0.25), slots=4096, rows=8, max_ctx=1024)
    assert GraphDecode(frac.comp, MAX_BS).capacity == 256  # a quarter of the longest context


def _with_configs(pool, configs):
    """Rows with their own settings (as a request's override gives them): {row: config}."""
    begin = pool.comp.begin_forward

    def with_configs(view, *args, **kwargs):
        view.configs = [configs.get(r) for r in view.rows]
        begin(view, *args, **kwargs)

    pool.comp.begin_forward = with_configs


def _pools_with_configs(configs, requests):
    """(eager, graphed, capture) over the same rows, each row with its own settings."""
    pools = []
    for _ in range(2):
        pool = SimPool(CFG, slots=4096, rows=8, max_ctx=1024)
        _with_configs(pool, configs)
        for row, toks in requests.items():
            pool.new_row(row)
            pool.prefill(row, toks)
        pools.append(pool)
    eager, graphed = pools
    cap = Captured(graphed, MAX_BS)
    assert cap.tape.violations == []
    return eager, graphed, cap


def _step_both(eager, graphed, cap, rows, seqs):
    """One decode step of `rows` on both pools: (graph outputs, eager outputs) per layer."""
    v_e, q_e = _decode_inputs(eager, rows, [seqs[r] for r in rows])
    v_g, q_g = _decode_inputs(graphed, rows, [seqs[r] for r in rows])
    eager.comp.begin_forward(v_e)
    scale = 1 / math.sqrt(D)
    want = [eager.comp.decode_layer(layer, q_e[layer], eager.k[layer], eager.v[layer], scale)
            for layer in range(LAYERS)]
    return cap.step(v_g, q_g), want


def test_rows_scored_their_own_way_replay_like_the_eager_path():
    # Row 2 asks for Quest's bound (box summaries, L1 radius), row 3 for a wider gauss spread:
    # the graph carries each row's radius norm in a persistent buffer, refreshed per replay.
    configs = {2: CFG.replace(score="bound"), 3: CFG.replace(spread=3.0)}
    requests = {1: _tokens(300, 21), 2: _tokens(420, 22), 3: _tokens(360, 23)}
    eager, graphed, cap = _pools_with_configs(configs, requests)
    l2_ptr = cap.graph.l2.data_ptr()
    seqs = {r: list(t) for r, t in requests.items()}
    for step, rows in enumerate([[1, 2, 3], [2, 3], [3, 2, 1], [2]] * 3):
        for r in rows:
            seqs[r].append((5 * step + r) % VOCAB)
        got, want = _step_both(eager, graphed, cap, rows, seqs)
        assert cap.graph.l2[:len(rows)].tolist() == [r != 2 for r in rows]
        for layer in range(CFG.dense_layers, LAYERS):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    assert cap.graph.l2.data_ptr() == l2_ptr  # written in place, never replaced
    # The replay reads the buffer: row 2 (bound) scored with the L2 radius attends otherwise.
    cap.graph.l2[0] = True
    cap.tape.replay()
    wrong = [o[:1].clone() for o in cap.out]
    assert any(not torch.allclose(wrong[layer], want[layer], rtol=1e-5, atol=1e-5)
               for layer in range(CFG.dense_layers, LAYERS))


def test_rows_refined_their_own_way_replay_like_the_eager_path():
    # Two-stage selection: the server's refine (2) sizes the candidate plan's capacity; row 2
    # asks for the score alone (refine 1); each row's candidate budget is written in place per
    # replay. A row asking for more than the server's factor does not fit the captured shapes.
    assert CFG.refine == 2
    configs = {2: CFG.replace(refine=1)}
    requests = {1: _tokens(300, 31), 2: _tokens(420, 32), 3: _tokens(360, 33)}
    eager, graphed, cap = _pools_with_configs(configs, requests)
    assert cap.graph.cand_capacity == min(cap.graph.width, 2 * cap.graph.capacity)
    budget_ptr = cap.graph.cand_budget.data_ptr()
    seqs = {r: list(t) for r, t in requests.items()}
    for step, rows in enumerate([[1, 2, 3], [2, 3], [3, 2, 1]] * 3):
        for r in rows:
            seqs[r].append((3 * step + r) % VOCAB)
        got, want = _step_both(eager, graphed, cap, rows, seqs)
        plain = cap.graph.buf["block_budget"][:len(rows)].tolist()
        assert cap.graph.cand_budget[:len(rows)].tolist() == [
            b if r == 2 else 2 * b for r, b in zip(rows, plain)]
        for layer in range(CFG.dense_layers, LAYERS):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    assert cap.graph.cand_budget.data_ptr() == budget_ptr
    assert eager.comp.stats["refined_steps"] > 0
    graphed.comp.rows[1].cfg = CFG.replace(refine=3)
    assert not cap.graph.fits([1], [len(seqs[1])])
