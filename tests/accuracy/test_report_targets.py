"""The headline's paired statistics and its done-when checks (benchmarks/accuracy stats.py and
report.headline_targets), on records whose answers are known."""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"))

import report  # noqa: E402
import stats  # noqa: E402

QWEN, SMOL = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"


def _records(model, budget, dyn, fixed):
    """One record per sample and method; dyn/fixed: lists of scores in [0, 1]."""
    out = []
    for i, (a, b) in enumerate(zip(dyn, fixed)):
        for method, score in (("dynsplit", a), ("fixed", b)):
            out.append(dict(model=model, budget=budget, method=method, sample=f"s{i}",
                            score=score))
    return out


def test_paired_summary_matches_a_direct_computation():
    rng = random.Random(1)
    dyn = [rng.random() for _ in range(40)]
    fixed = [rng.random() for _ in range(40)]
    recs = _records(QWEN, 0.125, dyn, fixed) + _records(QWEN, 512, fixed, dyn)  # other budget
    p = stats.paired_summary(recs, QWEN, 0.125, "dynsplit", "fixed")
    diffs = [a - b for a, b in zip(dyn, fixed)]
    assert p["n"] == 40
    assert abs(p["mean"] - 100 * sum(diffs) / 40) < 0.01
    assert p["ci_low"] < p["mean"] < p["ci_high"]
    assert p["wins"] == sum(d > 0 for d in diffs) and p["losses"] == sum(d < 0 for d in diffs)
    # A constant difference has a zero-width interval.
    const = stats.paired_summary(_records(QWEN, 1, [1.0] * 9, [0.5] * 9), QWEN, 1, "dynsplit",
                                 "fixed")
    assert const["mean"] == const["ci_low"] == const["ci_high"] == 50.0


