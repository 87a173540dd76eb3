"""The kernel benchmark's README section (benchmarks/kernels/report.py): ratios to the named
fastest dense, fraction of the ideal, targets as measured."""

from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _report():
    spec = spec_from_file_location("kernels_report", REPO / "benchmarks" / "kernels" / "report.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows():
    base = dict(device="cpu-x86_64", batch=1, context_len=32768, q_heads=32, kv_heads=8,
                head_dim=128, copy_gbps=10.0)
    return [
        dict(base, method="dense", impl="dense-matmul", budget=32768, median_ms=60.0,
             speedup=1.0, ideal_speedup=1.0),
        dict(base, method="dense-sglang-torch-native", impl="sglang", budget=32768,
             median_ms=450.0, speedup=0.13, ideal_speedup=1.0),
        dict(base, method="dynsplit", budget=2048, median_ms=20.0, speedup=3.0, ideal_speedup=8.0),
        dict(base, method="select-uniform", budget=2048, median_ms=6.0, speedup=10.0,
             ideal_speedup=8.0),
        dict(base, method="select-ragged", budget=2048, median_ms=4.5, speedup=13.3,
             ideal_speedup=8.0),
        dict(base, method="dynsplit", budget=8192, median_ms=30.0, speedup=2.0, ideal_speedup=2.7),
    ]


def test_section_states_ratios_to_the_named_fastest_dense():
    data = {"meta": dict(threads=1, cpu_clock="thread", sink=4, recent=64, ideal="N / (B + N/C)",
                         load_avg_start=[1.0], load_avg_end=[2.0]),
            "bandwidth_gbps": {"cpu": 10.0}, "rows": _rows(),
            "targets": {"cpu": [dict(layout="llama8b-32/8/128", target="t1", value=0.375,
                                     passed=False, detail="d"),
                                dict(layout="default-9/3/64", target="other", value=1.0,
                                     passed=True, detail="d")]}}
    text = _report().section(data, "x.json")
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 32k"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "60.00 ms (dense-matmul)" and cells[3] == "450.0 ms"
    assert cells[4] == "20.00 ms" and cells[5] == "3.00x" and cells[6] == "8.00x"
    assert cells[7] == "0.38" and cells[8] == "0.10" and cells[9] == "0.75x"
    assert "[**MISS**] t1: 0.38" in text and "other" not in text


def test_a_second_thread_count_is_reported_beside_not_mixed():
    def run(threads, value, passed):
        return {"meta": dict(threads=threads, cpu_clock="thread" if threads == 1 else "wall",
                             sink=4, recent=64, ideal="N / (B + N/C)", load_avg_start=[1.0],
                             load_avg_end=[2.0]),
                "bandwidth_gbps": {"cpu": 10.0}, "rows": _rows(),
                "targets": {"cpu": [dict(layout="llama8b-32/8/128", target="t1", value=value,
                                         passed=passed, detail="d")]}}
    rep = _report()
    text = rep.section(run(1, 0.46, False), "one.json", (run(2, 0.64, True), "two.json"))
    first, _, second = text.partition("**2 torch threads**")
    assert "[**MISS**] t1: 0.46" in first and "0.64" not in first
    assert "`two.json`" in second and "wall clock" in second
    assert "[pass] t1: 0.64" in second and "0.46" not in second
    assert second.count("| 1 | 32k") == 1  # its own table
    assert rep.section(run(1, 0.46, False), "one.json").count("torch threads**") == 0


def test_the_run_with_the_fastest_dense_is_judged_first(tmp_path):
    import json

    def run(threads, dense_ms, value, passed):
        rows = [dict(r, median_ms=dense_ms) if r["method"] == "dense" else r for r in _rows()]
        return {"meta": dict(threads=threads, cpu_clock="thread" if threads == 1 else "wall",
                             sink=4, recent=64, ideal="N / (B + N/C)", load_avg_start=[1.0],
                             load_avg_end=[2.0]),
                "bandwidth_gbps": {"cpu": 10.0}, "rows": rows,
                "targets": {"cpu": [dict(layout="llama8b-32/8/128", target="t1", value=value,
                                         passed=passed, detail="d")]}}
    rep = _report()
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(run(1, 50.0, 0.45, False)))
    two.write_text(json.dumps(run(2, 21.0, 0.66, True)))
    assert rep.main([str(one), "--threads-run", str(two)]) == 0
    text = (tmp_path / "README-section.md").read_text()
    judged, _, beside = text.partition("**1 torch thread**")
    assert "CPU, 2 torch threads" in judged and "[pass] t1: 0.66" in judged
    assert "strongest dense baseline" in judged and "0.45" not in judged
    assert "one core" in beside and "[**MISS**] t1: 0.45" in beside
    # the other way round (1 thread's dense faster), the 1-thread run is judged
    two.write_text(json.dumps(run(2, 60.0, 0.66, True)))
    rep.main([str(one), "--threads-run", str(two)])
    text = (tmp_path / "README-section.md").read_text()
    assert text.index("[**MISS**] t1: 0.45") < text.index("[pass] t1: 0.66")
