import pytest
import torch

from dynsplit_sglang.core import (
    dense_decode_attention, plan_selection, positions_to_slots, score_blocks, select,
    sparse_decode_attention,
)
from dynsplit_sglang.kernels import SparseDecodeWrapper
from dynsplit_sglang.kernels.native import load as native_lib
from kernel_cases import TOL, make_batch, rel_err

SINK, RECENT = 4, 32


def _core_pipeline(q, batch, budget, capacity=None):
    b = batch.to("cpu")
    scores = score_blocks(q.cpu(), b.center, b.radius, b.summary_index, b.l2)
    plan = plan_selection(b.table, b.seq_lens, budget, SINK, RECENT, capacity, max_block_len=20)
    sel = select(scores, plan)
    slots = positions_to_slots(sel.positions, b.token_slots)
    return sparse_decode_attention(q.cpu(), b.k, b.v, slots, return_lse=True), sel


def _wrapper(batch, q, budget, capacity=None):
    hq, hkv, dv = q.shape[1], batch.k.shape[1], batch.v.shape[2]
    w = SparseDecodeWrapper(hq, hkv, dv, device=q.device)
    plan = plan_selection(batch.table, batch.seq_lens, budget, SINK, RECENT, capacity,
                          max_block_len=20)
    w.plan(plan, batch.summary_index, batch.token_slots, batch.l2)
    return w


CASES = [  # (request lengths, KV heads, GQA ratio, head dim, budget, dtype)
    ([300, 17, 120], 3, 3, 64, 96, torch.float32),
    ([512, 64, 250, 480], 8, 1, 128, 128, torch.float16),
    ([64, 200, 33, 90, 150, 7, 260, 480], 1, 7, 64, 100, torch.float32),
    ([400, 260], 4, 8, 128, 200, torch.bfloat16),
]


@pytest.mark.parametrize("lens,hkv,g,d,budget,dtype", CASES)
@pytest.mark.parametrize("side", ["triton", "torch"])
def test_plan_run_equals_core_pipeline(lens, hkv, g, d, budget, dtype, side, device, monkeypatch):
    monkeypatch.setenv("DYNSPLIT_KERNELS", side)
    if side == "torch" and device != "cpu":
        pytest.skip("torch side is the CPU path")
    batch = make_batch(lens, hkv, d, dtype, "dynsplit", seed=budget, device=device,
                       spread=1.5)
    q = torch.randn(len(lens), hkv * g, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    q = q.to(device)
    w = _wrapper(batch, q, budget)
    out, lse = w.run(q, batch.k, batch.v, batch.center, batch.radius, return_lse=True)
    (ref, ref_lse), ref_sel = _core_pipeline(q, batch, budget)
    sel = w.last_selection
    assert torch.equal(sel.positions.cpu(), ref_sel.positions)
    assert torch.equal(w.tokens_attended().cpu(), ref_sel.counts)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref) < TOL[dtype]
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("side", ["triton", "torch"])
@pytest.mark.parametrize("hkv,g,d", [(3, 3, 64), (2, 8, 128)])
def test_budget_covering_the_context_is_dense_attention(side, hkv, g, d, device, monkeypatch):
    monkeypatch.setenv("DYNSPLIT_KERNELS", side)
    if side == "torch" and device != "cpu":
        pytest.skip("torch side is the CPU path")
    lens = [200, 37, 160]
    batch = make_batch(lens, hkv, d, torch.float32, "fixed", seed=g, device=device)
    q = torch.randn(3, hkv * g, d).to(device)
    w = _wrapper(batch, q, budget=256)
    out = w.run(q, batch.k, batch.v, batch.center, batch.radius)
    b = batch.to("cpu")
    ref = dense_decode_attention(q.cpu(), b.k, b.v, b.token_slots, b.seq_lens)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(w.tokens_attended().cpu(), b.seq_lens[:, None].expand(3, hkv))


def test_shapes_are_static_for_a_capacity(triton_side, device):
    q = torch.randn(2, 6, 64).to(device)
    shapes = set()
    for lens in ([300, 100], [120, 480]):
        batch = make_batch(lens, 2, 64, torch.float32, "dynsplit", seed=len(lens), device=device)
        w = _wrapper(batch, q, budget=96, capacity=128)
        out = w.run(q, batch.k, batch.v, batch.center, batch.radius)
        shapes.add((tuple(out.shape), tuple(w.last_selection.positions.shape), w.num_splits))
    assert len(shapes) == 1


class _Stub:
    """Stands in for a compiled kernel: accepts any launch, does nothing."""

    def __getitem__(self, grid):
        return lambda *a, **kw: None