def _data(n, dyn_wins):
    """Qwen at 1/8: n paired samples, dynsplit right on dyn_wins more of them than fixed."""
    dyn = [1.0] * (n // 2 + dyn_wins) + [0.0] * (n - n // 2 - dyn_wins)
    fixed = [1.0] * (n // 2) + [0.0] * (n - n // 2)
    recs = _records(QWEN, 0.125, dyn, fixed)
    cell = dict(model=QWEN, task="niah_single", context_len=4096)
    rows = [dict(cell, method=m, budget=0.125, n=n,
                 accuracy=sum(r["score"] for r in recs if r["method"] == m) / n)
            for m in ("dynsplit", "fixed")]
    rows.append(dict(cell, method="none", budget=1.0, n=n, accuracy=1.0))
    paired = [stats.paired_summary(recs, QWEN, 0.125, "dynsplit", "fixed")]
    return {"rows": rows, "paired": paired,
            "meta": {"phases": {QWEN: {"sglang": {"fallback_rows": 0}}}}}


def test_targets_met_with_enough_samples_and_a_clear_win():
    text = report.headline_targets(_data(60, dyn_wins=12))
    assert "60 paired samples (target ≥ 50): **met**" in text
    assert "dynsplit − fixed = +20.0 points" in text
    assert "(target ≥ +3 with the CI above 0): **met**" in text
    assert "dense fallbacks 0 (target 0): **met**" in text
    # dynsplit 70% vs full KV 100%: more than 10 points behind.
    assert "dynsplit 70.0 vs full KV 100.0 (-30.0 points; target within 10): **missed**" in text


def test_targets_missed_on_too_few_samples_or_a_tie():
    few = report.headline_targets(_data(20, dyn_wins=6))
    assert "20 paired samples (target ≥ 50): **missed**" in few
    tie = report.headline_targets(_data(60, dyn_wins=0))
    assert "dynsplit − fixed = +0.0 points" in tie and "CI above 0): **missed**" in tie
    assert "below full KV" not in tie  # fixed is 50 points below full KV: room for +3


def test_a_missed_gain_says_when_fixed_leaves_no_room_below_full_kv():
    data = _data(60, dyn_wins=0)  # fixed 50.0
    full = next(r for r in data["rows"] if r["method"] == "none")
    full["accuracy"] = 0.51
    text = report.headline_targets(data)
    assert ("**missed**; fixed is 1.0 points below full KV on these cells, so +3 would need "
            "dynsplit 2.0 points above full KV") in text


def test_run_report_only_rebuilds_rows_and_pairs_from_the_records(tmp_path):
    """Runs of one model each append to one samples file; --report-only serves nothing and
    writes the rows and paired statistics of the configuration asked for."""
    import json

    import run

    out = tmp_path / "headline.json"
    recs = []
    for model in (QWEN, SMOL):
        for i in range(4):
            for method, score in (("none", 1.0), ("dynsplit", float(i % 2)), ("fixed", 0.0)):
                recs.append(dict(model=model, sample=f"vt-4096-0-{i}", task="vt",
                                 context_len=4096, method=method,
                                 budget=1.0 if method == "none" else 0.125, seed=0,
                                 score=score, output=" 1."))
    recs.append(dict(recs[0], method="streaming", budget=0.125))  # not asked for: left out
    (tmp_path / "headline.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run.main(["--headline", "--out", str(out), "--models", QWEN, SMOL, "--contexts",
                     "4096", "--tasks", "vt", "--methods", "none", "dynsplit", "fixed",
                     "--budgets", "0.125", "--report-only", "--no-report"]) == 0
    data = json.loads(out.read_text())
    assert {(r["model"], r["method"]) for r in data["rows"]} == {
        (m, x) for m in (QWEN, SMOL) for x in ("none", "dynsplit", "fixed")}
    assert all(r["n"] == 4 for r in data["rows"])
    pairs = {(p["model"], p["b"]): p for p in data["paired"]}
    assert set(pairs) == {(QWEN, "fixed"), (SMOL, "fixed")}
    assert pairs[(QWEN, "fixed")]["mean"] == 50.0 and pairs[(QWEN, "fixed")]["wins"] == 2


def test_a_server_pool_below_what_the_batch_needs_is_refused(tmp_path):
    """The block store is sized from the pool SGLang grants: a pool smaller than the batch's
    need would turn compressed rows dense, so the run stops instead of recording them."""
    import pytest

    import run

    log = tmp_path / "server.log"
    log.write_text("[t] dynsplit-sglang: KV budget of 71994 dense tokens (24576 B each) holds "
                   "61764 tokens and the block store (239.7 MiB for 67 rows)\n")
    run.check_pool(log, 71994)  # enough: nothing raised
    with pytest.raises(SystemExit, match="71994 tokens, below the 217088"):
        run.check_pool(log, 217088)
    log.write_text("no plan line\n")
    with pytest.raises(SystemExit, match="unknown"):
        run.check_pool(log, 1)


def test_records_from_a_batch_with_dense_fallback_are_counted_and_fail_the_target(tmp_path):
    import json

    import run

    recs = [dict(model=m, sample=f"vt-4096-0-{i}", task="vt", context_len=4096, seed=0,
                 method="dynsplit", budget=0.125, score=1.0, engine="sglang",
                 output=" 1.", fallback_rows_in_batch=fb)
            for m, fbs in ((QWEN, (0, 0)), (SMOL, (0, 3))) for i, fb in enumerate(fbs)]
    (tmp_path / "h.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    results = run.Results(tmp_path / "h.json")
    assert results.fallback_records() == {QWEN: 0, SMOL: 1}
    results.save()
    text = report.headline_targets(json.loads((tmp_path / "h.json").read_text()))
    assert f"{QWEN}: records from batches with a dense fallback 0 (target 0): **met**" in text
    assert f"{SMOL}: records from batches with a dense fallback 1 (target 0): **missed**" in text


def test_degenerate_repetition_on_text_and_what_compression_added(tmp_path):
    """repetition.degenerate flags loops in plain output text; the results count, per method
    and budget, the loops whose sample's full-KV output has none, and the report lists them."""
    import json

    import repetition
    import run

    for loop in ("HHHHHHHH", " VAR VAR VAR VAR VAR", ": 5111925. 5111925. 5111925. 5111925.",
                 ":\n1. 1.1.1.1.1.1.1", [" 12.", " PKXRP PKXRP PKXRP PKXRP"]):
        assert repetition.degenerate(loop), loop
    for normal in (" 1234567.", ": 9183256, 5111925, 7242618.", " The sky is blue.", " 1000000",
                   [" 12.", " 13."], ""):
        assert not repetition.degenerate(normal), normal
    outputs = {  # sample -> (full KV, dynsplit, fixed)
        "s0": (" 4411187.", " 4411187. 4411187. 4411187. 4411187.", " 4411187."),
        "s1": (" VAR VAR VAR VAR", " VAR VAR VAR VAR", " VAR VAR VAR VAR"),  # full KV loops too
        "s2": (" 12.", " 12.", "HHHHHHHHH"),
    }
    recs = [dict(model=SMOL, sample=s, task="vt", context_len=4096, seed=0, method=m,
                 budget=1.0 if m == "none" else 0.125, score=0.0, output=o)
            for s, outs in outputs.items() for m, o in zip(("none", "dynsplit", "fixed"), outs)]
    (tmp_path / "h.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    results = run.Results(tmp_path / "h.json")
    deg = {(d["method"], d["budget"]): d for d in results.degenerate()}
    assert deg[("none", 1.0)]["degenerate"] == 1 and deg[("none", 1.0)]["added"] == 0
    assert deg[("dynsplit", 0.125)] == dict(model=SMOL, method="dynsplit", budget=0.125, n=3,
                                            judged=3, degenerate=2, added=1,
                                            added_samples=["s0"])
    assert deg[("fixed", 0.125)]["added_samples"] == ["s2"]
    results.save()
    text = report.headline_targets(json.loads((tmp_path / "h.json").read_text()))
    assert (f"- {SMOL}: dynsplit outputs with a degenerate repetition that full KV's output on "
            "the same prompt does not have, of those full KV answered (full KV itself repeats in "
            "1/3): 1/8 1/3 (fixed 1); samples: s0 (target 0): **missed**") in text
    # A prompt full KV did not answer is not judged.
    recs.append(dict(recs[-1], sample="s3", method="dynsplit", output="HHHHHHHHH"))
    with open(tmp_path / "h.samples.jsonl", "a") as f:
        f.write(json.dumps(recs[-1]) + "\n")
    again = {(d["method"], d["budget"]): d for d in run.Results(tmp_path / "h.json").degenerate()}
    assert again[("dynsplit", 0.125)]["n"] == 4 and again[("dynsplit", 0.125)]["judged"] == 3
    assert again[("dynsplit", 0.125)]["added"] == 1


def _sweep_row(sample, variant, score, output, ids):
    return dict(sample=sample, model=SMOL, task="niah_multivalue", context_len=4096,
                variant=variant, score=score, output=output, output_ids=ids)


def test_the_exact_score_replay_says_whether_split_or_score_decides_and_traces_loops(tmp_path):
    """oracle_lines: accuracy with the gauss and the exact block score on the replay's prompts,
    how often the two splits agree with the exact score, and for each headline loop whether it
    survives the exact score (the budget's) or not (the score's: the target is missed)."""
    loop = "a: 5111925. 5111925. 5111925. 5111925. 5111925."
    rows = []
    for s, (d, f, do, fo), same in (("p-0of2", (0.0, 0.25, 0.25, 0.25), True),
                                    ("p-1of2", (0.25, 0.25, 0.75, 0.75), False)):
        rows.append(_sweep_row(s, "full", 0.75, "a: 1, 2, 3", [1, 2, 3]))
        rows.append(_sweep_row(s, "dynsplit@0.125", d, loop, [9]))
        rows.append(_sweep_row(s, "fixed@0.125", f, "x", [8]))
        out = loop if s == "p-0of2" else "a: 1, 2, 3"
        rows.append(_sweep_row(s, "dynsplit-oracle@0.125", do, out, [1, 2]))
        rows.append(_sweep_row(s, "fixed-oracle@0.125", fo, out, [1, 2] if same else [1, 3]))
    path = tmp_path / "oracle.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = {"degenerate": [dict(model=SMOL, method="dynsplit", budget=0.125,
                                added_samples=["p-0of2", "p-1of2"]),
                           dict(model=QWEN, method="dynsplit", budget=0.125,
                                added_samples=["p-1of2"])]}
    lines = report.oracle_lines(data, SMOL, path)
    assert len(lines) == 2
    assert "dynsplit 12.5 and fixed 25.0 with the gauss block score" in lines[0]
    assert "dynsplit 50.0 and fixed 50.0 (full KV 75.0)" in lines[0]
    assert "token-identical outputs on 1 of 2 prompts" in lines[0]
    assert "p-0of2: still repeats with the exact score (dynsplit, fixed)" in lines[1]
    assert "p-1of2: no repetition with the exact score" in lines[1]
    assert lines[1].endswith("score: 1 of 2 (target 0): **missed**")
    # Only the budget's loops left: met. Another model, or no replay file: nothing said.
    data["degenerate"][0]["added_samples"] = ["p-0of2"]
    assert report.oracle_lines(data, SMOL, path)[1].endswith("0 of 1 (target 0): **met**")
    assert report.oracle_lines(data, QWEN, path) == []
    assert report.oracle_lines(data, SMOL, tmp_path / "none.jsonl") == []


