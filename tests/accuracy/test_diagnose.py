"""The accuracy diagnosis tool (benchmarks/accuracy/diagnose.py) on the tiny random model.

Its per-(step, layer, KV head) records are checked against recomputations from what the product
did: the raw scores and kept flags core_eval's trace hook saw, the selection counter
(tokens attended) core_eval adds up, an independent segmentation, and the dense attention of
each head recomputed from the q and k of a separate traced run. The tiny model shares SmolLM2's
tokenizer, so the suite's tasks tokenize as in the real runs (passkey: filler haystack, offline).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"))

import core_eval  # noqa: E402
import diagnose as D  # noqa: E402
import tasks as T  # noqa: E402

from dynsplit_sglang.core import DynSplitConfig  # noqa: E402

CONTEXT = 1024
METHODS = (("dynsplit", "gauss"), ("fixed", "bound"))


@pytest.fixture(scope="module")
def tiny():
    from dynsplit_sglang.models import TINY_MODEL

    return D.load_model(TINY_MODEL)


@pytest.fixture(scope="module")
def samples(tiny):
    return T.generate("passkey", tiny[1], CONTEXT, 4, seed=3)


def _cfg(strategy, score):
    # Both layers of the 2-layer model compressed, so records span layers and heads.
    return DynSplitConfig(strategy=strategy, score=score, budget_fraction=0.25, dense_layers=0)


@pytest.fixture(scope="module")
def runs(tiny, samples):
    """(sample, cfg, result) for two samples x two methods, prefill shared per sample."""
    model, tok = tiny
    cfgs = [_cfg(*m) for m in METHODS]
    out = []
    for s in samples[1:3]:
        pre, full = D.Prefills(model, s.input_ids, cfgs), None
        for cfg in cfgs:
            r = D.diagnose(model, tok, s, cfg, prefilled=pre.get(cfg), full_ids=full, raw=True)
            full = r["full_ids"]
            out.append((s, cfg, r))
    return out


def _order(scores_row, clip):
    """Selectable blocks, best score first (ties: lower index), recomputed in Python."""
    ok = [j for j, s in enumerate(scores_row) if s is not None and clip[j] > 0]
    return sorted(ok, key=lambda j: (-scores_row[j], j))


def test_records_agree_with_the_scores_and_selection_the_product_used(runs):
    seen_kept = seen_dropped = 0
    for s, cfg, r in runs:
        block_of = D.block_ids(r["block_starts"], r["block_lens"]).tolist()
        attended_total = 0
        for key, raw in r["raw"].items():
            step = int(key.split("/")[0])
            plan = r["plans"][step]
            clip, budget = plan["clip_len"], plan["block_budget"]
            for h, row in enumerate(raw["scores"]):
                order = _order(row, clip)
                above, fill = {}, 0
                for j in order:
                    above[j], fill = fill, fill + clip[j]
                # Greedy prefix of the score order (what core.select must have kept).
                kept = [j in above and above[j] + clip[j] <= budget for j in range(len(row))]
                assert kept == raw["kept"][h], (key, h)
                attended_total += (plan["sink"] + sum(c for c, k in zip(clip, kept) if k)
                                   + plan["seq"] - plan["recent_start"])
        # The recorded selection is the one whose tokens core_eval counted.
        assert attended_total == r["tokens_attended"]
        for rec in r["records"]:
            raw = r["raw"][f"{rec['step']}/{rec['layer']}"]
            plan = r["plans"][rec["step"]]
            row, clip = raw["scores"][rec["head"]], plan["clip_len"]
            order = _order(row, clip)
            ranks = [order.index(j) if j in order else None for j in rec["blocks"]]
            assert rec["ranks"] == ranks
            assert rec["best_rank"] == min((x for x in ranks if x is not None), default=None)
            assert rec["cost_above"] == [None if x is None else sum(clip[i] for i in order[:x])
                                         for x in ranks]
            assert rec["kept"] == [raw["kept"][rec["head"]][j] for j in rec["blocks"]]
            assert [t[0] for t in rec["top"]] == order[:D.TOP]
            occ = r["answers"][rec["answer"]]["occurrences"]
            assert sorted({block_of[t] for o in occ for t in o}) == rec["blocks"]
            heard = [t < plan["sink"] or t >= plan["recent_start"]
                     or raw["kept"][rec["head"]][block_of[t]] for t in range(r["prompt_len"])]
            whole = any(all(heard[t] for t in o) for o in occ)
            assert rec["whole"] == whole
            assert rec["whole"] == (rec["need"] is not None  # None: out of the race (refine)
                                    and rec["need"] <= rec["block_budget"])  # the budget to keep
            assert rec["block_budget"] == plan["block_budget"]
            seen_kept += whole
            seen_dropped += not whole
    assert seen_kept and seen_dropped  # both cases exercised


def test_trace_changes_no_result_and_dense_mass_matches_a_direct_softmax(tiny, runs):
    model, tok = tiny
    s, cfg, r = runs[0]
    plain = core_eval.generate(model, tok, s.input_ids, cfg, s.max_new_tokens)
    assert plain["output_ids"] == r["output_ids"]
    assert plain["tokens_attended"] == r["tokens_attended"]
    seen = {}

    def capture(step, layer, q, k, scale, **_):
        seen[(step, layer)] = (q.clone(), k.clone(), scale)

    core_eval.generate(model, tok, s.input_ids, cfg, s.max_new_tokens, trace=capture)
    assert set(seen) == {(rec["step"], rec["layer"]) for rec in r["records"]}
    block_of = D.block_ids(r["block_starts"], r["block_lens"])
    for rec in r["records"]:
        q, k, scale = seen[(rec["step"], rec["layer"])]
        hkv, g = k.shape[1], q.shape[0] // k.shape[1]
        occ = r["answers"][rec["answer"]]["occurrences"]
        union = sorted({t for o in occ for t in o})
        mass, per_block = [], torch.zeros(len(r["block_lens"]))
        for qh in range(rec["head"] * g, (rec["head"] + 1) * g):
            p = torch.softmax(k[:, qh // g].float() @ q[qh].float() * scale, dim=0)
            mass.append(float(p[union].sum()))
            per_block += torch.zeros_like(per_block).index_add_(
                0, block_of, p[: block_of.numel()]) / g
        assert rec["mass"] == pytest.approx(sum(mass) / g, abs=1e-5)
        assert rec["mass_max"] == pytest.approx(max(mass), abs=1e-5)
        assert 0 <= rec["mass_kept"] <= rec["mass"] + 1e-6
        if rec["whole"] and len(occ) == 1:
            assert rec["mass_kept"] == pytest.approx(rec["mass"], abs=1e-6)
        assert rec["block_mass"] == pytest.approx(per_block[rec["blocks"]].tolist(), abs=1e-5)
    assert hkv == 2 and g == 2


def test_boundaries_are_rendered_from_the_real_block_table(tiny, runs):
    model, tok = tiny
    for s, cfg, r in runs:
        closed = r["prompt_len"]
        scores = core_eval.prefill(model, s.input_ids, cfg)[2] if cfg.strategy == "dynsplit" else None
        seg = core_eval.segmentation(tok, s.input_ids[:closed], cfg,
                                     None if scores is None else scores[:closed])
        ends = seg.ends.tolist()
        starts = [0] + [e + 1 for e in ends[:-1]]
        assert (r["block_starts"], r["block_lens"]) == (starts, [e - b + 1 for b, e in
                                                                  zip(starts, ends)])
        block_texts = {D._clean(tok.decode(s.input_ids[b:e + 1])) for b, e in zip(starts, ends)}
        for a in r["answers"]:
            assert a["occurrences"], a["text"]
            for occ, blocks in zip(a["occurrences"], a["blocks"]):
                assert a["text"] in tok.decode([s.input_ids[t] for t in occ])
                text = D.boundaries(r, occ)
                assert a["text"] in text
                inner = text.split("⟦")[1:]
                complete = [part.split("⟧")[0] for part in inner if "⟧" in part]
                assert complete and all(c in block_texts for c in complete), text
                assert blocks == sorted({next(i for i, e in enumerate(ends) if e >= t)
                                         for t in occ})
            assert a["min_cost"] == min(sum(r["block_lens"][j] for j in b) for b in a["blocks"])
            assert a["cut"] == (len(a["blocks"][a["cost"].index(a["min_cost"])]) > 1)


def test_shared_prefill_gives_the_results_of_a_fresh_one(tiny, runs):
    model, tok = tiny
    s, cfg, r = runs[-1]  # fixed, served from the voting prefill dynsplit needed
    fresh = D.diagnose(model, tok, s, cfg)
    assert fresh["output_ids"] == r["output_ids"]
    assert fresh["records"] == r["records"]


def test_aggregate_is_consistent_with_the_records(tiny, runs):
    _, tok = tiny
    by = {}
    for s, cfg, r in runs:
        by.setdefault(r["method"], []).append((s, r))
    assert len(by) == len(METHODS)
    for method, pairs in by.items():
        results = [r for _, r in pairs]
        agg = D.aggregate(results)
        recs = [rec for r in results for rec in r["records"]]
        w = [rec["mass"] for rec in recs]
        assert agg["samples"] == 2 and agg["records"] == len(recs)
        assert agg["kept_mass"] == pytest.approx(
            sum(rec["mass_kept"] for rec in recs) / sum(w))
        assert agg["whole_mass"] == pytest.approx(
            sum(m for m, rec in zip(w, recs) if rec["whole"]) / sum(w))
        assert agg["whole"] == pytest.approx(sum(rec["whole"] for rec in recs) / len(recs))
        ranks = [rec["best_rank"] for rec in recs if rec["best_rank"] is not None]
        assert agg["rank"] == pytest.approx(sum(ranks) / len(ranks))
        answers = [a for r in results for a in r["answers"]]
        assert agg["cut"] == pytest.approx(sum(a["cut"] for a in answers) / len(answers))
        assert agg["score"] == pytest.approx(
            sum(T.score(tok.decode(r["output_ids"]), s.answers) for s, r in pairs) / 2)
        table = D.render_aggregate({method: agg})
        assert f"| {method} | 2 |" in table


def test_repetition_detector(tiny):
    _, tok = tiny

    def flag(text):
        return D.repetition(D.token_pieces(tok, tok(text, add_special_tokens=False).input_ids))

    assert flag("HHHHHHHH")
    assert flag("Uhuhuhuh")
    assert flag(" the answer is the the the the")
    assert flag(" 1234567.1234567.1234567.1234567.") is None  # a 7-token pattern, not 1-3
    for normal in (" 1234567.", " The special magic number for calm-river is 4411187.",
                   " The grass is green. The sky is blue.", " 49365", " Mississippi"):
        assert flag(normal) is None, normal


def test_cli_writes_reports_and_the_aggregate(tmp_path):
    from dynsplit_sglang.models import TINY_MODEL

    rc = D.main(["--model", TINY_MODEL, "--task", "passkey", "--context", "512", "--samples", "2",
                 "--suite-n", "4", "--method", "fixed", "--score", "gauss", "bound", "--budget",
                 "0.25", "--set", "dense_layers=1", "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "aggregate.md").read_text()
    for label in ("fixed-gauss-0.25", "fixed-bound-0.25"):
        assert f"| {label} | 2 |" in table
    reports = sorted(tmp_path.glob("passkey-512-0-*.json"))
    assert len(reports) == 4
    for path in reports:
        data = json.loads(path.read_text())
        assert data["records"] and {rec["layer"] for rec in data["records"]} == {1}
        assert path.with_suffix(".png").stat().st_size > 1000
        md = path.with_suffix(".md").read_text()
        assert "⟦" in md and data["sample"]["answers"][0] in md
        assert all(math.isfinite(rec["mass"]) for rec in data["records"])
