"""The kernel benchmark's vectorised ragged selection (benchmarks/kernels/run.py) is the baseline of
the uniform-vs-ragged comparison: it must select exactly what the uniform path
(SparseDecodeWrapper.select) and the naive Python loop select, per request and KV head."""

import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest
import torch

from dynsplit_sglang.core import plan_selection
from dynsplit_sglang.kernels import SparseDecodeWrapper

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = spec_from_file_location("kernels_bench_run", REPO / "benchmarks" / "kernels" / "run.py")
    mod = module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def uniform_lists(bench, case, budget):
    w = SparseDecodeWrapper(case.hq, case.hkv, case.d, device="cpu", backend="torch")
    w.plan(plan_selection(case.table, case.seq_lens, budget, bench.SINK, bench.RECENT,
                          max_block_len=bench.CFG.max_block_len), case.index, case.token_slots,
           bench.L2)
    sel = w.select(case.q, case.center, case.radius)
    scores = w.kernels.score_blocks(case.q, case.center, case.radius, case.index, bench.L2)
    lists = [[sel.positions[b, h, :int(sel.counts[b, h])].tolist() for h in range(case.hkv)]
             for b in range(case.batch)]
    return lists, scores


@pytest.mark.parametrize("batch,ctx,heads,budget_div,seed", [
    (1, 700, (8, 2, 32), 4, 0),
    (3, 2400, (9, 3, 64), 16, 1),
    (4, 513, (4, 4, 16), 2, 2),
    (2, 2000, (32, 8, 32), 8, 3),
])
def test_ragged_selects_what_uniform_and_the_loop_select(bench, batch, ctx, heads, budget_div,
                                                         seed):
    hq, hkv, d = heads
    case = bench.make_case(batch, ctx, hq, hkv, d, torch.float32, "cpu", seed=seed)
    budget = ctx // budget_div
    assert budget > bench.SINK + bench.RECENT + 3 * bench.CFG.max_block_len  # blocks get kept
    uniform, uscores = uniform_lists(bench, case, budget)
    plan = bench.plan_ragged(case.ends, [ctx] * batch, budget, bench.SINK, bench.RECENT)

    # Same scores in: the same positions in the same order (sink, recent, blocks by score).
    stacked = torch.empty(hkv, case.num_blocks)
    for b in range(batch):
        n = case.offsets[b + 1] - case.offsets[b]
        stacked[:, case.offsets[b]:case.offsets[b + 1]] = uscores[b, :, :n]
    pos, counts = bench.ragged_select_from_scores(stacked, plan)
    assert bench.ragged_lists(pos, counts) == uniform

    # End to end (own scores, computed differently): the same positions per (request, KV head).
    ragged = bench.ragged_lists(*bench.ragged_select(case.q, case.center, case.radius, plan))
    loop = bench.ragged_loop_fn(case, budget)()
    for b in range(batch):
        for h in range(hkv):
            assert sorted(ragged[b][h]) == sorted(uniform[b][h]) == sorted(loop[b][h])
            assert len(set(ragged[b][h])) == len(ragged[b][h]) <= budget


def test_ragged_runs_dense_requests_dense(bench):
    case = bench.make_case(2, 300, 4, 2, 16, torch.float32, "cpu", seed=4)
    plan = bench.plan_ragged(case.ends, [300, 300], 512, bench.SINK, bench.RECENT)
    lists = bench.ragged_lists(*bench.ragged_select(case.q, case.center, case.radius, plan))
    assert lists == [[list(range(300))] * 2] * 2
    assert lists == uniform_lists(bench, case, 512)[0]


def test_ideal_counts_one_token_of_kv_per_block(bench):
    assert bench.ideal_speedup(32768, 2048, 16.0) == pytest.approx(8.0)
