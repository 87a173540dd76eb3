"""The wrapper with a plan kept in persistent buffers (``plan_static``, ``reserve``): what a
captured decode graph runs (runtime/graphs.py). Refreshed in place for another batch, the
per-request radius norm (l2) included, it gives what a fresh plan gives; on a GPU, a captured
graph replays it (bf16 included)."""

import pytest
import torch

from dynsplit_sglang.core import BlockTable, plan_selection
from dynsplit_sglang.core.selection import SelectionPlan
from dynsplit_sglang.kernels import SparseDecodeWrapper
from kernel_cases import TOL, make_batch, rel_err

SINK, RECENT, BUDGET, CAP, MAX_LEN = 4, 32, 96, 128, 20
NB, WIDTH, POOL, ENTRIES = 64, 512, 4096, 512
FIELDS = ("clip_start", "clip_len", "seq_lens", "recent_start", "block_budget", "dense")


class Static:
    """Persistent inputs of one captured batch size: the plan, the pools, the query."""

    def __init__(self, bs, hkv, g, d, dtype, device):
        i64 = {"dtype": torch.int64, "device": device}
        self.bs = bs
        self.plan = SelectionPlan(
            **{f: torch.zeros(bs, NB, **i64) for f in FIELDS[:2]},
            **{f: torch.zeros(bs, **i64) for f in FIELDS[2:5]},
            dense=torch.ones(bs, dtype=torch.bool, device=device),
            sink=SINK, capacity=CAP, max_clip_len=MAX_LEN)
        self.index = torch.full((bs, NB), -1, **i64)
        self.slots = torch.zeros(bs, WIDTH, **i64)
        self.l2 = torch.zeros(bs, dtype=torch.bool, device=device)
        z = {"dtype": dtype, "device": device}
        self.k, self.v = torch.zeros(POOL, hkv, d, **z), torch.zeros(POOL, hkv, d, **z)
        self.center = torch.zeros(ENTRIES, hkv, d, **z)
        self.radius = torch.zeros(ENTRIES, hkv, d, **z)
        self.q = torch.zeros(bs, hkv * g, d, **z)

    def load(self, batch, q, l2):
        """Write this batch into the buffers in place (what a replay's host side does)."""
        b, nb = batch.table.starts.shape
        starts = torch.zeros(self.bs, NB, dtype=torch.int32, device=q.device)
        lens = torch.zeros_like(starts)
        starts[:, :nb], lens[:, :nb] = batch.table.starts, batch.table.lens
        fresh = plan_selection(BlockTable(starts, lens), batch.seq_lens, BUDGET, SINK, RECENT,
                               CAP, MAX_LEN)
        for f in FIELDS:
            getattr(self.plan, f).copy_(getattr(fresh, f))
        self.index.fill_(-1)
        self.index[:, :nb] = batch.summary_index
        self.slots.zero_()
        self.slots[:, : batch.token_slots.shape[1]] = batch.token_slots
        self.l2.copy_(l2)
        for buf, src in ((self.k, batch.k), (self.v, batch.v), (self.center, batch.center),
                         (self.radius, batch.radius)):
            buf.zero_()
            buf[: src.shape[0]] = src
        self.q.copy_(q)


def _batches(hkv, d, dtype, device):
    """Gauss summaries scored with L2, box summaries with L1, then rows of each norm together."""
    out = []
    for seed, lens, spread, l2 in ((1, [300, 100, 460], 1.5, [True] * 3),
                                   (2, [90, 480, 220], None, [False] * 3),
                                   (3, [400, 250, 330], 1.5, [True, False, True])):
        batch = make_batch(lens, hkv, d, dtype, "dynsplit", seed=seed, device=device,
                           spread=spread)
        q = torch.randn(3, hkv * 3, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
        out.append((batch, q.to(device), torch.tensor(l2, device=device)))
    return out


def _fresh(batch, q, l2):
    w = SparseDecodeWrapper(q.shape[1], batch.k.shape[1], batch.v.shape[2], device=q.device)
    plan = plan_selection(batch.table, batch.seq_lens, BUDGET, SINK, RECENT, capacity=CAP,
                          max_block_len=MAX_LEN)
    w.plan(plan, batch.summary_index, batch.token_slots, l2)
    return w.run(q, batch.k, batch.v, batch.center, batch.radius), w.tokens_attended()


@pytest.mark.parametrize("side", ["triton", "twin"])
def test_a_plan_refreshed_in_place_equals_a_fresh_plan(side, device, monkeypatch):
    monkeypatch.setenv("DYNSPLIT_KERNELS", side)
    if side == "twin" and device != "cpu":
        pytest.skip("the twin is the CPU reference")
    st = Static(3, 2, 3, 64, torch.float32, device)
    w = SparseDecodeWrapper(6, 2, 64, device=device)
    w.reserve(8, device)
    buffer = w._buffer
    w.plan_static(st.plan, st.index, st.slots, st.l2)
    flipped_differs = []
    for batch, q, l2 in _batches(2, 64, torch.float32, device):
        st.load(batch, q, l2)
        out = w.run(st.q, st.k, st.v, st.center, st.radius)
        want, counts = _fresh(batch, q, l2)
        assert rel_err(out, want) < 1e-5
        assert torch.equal(w.tokens_attended(), counts)
        # The norm is read from the buffer at run time, like the rest of the plan.
        st.l2.copy_(~l2)
        other = w.run(st.q, st.k, st.v, st.center, st.radius)
        assert rel_err(other, _fresh(batch, q, ~l2)[0]) < 1e-5
        flipped_differs.append(not torch.equal(other, out))
    assert any(flipped_differs)  # the norm matters for these batches: the check can fail
    assert w._buffer is buffer  # the workspace a graph would have captured never moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_captured_run_follows_the_plan_refreshed_in_place(dtype):
    st = Static(3, 2, 3, 64, dtype, "cuda")
    (first, q1, l1), (second, q2, l2), (mixed, q3, l3) = _batches(2, 64, dtype, "cuda")
    w = SparseDecodeWrapper(6, 2, 64, device="cuda")
    w.reserve(8, "cuda")
    w.plan_static(st.plan, st.index, st.slots, st.l2)
    st.load(first, q1, l1)
    w.run(st.q, st.k, st.v, st.center, st.radius)  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w.run(st.q, st.k, st.v, st.center, st.radius)
    for batch, q, l2 in ((second, q2, l2), (mixed, q3, l3), (first, q1, l1)):
        st.load(batch, q, l2)
        graph.replay()
        want, _ = _fresh(batch, q, l2)
        assert rel_err(out, want) < TOL[dtype]
