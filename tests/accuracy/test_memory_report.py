"""The memory benchmark's accuracy bookkeeping (benchmarks/memory run.py: records, accuracy
table, paired statistics against the peers) and its README section's target lines, on rows and
records whose answers are known."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"memory_{name}",
                                                  ROOT / "benchmarks" / "memory" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run, report = _load("run"), _load("report")
MODEL = "smollm2-135m-instruct"


def _row(method, budget, scores, peak=4104, kept=4104):
    return dict(model=MODEL, method=method, budget=budget, context_len=4096,
                peak_kv_slots_per_request=peak, kv_slots_after_prefill=kept,
                max_concurrent_requests=2, offered_requests=4, retractions=0,
                accuracy_records=[dict(sample=f"s{i}", task="passkey", context_len=2048,
                                       score=x) for i, x in enumerate(scores)])


def _peer(method, budget, scores):
    return [dict(model=MODEL, method=method, budget=budget, sample=f"s{i}", score=x)
            for i, x in enumerate(scores)]


def test_accuracy_table_and_pairs_are_per_sample():
    rows = [_row("none", 1.0, [1, 1, 1, 0]), _row("dynsplit-evict", 0.25, [1, 1, 0, 0])]
    peers = _peer("kvpress-chunkkv", 0.25, [1, 0, 0, 0]) + _peer("kvpress-snapkv", 0.125, [0] * 4)
    recs = run.records(rows, peers)
    table = {(t["method"], t["budget"]): (t["accuracy"], t["n"])
             for t in run.accuracy_table(recs, [0.25])}
    assert table == {("none", 1.0): (75.0, 4), ("dynsplit-evict", 0.25): (50.0, 4),
                     ("kvpress-chunkkv", 0.25): (25.0, 4), ("kvpress-snapkv", 0.125): (0.0, 4)}
    pairs = {p["b"]: p for p in run.paired(recs, [0.25], MODEL)}
    # Against a peer at the same budget (one sample won), and against full KV (one lost); a
    # peer measured at another budget is no pair.
    assert (pairs["kvpress-chunkkv"]["mean"], pairs["kvpress-chunkkv"]["wins"]) == (25.0, 1)
    assert (pairs["none"]["mean"], pairs["none"]["losses"]) == (-25.0, 1)
    assert "kvpress-snapkv" not in pairs


def test_section_says_met_and_missed_from_the_numbers():
    rows = [_row("none", 1.0, [1, 1, 1, 1]),
            dict(_row("dynsplit-evict", 0.25, [1, 1, 1, 0], peak=4097, kept=1026),
                 peak_reduction_vs_full=1.0),
            dict(_row("dynsplit-evict", 0.125, [1, 0, 0, 0], peak=1000, kept=513),
                 peak_reduction_vs_full=4.1),
            dict(_row("dynsplit-evict-hold", 0.25, [1, 1, 0, 0], peak=1400, kept=1020),
                 peak_reduction_vs_full=2.93)]
    rows[0]["peak_reduction_vs_full"] = 1.0
    peers = _peer("kvpress-chunkkv", 0.25, [1, 1, 0, 0]) + _peer("kvpress-snapkv", 0.125,
                                                                  [1, 1, 0, 0])
    recs = run.records(rows, peers)
    data = dict(meta=dict(date="d", machine={"cpus": 2}, command="c", wall_s=60,
                          max_total_tokens=12288, chunked_prefill=512,
                          accuracy=dict(tasks=["passkey"], contexts=[2048], n=4),
                          targets={"0.25": 2.6, "0.125": 4.0}),
                rows=rows, accuracy=run.accuracy_table(recs, [0.25, 0.125]),
                paired=run.paired(recs, [0.25, 0.125], MODEL))
    text = report.section(data, "x.png")
    assert "- dynsplit-evict: peak slots ≥ 2.6x fewer at 1/4: **missed** (1.00x at 4096)." in text
    assert "- dynsplit-evict: peak slots ≥ 4.0x fewer at 1/8: **met** (4.10x at 4096)." in text
    assert ("- dynsplit-evict: accuracy ≥ the best of SnapKV / ChunkKV at 1/4 kept: **met** "
            "(75.0 vs kvpress-chunkkv 50.0).") in text
    assert ("- dynsplit-evict: accuracy ≥ the best of SnapKV / ChunkKV at 1/8 kept: **missed** "
            "(25.0 vs kvpress-snapkv 50.0).") in text
    # Each eviction is held to the targets on its own row, and paired on its own samples.
    assert "- dynsplit-evict-hold: peak slots ≥ 2.6x fewer at 1/4: **met** (2.93x at 4096)." in text
    assert ("- dynsplit-evict-hold: accuracy ≥ the best of SnapKV / ChunkKV at 1/4 kept: **met** "
            "(50.0 vs kvpress-chunkkv 50.0).") in text
    assert "dynsplit-evict-hold: peak slots ≥ 4.0x" not in text  # no 1/8 row measured
    pairs = {(p["a"], p["b"], p["budget"]): p for p in data["paired"]}
    hold = pairs[("dynsplit-evict-hold", "kvpress-chunkkv", 0.25)]
    assert (hold["n"], hold["mean"], hold["wins"], hold["losses"]) == (4, 0.0, 0, 0)
    # What holding the prompt costs: against the eviction decided by the question alone.
    cost = pairs[("dynsplit-evict-hold", "dynsplit-evict", 0.25)]
    assert (cost["n"], cost["mean"], cost["losses"]) == (4, -25.0, 1)
    assert ("dynsplit-evict", "dynsplit-evict-hold", 0.25) not in pairs  # each pair once
    assert "1026 at 1/4 (4.0x fewer), 513 at 1/8 (8.0x fewer)" in text