@pytest.mark.parametrize("side", ["triton", "torch", "torch-ops"])
def test_run_never_synchronises_with_the_host(side, monkeypatch):
    """run() must be capturable: no .item()/.cpu()/.tolist()/bool(tensor)... anywhere in it.
    On the Triton side the kernels are stubbed (the interpreter itself copies to the host).
    torch: the CPU side's fused kernels; torch-ops: its torch formulation."""
    monkeypatch.setenv("DYNSPLIT_NATIVE", "0" if side == "torch-ops" else "1")
    side = "torch" if side == "torch-ops" else side
    monkeypatch.setenv("DYNSPLIT_KERNELS", side)
    batch = make_batch([300, 100], 2, 64, torch.float32, "dynsplit", seed=0)
    q = torch.randn(2, 6, 64)
    w = _wrapper(batch, q, budget=96)
    if side == "triton":
        from dynsplit_sglang.kernels import scoring, sparse_decode
        for mod, name in ((scoring, "_score_kernel"), (sparse_decode, "_split_kernel"),
                          (sparse_decode, "_merge_kernel")):
            monkeypatch.setattr(mod, name, _Stub())

    def boom(*a, **kw):
        raise AssertionError("host synchronisation inside run()")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                 "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    w.run(q, batch.k, batch.v, batch.center, batch.radius, return_lse=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_run_can_be_captured_in_a_cuda_graph():
    batch = make_batch([300, 100], 2, 64, torch.float16, "dynsplit", seed=0, device="cuda")
    q = torch.randn(2, 6, 64, device="cuda", dtype=torch.float16)
    w = _wrapper(batch, q, budget=96)
    ref = w.run(q, batch.k, batch.v, batch.center, batch.radius)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w.run(q, batch.k, batch.v, batch.center, batch.radius)
    q.copy_(torch.randn_like(q))
    graph.replay()
    fresh = w.run(q, batch.k, batch.v, batch.center, batch.radius)
    assert torch.equal(out, fresh) and not torch.equal(out, ref)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("per_request_norm", [False, True])
def test_cpu_planned_step_masks_evicted_slots_like_the_core(per_request_norm, fused,
                                                            monkeypatch):
    """The CPU side plans a step once (kernels.cpu.DecodeStep); with eviction some positions
    have no slot (-1): they must be masked as in the core pipeline, whatever list they are in.
    Also with a radius norm per request; with the fused kernels (kernels/native.c) and with
    torch ops."""
    monkeypatch.setenv("DYNSPLIT_KERNELS", "torch")
    monkeypatch.setenv("DYNSPLIT_NATIVE", "1" if fused else "0")
    lens, budget = [300, 180], 96
    b = make_batch(lens, 2, 64, torch.float32, "dynsplit", seed=5, device="cpu", spread=1.5)
    g = torch.Generator().manual_seed(3)
    evicted = (torch.rand(b.token_slots.shape, generator=g) < 0.3) & (
        torch.arange(b.token_slots.shape[1]) >= SINK)
    b.token_slots[evicted] = -1
    l2 = torch.tensor([True, False]) if per_request_norm else True
    q = torch.randn(2, 6, 64, generator=g)
    plan = plan_selection(b.table, b.seq_lens, budget, SINK, RECENT, max_block_len=20)
    w = SparseDecodeWrapper(6, 2, 64, device="cpu")
    w.plan(plan, b.summary_index, b.token_slots, l2)
    assert w._step is not None  # the planned path runs
    assert (w._step.native is not None) == (fused and native_lib() is not None)
    out, lse = w.run(q, b.k, b.v, b.center, b.radius, return_lse=True)
    ref_sel = select(score_blocks(q, b.center, b.radius, b.summary_index, l2), plan)
    slots = positions_to_slots(ref_sel.positions, b.token_slots)
    ref, ref_lse = sparse_decode_attention(q, b.k, b.v, slots, return_lse=True)
    assert torch.equal(w.last_selection.positions, ref_sel.positions)
    assert torch.equal(w.last_selection.blocks, ref_sel.blocks)
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("l2", [True, False, "per-request"])
def test_cpu_planned_step_reads_runs_of_summary_rows_in_place(l2, monkeypatch):
    """Blocks stored as runs of consecutive summary rows are scored from the summaries in place
    (kernels.cpu.summary_runs), in several chunks per run: the same selection and output as the
    core pipeline."""
    from dynsplit_sglang.kernels import cpu
    monkeypatch.setenv("DYNSPLIT_KERNELS", "torch")
    monkeypatch.setenv("DYNSPLIT_NATIVE", "0")  # the torch formulation (native.c reads rows
    monkeypatch.setattr(cpu, "MIN_RUN_BLOCKS", 4)  # through the index, runs or not)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1 << 14)  # 64-block chunks (the least)
    lens, budget = [3000, 900, 40], 300
    b = make_batch(lens, 2, 64, torch.float32, "dynsplit", seed=11, spread=1.5, runs=True)
    norm = torch.tensor([True, False, True]) if l2 == "per-request" else l2
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(2))
    plan = plan_selection(b.table, b.seq_lens, budget, SINK, RECENT, max_block_len=20)
    w = SparseDecodeWrapper(6, 2, 64, device="cpu")
    w.plan(plan, b.summary_index, b.token_slots, norm)
    assert [r[:2] for r in w._step.runs][:2] == [(0, 0), (0, int((b.table.lens[0] > 0).sum()) // 2)]
    assert len(w._step.runs) == 6 and max(r[3] for r in w._step.runs) > 64
    out, lse = w.run(q, b.k, b.v, b.center, b.radius, return_lse=True)
    ref_sel = select(score_blocks(q, b.center, b.radius, b.summary_index, norm), plan)
    ref, ref_lse = sparse_decode_attention(q, b.k, b.v, positions_to_slots(ref_sel.positions,
                                                                            b.token_slots),
                                           return_lse=True)
    assert torch.equal(w.last_selection.positions, ref_sel.positions)
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_summary_runs_finds_runs_or_declines():
    from dynsplit_sglang.kernels import cpu
    idx = torch.tensor([[5, 6, 7, -1, 9, 10, 3], [-1] * 7, [0, 1, 2, 3, 4, 5, 6]])
    assert cpu.summary_runs(idx) is None  # 4 runs of 13 blocks: gathering is cheaper
    long = torch.cat([torch.arange(100, 164), torch.arange(0, 64)])[None]
    assert cpu.summary_runs(long) == [(0, 0, 100, 64), (0, 64, 0, 64)]
    assert cpu.summary_runs(torch.full((2, 5), -1)) is None
