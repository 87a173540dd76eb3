"""The paired variant sweep (benchmarks/accuracy/sweep.py) and core_eval's teacher forcing, on the
tiny random model (SmolLM2's tokenizer, so the suite's tasks tokenize as in the real runs)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"))

import core_eval  # noqa: E402
import diagnose as D  # noqa: E402
import sweep  # noqa: E402
import tasks as T  # noqa: E402

from dynsplit_sglang.core import DynSplitConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from dynsplit_sglang.models import TINY_MODEL

    return D.load_model(TINY_MODEL)


@pytest.fixture(scope="module")
def sample(tiny):
    return T.generate("passkey", tiny[1], 1024, 1, seed=5)[0]


def _cfg(strategy, refine=1):
    """refine=1 (the score alone) unless asked: the experimental options (pin, sticky, oracle)
    were measured on top of the plain selection, and their tests read its scores."""
    return DynSplitConfig(strategy=strategy, budget_fraction=0.25, dense_layers=0, refine=refine)


@pytest.mark.parametrize("strategy", ["dynsplit", "fixed"])
def test_forcing_the_greedy_answer_matches_it_everywhere(tiny, sample, strategy):
    model, tok = tiny
    cfg = _cfg(strategy)
    pre = core_eval.prefill(model, sample.input_ids, cfg)
    greedy = core_eval.generate(model, tok, sample.input_ids, cfg, 8, pre)["output_ids"]
    f = core_eval.generate(model, tok, sample.input_ids, cfg, 0, pre, forced=greedy)
    assert f["output_ids"] == greedy
    assert f["forced_match"] == [True] * len(greedy)
    assert len(f["forced_logprobs"]) == len(greedy)
    assert all(lp <= 0 for lp in f["forced_logprobs"])
    # A forced token that is not the argmax: a miss there, and a lower log-probability than the
    # argmax had at the same step (same context up to it).
    other = list(greedy)
    other[2] = (greedy[2] + 1) % len(tok)
    g = core_eval.generate(model, tok, sample.input_ids, cfg, 0, pre, forced=other)
    assert g["forced_match"][:2] == [True, True] and g["forced_match"][2] is False
    assert g["forced_logprobs"][:2] == pytest.approx(f["forced_logprobs"][:2])
    assert g["forced_logprobs"][2] < f["forced_logprobs"][2]
    # The prefill stays reusable: a greedy run after the forced ones gives the same answer.
    assert core_eval.generate(model, tok, sample.input_ids, cfg, 8, pre)["output_ids"] == greedy


def test_variant_spec_parses_fields_and_score():
    label, cfg, opts = sweep.parse_variant(
        'd8=dynsplit,tolerance=8,candidates="sentence",score="bound"', "512")
    assert label == "d8" and opts == {}
    assert (cfg.strategy, cfg.tolerance, cfg.candidates, cfg.score, cfg.budget) == \
        ("dynsplit", 8, "sentence", "bound", 512)
    label, cfg, opts = sweep.parse_variant("p=fixed,pin=0.25", "0.125")
    assert opts == {"pin": 0.25} and cfg.strategy == "fixed" and cfg.budget_fraction == 0.125
    for bad in ("1.5", "-0.1", '"half"', "true"):
        with pytest.raises(SystemExit, match="pin"):
            sweep.parse_variant(f"p=fixed,pin={bad}", "0.125")
    with pytest.raises(SystemExit):
        sweep.parse_variant("nolabel", "0.125")
    _, _, opts = sweep.parse_variant('c=fixed,first="compressed"', "0.125")
    assert opts == {"first_token": "compressed"}
    with pytest.raises(SystemExit, match="first"):
        sweep.parse_variant('c=fixed,first="late"', "0.125")


def test_cli_writes_paired_rows_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    argv = ["--model", "tiny-llama", "--task", "passkey", "--context", "1024", "-n", "2",
            "--budget", "0.25", "--variant", "dyn=dynsplit,dense_layers=0",
            "fix=fixed,dense_layers=0", "--pair", "dyn:fix", "--out", str(out)]
    assert sweep.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["dyn@0.25"] * 2 + ["fix@0.25"] * 2 + ["full"] * 2
    full = {r["sample"]: r for r in rows if r["variant"] == "full"}
    # sweep.py takes sample i of the cell's n (as the suite's runs do: the same prompts, ids)
    cell = T.generate("passkey", tiny[1], 1024, 2, 0)
    answers = {s.id: s.answers for s in cell}
    assert sorted(full) == sorted(answers)
    for r in rows:
        assert r["score"] == T.score(tiny[1].decode(r["output_ids"]), answers[r["sample"]])
        if r["variant"] != "full":  # forced on full KV's own answer
            assert len(r["logprobs"]) == len(full[r["sample"]]["output_ids"])
            assert 0 <= r["match"] <= 1 and r["logprob"] <= 0
    table = capsys.readouterr().out
    assert "| dyn − fix @0.25 | score | 2 |" in table
    assert "| dyn − fix @0.25 | first_logprob | 2 |" in table
    # Resume: nothing left to do, no row added.
    assert sweep.main(argv + ["--resume"]) == 0
    assert len(out.read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("strategy", ["dynsplit", "fixed"])
def test_pinned_blocks_are_the_first_steps_best_and_stay_kept(tiny, sample, strategy):
    """core_eval's experimental prior (pin=F): per layer and KV head, the blocks with the
    largest true max q·k at the first compressed step, within F of the block budget, are kept at
    every step; pin=0 leaves the selection as it was."""
    model, tok = tiny
    cfg = _cfg(strategy)
    pre = core_eval.prefill(model, sample.input_ids, cfg)
    seen = {}

    def trace(step, layer, q, k, scale, scores, kept, plan):
        seen.setdefault(layer, []).append((q.clone(), k.clone(), kept.clone(), plan))

    plain = core_eval.generate(model, tok, sample.input_ids, cfg, 6, pre)
    pinned = core_eval.generate(model, tok, sample.input_ids, cfg, 6, pre, pin=0.5, trace=trace)
    again = core_eval.generate(model, tok, sample.input_ids, cfg, 6, pre, pin=0.0)["kept"]
    assert len(again) == len(plain["kept"])
    assert all(torch.equal(a, b) for a, b in zip(again, plain["kept"]))
    starts, lens = (torch.tensor(pinned[key]) for key in ("block_starts", "block_lens"))
    for layer, steps in seen.items():
        q, k, _, plan0 = steps[0]
        hkv = k.shape[1]
        logit = torch.einsum("hgd,thd->htg", q.view(hkv, -1, q.shape[-1]), k).amax(-1)
        best = torch.stack([torch.stack([logit[h, a:a + n].max() for a, n in
                                         zip(starts.tolist(), lens.tolist())])
                            for h in range(hkv)])
        selectable = plan0.clip_len[0] > 0
        room = 0.5 * int(plan0.block_budget[0])
        for h in range(hkv):
            order = [j for j in best[h].argsort(descending=True).tolist() if selectable[j]]
            top, used = [], 0
            for j in order:
                if used + int(lens[j]) > room:
                    break
                top.append(j)
                used += int(lens[j])
            assert top, "the pin must hold at least one block here"
            for _, _, kept, plan in steps:  # every step keeps the first step's best blocks
                assert bool(kept[h, top].all())
                assert int(plan.clip_len[0, top].sum()) <= room


@pytest.mark.parametrize("strategy", ["dynsplit", "fixed"])
def test_sticky_blocks_are_the_previous_steps_kept_in_this_steps_order(tiny, sample, strategy):
    """core_eval's experimental sticky=F: at every step after the first, the blocks the layer
    kept at the step before, taken in this step's score order while their lengths fit F of the
    block budget, are kept again; the first step is the plain selection."""
    model, tok = tiny
    cfg = _cfg(strategy)
    pre = core_eval.prefill(model, sample.input_ids, cfg)
    seen = {}

    def trace(step, layer, q, k, scale, scores, kept, plan):
        seen.setdefault(layer, []).append((scores.clone(), kept.clone(), plan))

    plain = core_eval.generate(model, tok, sample.input_ids, cfg, 6, pre)
    sticky = core_eval.generate(model, tok, sample.input_ids, cfg, 6, pre, sticky=0.5,
                                trace=trace)
    lens = torch.tensor(sticky["block_lens"])
    held_any = False
    for layer, steps in seen.items():
        for (_, kept0, _), (scores, kept, plan) in zip(steps, steps[1:]):
            room = 0.5 * int(plan.block_budget[0])
            selectable = plan.clip_len[0] > 0
            for h in range(kept.shape[0]):
                # scores carry the bonus: recover this step's order among the held candidates
                cand = [j for j in scores[h].argsort(descending=True).tolist()
                        if kept0[h, j] and selectable[j]]
                used, held = 0, []
                for j in cand:
                    if used + int(lens[j]) > room:
                        break
                    held.append(j)
                    used += int(lens[j])
                held_any |= bool(held)
                assert bool(kept[h, held].all())
    assert held_any, "some step must hold blocks of the step before"
    # The first compressed step of every layer is the plain selection's.
    n_layers = len(seen)
    for i in range(n_layers):
        assert torch.equal(sticky["kept"][i], plain["kept"][i])


def test_variant_spec_parses_sticky():
    _, cfg, opts = sweep.parse_variant("s=dynsplit,sticky=0.5", "0.125")
    assert opts == {"sticky": 0.5} and cfg.strategy == "dynsplit"
    with pytest.raises(SystemExit, match="sticky"):
        sweep.parse_variant("s=dynsplit,sticky=2", "0.125")


def test_predecessor_score_is_a_floor_from_selectable_blocks_only():
    """core_eval's experimental neighbor=1: a block scores at least as the block before it,
    unless that block is not selectable (the sink's block must not drag its successor in)."""
    scores = torch.tensor([[[9.0, 1.0, 5.0, 2.0, -1.0]]])
    selectable = torch.tensor([[False, True, True, True, True]])
    out = core_eval._with_predecessor(scores, selectable)
    assert out.tolist() == [[[9.0, 1.0, 5.0, 5.0, 2.0]]]
    assert scores.tolist() == [[[9.0, 1.0, 5.0, 2.0, -1.0]]]  # the input is left as it was
    _, _, opts = sweep.parse_variant("n=fixed,neighbor=1", "0.125")
    assert opts == {"neighbor": 1}


def test_oracle_scores_every_block_by_its_true_max(tiny, sample):
    """core_eval's diagnostic oracle=1: at every step each block scores the largest q·k over its
    keys and the group's query heads, and the selection takes blocks in that order."""
    model, tok = tiny
    cfg = _cfg("dynsplit")
    pre = core_eval.prefill(model, sample.input_ids, cfg)
    seen = []

    def trace(step, layer, q, k, scale, scores, kept, plan):
        seen.append((q.clone(), k.clone(), scores.clone(), kept.clone(), plan))

    out = core_eval.generate(model, tok, sample.input_ids, cfg, 4, pre, oracle=True, trace=trace)
    starts, lens = (out[key] for key in ("block_starts", "block_lens"))
    assert seen
    for q, k, scores, kept, plan in seen:
        hkv = k.shape[1]
        logit = torch.einsum("hgd,thd->htg", q.view(hkv, -1, q.shape[-1]), k).amax(-1)
        for h in range(hkv):
            want = torch.stack([logit[h, a:a + n].max() for a, n in zip(starts, lens)])
            assert torch.allclose(scores[h, :len(starts)], want, rtol=1e-5, atol=1e-5)
            # blocks are taken in score order until one does not fit: a prefix of the order
            sel = plan.clip_len[0, :len(starts)] > 0
            row, held = scores[h, :len(starts)], kept[h, :len(starts)]
            assert bool((held & sel).any()) and bool((~held & sel).any())
            assert float(row[~held & sel].max()) <= float(row[held & sel].min())


def test_refine_one_keeps_the_plain_selection_and_refine_two_runs_the_core_two_stage(tiny,
                                                                                      sample):
    """core_eval's refine (cfg.refine unless given, as the server) is core.select_refined: at
    R = 1 every step keeps the greedy prefix of the gauss scores; at the default R = 2 the trace
    shows the scores the blocks were kept by, each finite one a candidate's exact max q·k over
    its keys and the KV group's query heads, and the kept set differs from the score's alone."""
    from dynsplit_sglang import core
    model, tok = tiny
    cfg = _cfg("dynsplit", refine=DynSplitConfig().refine)
    assert cfg.refine == 2
    pre = core_eval.prefill(model, sample.input_ids, cfg)
    plain = core_eval.generate(model, tok, sample.input_ids, cfg.replace(refine=1), 5, pre)
    one = core_eval.generate(model, tok, sample.input_ids, cfg, 5, pre, refine=1)
    assert one["output_ids"] == plain["output_ids"]
    assert all(torch.equal(a, b) for a, b in zip(one["kept"], plain["kept"]))
    seen = {1: [], 2: []}

    def tracer(r):
        def trace(step, layer, q, k, scale, scores, kept, plan):
            assert torch.equal(kept, core.select(scores[None], plan).blocks[0])
            seen[r].append((step, layer, q.clone(), k.clone(), scores.clone(), kept.clone(),
                            plan))
        return trace

    for r in (1, 2):
        core_eval.generate(model, tok, sample.input_ids, cfg.replace(refine=r), 3, pre,
                           trace=tracer(r))
    plain_first = {layer: kept for step, layer, *_, kept, _ in seen[1] if step == 0}
    changed = finite = 0
    for step, layer, q, k, scores, kept, plan in seen[2]:
        hkv = k.shape[1]
        g = q.shape[0] // hkv
        for h, j in (scores > float("-inf")).nonzero().tolist():
            lo, n = int(plan.clip_start[0, j]), int(plan.clip_len[0, j])
            want = (q[h * g:(h + 1) * g] @ k[lo:lo + n, h].T).max()
            torch.testing.assert_close(scores[h, j], want, rtol=1e-5, atol=1e-4)
            finite += 1
        changed += step == 0 and not torch.equal(kept, plain_first[layer])
    assert finite and changed, "the exact re-ranking must change some step's selection"


def test_fit_window_shrinks_the_recent_window_only_below_sink_plus_recent():
    from dynsplit_sglang.core import DynSplitConfig

    cfg = DynSplitConfig(budget_fraction=1 / 64)  # sink 4, recent 64
    assert sweep.fit_window(cfg, 8192) is cfg  # 128 tokens: room for both
    small = sweep.fit_window(cfg, 4096)  # 64 tokens
    assert small.recent == 30 and small.token_budget(4096) == 64
    assert sweep.fit_window(DynSplitConfig(budget_fraction=1.0), 4096).recent == 64
