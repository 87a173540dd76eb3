"""The serving benchmark's statistics, pairing and target checks (benchmarks/serving
serving_stats.py) and its README section (report.py), on repeats whose answers are computed by
hand. Fast: no server, no SGLang import."""

import importlib.util
import sys
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[1] / "benchmarks" / "serving"
# Appended, not put first: other benchmarks' tests import their own `run` and `report` by name.
sys.path.append(str(SERVING))

import serving_stats as st  # noqa: E402


def _report():
    """report.py under its own name (tests/accuracy imports another `report`)."""
    spec = importlib.util.spec_from_file_location("serving_report", SERVING / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _probes(config, budget, context, speeds):
    return [{"config": config, "budget": budget, "context": context, "round": r,
             "decode_tok_per_s": v, "tpot_ms": 1e3 / v, "ttft_ms": 50.0 + r,
             "uncached_tokens": 1, "load_1m": 2.0} for r, v in enumerate(speeds)]


def _rows(probes):
    return st.summarize(probes, ("context",), ("decode_tok_per_s", "tpot_ms", "ttft_ms"),
                        ("decode_tok_per_s",))


def test_spread_of_five_and_four_values():
    s = st.spread([10, 12, 11, 20, 9])  # sorted 9 10 11 12 20
    assert (s["n"], s["median"], s["min"], s["max"]) == (5, 11, 9, 20)
    assert (s["q1"], s["q3"], s["iqr"]) == (10, 12, 2)  # 2nd and 4th smallest
    assert s["rel_iqr"] == pytest.approx(2 / 11)
    s = st.spread([4, 1, None, 3, 2])  # None is skipped; linear interpolation
    assert (s["n"], s["median"], s["q1"], s["q3"]) == (4, 2.5, 1.75, 3.25)
    assert st.spread([None]) is None
    assert st.spread([7.0])["iqr"] == 0


def test_paired_ratios_pair_rounds_not_positions():
    dyn = {0: 20.0, 1: 30.0, 3: 12.0}
    dense = {0: 10.0, 2: 99.0, 3: 6.0, 1: 10.0}
    assert st.paired_ratios(dyn, dense) == [2.0, 3.0, 2.0]  # round 2 has no dynsplit repeat
    r = st.ratio_summary([2.0, 3.0, 2.0])
    assert (r["n"], r["median"], r["min"], r["max"]) == (3, 2.0, 2.0, 3.0)


def test_rotate_puts_every_config_first_once():
    order = [st.rotate(["a", "b", "c"], r) for r in range(3)]
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_summarize_ratio_of_medians_and_paired_ratios():
    dense = [10.0, 10.0, 12.0, 8.0, 10.0]
    dyn = [20.0, 21.0, 25.0, 15.0, 22.0]
    rows = _rows(_probes("none", 1.0, 8192, dense) + _probes("dynsplit", 0.125, 8192, dyn)
                 + _probes("none", 1.0, 2048, [50.0] * 5))  # another context: not a baseline
    d8 = st.find(rows, "dynsplit", 0.125, context=8192)
    assert d8["label"] == "dynsplit@1/8" and d8["n"] == 5 and d8["rounds"] == [0, 1, 2, 3, 4]
    assert d8["decode_tok_per_s"]["median"] == 21.0
    vs = d8["vs_dense"]["decode_tok_per_s"]
    assert vs["ratio_of_medians"] == pytest.approx(21.0 / 10.0)
    # paired: 2.0, 2.1, 2.0833, 1.875, 2.2 -> median 2.0833
    assert vs["paired"]["median"] == pytest.approx(25.0 / 12.0)
    assert vs["paired"]["min"] == pytest.approx(1.875) and vs["paired"]["max"] == 2.2
    assert "none (dense)" in vs["baseline"]
    assert "vs_dense" not in st.find(rows, "none", 1.0, context=8192)
    assert st.find(rows, "dynsplit", 0.125, context=2048) is None


def _target_rows(dense2k, dyn2k, dense8k, dyn8k):
    return _rows(_probes("none", 1.0, 2048, dense2k) + _probes("dynsplit", 0.125, 2048, dyn2k)
                 + _probes("none", 1.0, 8192, dense8k) + _probes("dynsplit", 0.125, 8192, dyn8k))


DENSE2K = [9.0, 10.0, 11.0, 12.0, 10.0]  # median 10, IQR 10..11 -> relative IQR 0.1


def test_targets_pass_within_noise_and_at_2x():
    # paired at 2k: .944 .95 .909 .917 .98 -> median .944 >= 1 - 0.1
    rows = _target_rows(DENSE2K, [8.5, 9.5, 10.0, 11.0, 9.8],
                        [10.0, 10.0, 12.0, 8.0, 10.0], [20.0, 21.0, 25.0, 15.0, 22.0])
    two, eight = st.target_checks(rows)
    assert two["verdict"] == "pass" and two["n"] == 5
    assert two["value"] == pytest.approx(8.5 / 9.0) and two["threshold"] == pytest.approx(0.9)
    assert eight["verdict"] == "pass"
    assert eight["value"] == pytest.approx(25 / 12) and eight["ratio_of_medians"] == 2.1


def test_targets_miss_when_slower_than_noise_or_below_2x():
    rows = _target_rows(DENSE2K, [v * 0.85 for v in DENSE2K],  # paired 0.85 < 0.9
                        [10.0] * 5, [19.0, 21.0, 19.5, 22.0, 19.9])  # paired median 1.99
    two, eight = st.target_checks(rows)
    assert two["verdict"] == "MISS" and two["value"] == pytest.approx(0.85)
    assert eight["verdict"] == "MISS" and eight["value"] == pytest.approx(1.99)
    # ratio of medians below 2 fails the 8k check even when the paired median passes
    rows = _target_rows(DENSE2K, DENSE2K, [10.0, 10.0, 10.0, 12.0, 12.0],
                        [20.0, 20.0, 20.0, 23.0, 23.0])  # paired 2,2,2,1.92,1.92; medians 20/10
    assert st.target_checks(rows)[1]["verdict"] == "pass"
    rows = _target_rows(DENSE2K, DENSE2K, [10.0, 10.5, 10.5, 11.0, 11.0],
                        [20.0, 21.0, 22.0, 22.0, 22.0])  # paired median 2.0, medians 22/10.5
    assert st.target_checks(rows)[1]["verdict"] == "pass"
    rows = _target_rows(DENSE2K, DENSE2K, [10.0, 10.0, 11.0, 11.0, 11.0],
                        [20.0, 20.0, 22.0, 22.0, 21.5])  # paired median 2.0, medians 21.5/11
    chk = st.target_checks(rows)[1]
    assert chk["value"] == 2.0 and chk["ratio_of_medians"] < 2.0 and chk["verdict"] == "MISS"


def test_targets_below_protocol_or_unmeasured_are_not_a_pass():
    rows = _target_rows(DENSE2K[:3], [v / 2 for v in DENSE2K[:3]], [10.0] * 3, [30.0] * 3)
    two, eight = st.target_checks(rows)
    assert two["verdict"] == "not valid (3 < 5 repeats; measured MISS)"
    assert eight["verdict"] == "not valid (3 < 5 repeats; measured pass)"
    two, eight = st.target_checks(_rows(_probes("none", 1.0, 4096, [1.0] * 5)))
    assert two["verdict"] == eight["verdict"] == "not measured"


def test_break_even_context():
    dense = [10.0] * 5
    rows = _rows(_probes("none", 1.0, 2048, dense) + _probes("dynsplit", 0.125, 2048, [8.0] * 5)
                 + _probes("none", 1.0, 4096, dense) + _probes("dynsplit", 0.125, 4096, dense)
                 + _probes("none", 1.0, 8192, dense) + _probes("dynsplit", 0.125, 8192,
                                                               [20.0] * 5))
    be = st.break_even_context(rows, "dynsplit", 0.125)
    assert be["verdicts"] == {2048: False, 4096: True, 8192: True}
    assert be["context"] == 4096 and not be["at_smallest"]


def _cells():
    out = []
    for cfg, b, speeds in (("none", 1.0, [10.0, 11.0, 12.0]),
                           ("dynsplit", 0.125, [12.0, 11.0, 18.0])):
        for r, v in enumerate(speeds):
            out.append({"config": cfg, "budget": b, "round": r, "context_len": 2048,
                        "concurrency": 4, "output_tok_per_s": v / 2, "decode_tok_per_s_p50": v,
                        "ttft_ms_p50": 900.0, "ttft_ms_p90": 1000.0, "tpot_ms_p50": 1e3 / v,
                        "tpot_ms_p90": 1e3 / v, "radix_hit_rate": 0.9,
                        "kv_slots_in_use": 4000 + r})
    return out


def _meta(repeats):
    return {"quick": True, "machine": "2 cores X", "device": "cpu",
            "attention_backend": "torch_native", "dtype": "float32", "model": "m",
            "wall_s": 600.0, "load_avg_1m": {"min": 1.0, "median": 2.0, "max": 3.0},
            "command": "python benchmarks/serving/run.py --quick --out x.json",
            "turns": 3, "obs_tokens": 128, "output_tokens": 32,
            "protocol": {"min_repeats": 5, "decode_repeats": repeats, "cell_repeats": 3,
                         "decode_meets_protocol": repeats >= 5, "cells_meet_protocol": False,
                         "interleaving": "round-robin"}}


def _decode_rows(dense2k, dyn2k, dense8k, dyn8k):
    probes = (_probes("none", 1.0, 2048, dense2k) + _probes("dynsplit", 0.125, 2048, dyn2k)
              + _probes("none", 1.0, 8192, dense8k) + _probes("dynsplit", 0.125, 8192, dyn8k))
    rows = st.summarize(probes, ("context",), ("decode_tok_per_s", "tpot_ms", "ttft_ms",
                                               "uncached_tokens"), ("decode_tok_per_s",))
    for r in rows:
        r.update(prompt_tokens=r["context"] - 72, output_tokens=64, prefill_ttft_ms=5000.0,
                 radix_hit_ok=True, kv_tokens_read_per_head=None)
    return rows


def test_report_section_states_targets_protocol_and_ttft(tmp_path):
    report = _report()
    cells = st.summarize(_cells(), ("context_len", "concurrency"), report_cell_metrics(),
                         ("output_tok_per_s", "decode_tok_per_s_p50"))
    data = {"meta": _meta(5), "rows": cells,
            "decode": _decode_rows(DENSE2K, [8.5, 9.5, 10.0, 11.0, 9.8], [10.0] * 5,
                                   [19.0, 21.0, 19.5, 22.0, 19.9])}
    text = report.section(data, None, [], tmp_path / "quick.json")
    assert "dynsplit@1/8 never slower than dense at 2048 (within noise): **pass**" in text
    assert "dynsplit@1/8 decode >= 2.0x dense at 8192: **MISS** — median paired ratio 1.99x" \
        in text
    assert "at least 1 - the relative IQR of the dense repeats" in text  # the definition
    assert "| 8192 | dynsplit@1/8 | 5 | 19.9 (19.0–22.0) |" in text
    assert "| 1.99x | 1.99x [1.90–2.20] |" in text  # ratio of medians, paired [range]
    assert "Break-even of dynsplit@1/8 vs dense" in text and "≤ 2048" in text
    # cells: decode tok/s apart from output tok/s, which includes TTFT; 3 repeats said so
    assert "includes TTFT and prefill" in text and "Agent cells: 3 repeats (fewer than 5" in text
    assert "| 2048 | 4 | dynsplit@1/8 | 3 | 6.0 (5.5–9.0) | 12.0 (11.0–18.0) | " \
           "1.20x [1.00–1.50] |" in text  # paired: 12/10, 11/11, 18/12
    few = report.section(dict(data, meta=_meta(2)), None, [], tmp_path / "quick.json")
    assert "below the protocol's 5 repeats: not a valid result" in few


def test_long_context_run_is_shown_with_its_own_model_and_table(tmp_path):
    """The 16k/32k probe of a second run (another model) gets its own table and command, and
    no target line: the targets are the default model's."""
    report = _report()
    probes = (_probes("none", 1.0, 16384, [2.0, 2.1, 2.0, 1.9, 2.0])
              + _probes("dynsplit", 0.125, 16384, [6.0, 6.2, 5.8, 6.1, 6.0]))
    rows = st.summarize(probes, ("context",), ("decode_tok_per_s", "tpot_ms", "ttft_ms",
                                               "uncached_tokens"), ("decode_tok_per_s",))
    for r in rows:
        r.update(prompt_tokens=16300, output_tokens=64, prefill_ttft_ms=9e4, radix_hit_ok=True,
                 kv_tokens_read_per_head=None)
    long = {"meta": dict(_meta(5), model="qwen", command="python run.py --model qwen"),
            "decode": rows}
    data = {"meta": _meta(5), "rows": [],
            "decode": _decode_rows(DENSE2K, [10.0] * 5, [10.0] * 5, [21.0] * 5)}
    text = report.section(data, None, [], tmp_path / "quick.json", long=long,
                          long_path=tmp_path / "qwen-decode.json")
    tail = text.split("**Long contexts**")[1]
    assert "model qwen" in tail and "python run.py --model qwen" in tail
    assert "| 16384 | dynsplit@1/8 | 5 | 6.0 (5.8–6.2) |" in tail
    assert "| 3.00x | 3.00x [2.90–3.21] |" in tail  # paired: 6/2, 6.2/2.1, 5.8/2, 6.1/1.9
    assert "at 16384" not in text.split("**Decode probe**")[0]  # no target from this run
    assert "**Long contexts**" not in report.section(data, None, [], tmp_path / "quick.json")


def report_cell_metrics():
    return ("output_tok_per_s", "decode_tok_per_s_p50", "ttft_ms_p50", "tpot_ms_p50",
            "radix_hit_rate", "kv_slots_in_use")


def test_before_after_profile_lines():
    def prof(layer, score, plan, dense):
        stages = {"score_ms": score, "select_ms": 0.1, "attention_ms": 0.2,
                  "positions_to_slots_ms": 0.05}
        return {"budgets": [0.125], "context_len": 8000, "threads": 1, "attention": {
            "dense": {"attn_layer_ms_p50": dense},
            "0.125": {"sparse_layer_ms_p50": layer, "run_stages_ms_per_layer": stages,
                      "plan_ms_p50": plan, "attention_ms": 20.0, "plan_ms": plan}}}
    lines = _report().before_after_lines(prof(0.6, 0.3, 1.2, 1.0), prof(0.4, 0.2, 1.5, 1.1))
    row = next(line for line in lines if line.startswith("| compressed layer"))
    assert row == "| compressed layer (p50) | 0.60 | 0.40 |"
    assert "| step plan (begin_forward, p50) | 1.20 | 1.50 |" in lines
    assert "|   positions + attention | 0.25 | 0.25 |" in lines
    assert any("1.00 ms before, 1.10 ms after" in line for line in lines)


def test_ceiling_line_says_what_a_target_leaves():
    step = {"dense": {"server_tpot_ms": 200.0, "rest_ms": 80.0},
            "0.125": {"attention_ms": 35.0, "plan_ms": 5.0}}
    (line,) = _report().ceiling_lines(step)
    assert "still cost 80 ms, 2.50x dense at best" in line
    assert "needs attention + plan <= 20 ms per step; 1/8 spends 40 ms" in line
    assert _report().ceiling_lines({"dense": {"server_tpot_ms": 200.0, "rest_ms": -3.0}}) == []


def test_the_dense_baseline_is_started_last():
    from types import SimpleNamespace as C

    configs = [C(name="none"), C(name="dynsplit", b=0.25), C(name="dynsplit", b=0.125)]
    order = st.start_order(configs)
    assert order[-1].name == "none" and order[:2] == configs[1:]  # the others as given
    assert st.start_order(configs[1:]) == configs[1:]


def test_protocol_line_says_which_server_started_first():
    report = _report()
    meta = {"protocol": {"interleaving": "round-robin", "decode_repeats": 5,
                         "decode_meets_protocol": True}}
    line = report.protocol_line({**meta, "start_order": ["dynsplit@1/8", "none"]})
    assert "started in the order dynsplit@1/8, none" in line and "baseline last" in line
    assert "dense baseline's server was started first" in report.protocol_line(meta)


def test_each_run_says_which_block_selection_its_servers_ran():
    note = _report().selection_note
    assert note({"dynsplit_refine": 2.0}) == "block selection: two-stage, refine = 2"
    assert note({"dynsplit_refine": 1.0}) == "block selection: the summary score alone (refine = 1)"
    assert "recorded before two-stage selection" in note({})  # runs that predate the field