def test_the_replay_line_adds_the_two_stage_selection_where_it_was_run(tmp_path):
    rows = []
    for i, (d, f) in enumerate(((1.0, 0.5), (0.0, 0.5))):
        s = f"p-{i}of2"
        for variant, score in (("full", 1.0), ("dynsplit@0.125", 0.0), ("fixed@0.125", 0.0),
                               ("dynsplit-oracle@0.125", 1.0), ("fixed-oracle@0.125", 1.0),
                               ("dynsplit-refine2@0.125", d), ("fixed-refine2@0.125", f)):
            rows.append(_sweep_row(s, variant, score, "x", [1]))
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (line,) = report.oracle_lines({"degenerate": []}, SMOL, path)
    assert line.endswith("(core.select_refined, the server's default since): dynsplit 50.0, "
                         "fixed 50.0.")
    path.write_text("\n".join(json.dumps(r) for r in rows if "refine" not in r["variant"]))
    (line,) = report.oracle_lines({"degenerate": []}, SMOL, path)
    assert "select_refined" not in line


def _record(sample, method, budget, score, model=SMOL):
    return dict(model=model, sample=sample, method=method, budget=budget, score=score)


def test_two_stage_selection_is_paired_against_the_score_alone_on_the_same_prompts(tmp_path):
    """score_only_lines: per budget, dynsplit and fixed of this run (refine = 2) minus the same
    method served with the score alone (the archived records), on the prompts both answered,
    and dynsplit − fixed before → after; nothing without the archive or this run's records."""
    new, old = [], []
    for i in range(4):
        s = f"p-{i}of4"
        new += [_record(s, "dynsplit", 0.125, 1.0), _record(s, "fixed", 0.125, 1.0 if i else 0.0),
                _record(s, "none", 1.0, 1.0)]
        old += [_record(s, "dynsplit", 0.125, 0.0 if i < 2 else 1.0),
                _record(s, "fixed", 0.125, 1.0), _record(s, "none", 1.0, 1.0)]
    old.append(_record("p-9of9", "dynsplit", 0.125, 1.0))  # not in this run: unpaired
    old.append(_record("p-0of4", "dynsplit", 0.125, 1.0, model=QWEN))  # another model
    run, archive = tmp_path / "h.samples.jsonl", tmp_path / "s.samples.jsonl"
    run.write_text("\n".join(json.dumps(r) for r in new) + "\n")
    archive.write_text("\n".join(json.dumps(r) for r in old) + "\n")
    data = {"samples_path": str(run)}
    (line,) = report.score_only_lines(data, SMOL, archive)
    assert line.startswith(f"- {SMOL} at 1/8: two-stage selection (refine = 2) against the "
                           "score alone on the same prompts: dynsplit +50.0 [")
    assert "(2 won / 0 lost, n = 4)" in line and "fixed -25.0 [" in line
    assert "(0 won / 1 lost, n = 4)" in line
    assert line.endswith("dynsplit − fixed -50.0 → +25.0")
    assert report.score_only_lines(data, QWEN, archive) == []  # no fixed pair there
    assert report.score_only_lines({}, SMOL, archive) == []
    assert report.score_only_lines(data, SMOL, tmp_path / "none.jsonl") == []


def test_load_finds_the_per_output_records_beside_the_results(tmp_path):
    path = tmp_path / "headline.json"
    path.write_text(json.dumps({"rows": []}))
    assert "samples_path" not in report.load(path)
    (tmp_path / "headline.samples.jsonl").write_text("")
    assert report.load(path)["samples_path"] == str(tmp_path / "headline.samples.jsonl")


def test_the_header_names_the_block_selection_of_the_run():
    data = {"meta": {"config": {"dynsplit_defaults": {"refine": 2.0, "dense_layers": 2}}}}
    assert "Block selection: two-stage (refine = 2" in report.header(data)
    data["meta"]["config"]["dynsplit_defaults"] = {"dense_layers": 2}  # a run before the field
    assert "Block selection: the summary score alone (refine = 1)." in report.header(data)
