"""Paired sweep of method variants through the pure core (no server): one dense prefill per
prompt, every variant decodes from it, scores per sample, paired differences against a reference.

The tool behind the "Variants tried" table of docs/accuracy.md: a variant is kept only if it wins
on paired samples, and a change to the shared selection is measured on `fixed` too.

    python benchmarks/accuracy/sweep.py --model smollm2-135m-instruct --context 4096 -n 4 \\
        --variant dyn=dynsplit fix=fixed dyn8=dynsplit,tolerance=8 \\
        --pair dyn:fix dyn8:fix --budget 0.125 --out /tmp/sweep.jsonl

A variant is LABEL=STRATEGY[,FIELD=JSON...] (any DynSplitConfig field, refine=R included, or
pin=F / sticky=F / neighbor=1 / oracle=1: core_eval's experimental options, not in the server;
first="compressed" or "dense": where the first answer token comes from (default dense);
refine=1 is the score alone, the selection before two-stage selection shipped). Where a budget is
below sink + recent at a prompt's length, every variant's recent window shrinks to half the budget
less the sink (``fit_window``; rows record ``recent``). Rows go to --out as
JSON lines as they finish; --resume skips the (sample, variant) pairs already there. Only the
first turn of multi-turn samples is scored. The first answer token comes from the dense
prefill, as the server serves every prompt (a variant's first="compressed" feeds the prompt's last
token as the first decode step instead: a stricter, diagnostic rule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_eval  # noqa: E402
import diagnose as D  # noqa: E402
import stats  # noqa: E402
import tasks as T  # noqa: E402

from dynsplit_sglang.core import DynSplitConfig  # noqa: E402


def parse_variant(spec: str, budget: str) -> tuple[str, DynSplitConfig, dict]:
    """(label, config, options of core_eval.generate: pin / sticky / neighbor / oracle, its
    experimental options; refine is a config field)."""
    label, _, rest = spec.partition("=")
    strategy, *fields = rest.split(",")
    if not label or not strategy:
        raise SystemExit(f"--variant {spec!r}: expected LABEL=STRATEGY[,FIELD=JSON...]")
    over = {k: json.loads(v) for k, v in (f.split("=", 1) for f in fields)}
    opts = {k: over.pop(k) for k in ("pin", "sticky", "neighbor", "oracle") if k in over}
    if "first" in over:  # the first answer token: compressed (the server's rule) or dense
        opts["first_token"] = over.pop("first")
        if opts["first_token"] not in ("compressed", "dense"):
            raise SystemExit(f"--variant {spec!r}: first={opts['first_token']!r}, expected "
                             '"compressed" or "dense"')
    for k, f in opts.items():
        if k == "first_token":
            continue
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise SystemExit(f"--variant {spec!r}: {k}={f!r}, expected a number in [0, 1]")
    return label, D.method_cfg(strategy, budget, over.pop("score", "gauss"), over), opts


def fit_window(cfg: DynSplitConfig, context_len: int) -> DynSplitConfig:
    """cfg, with its recent window shrunk to (budget - sink) / 2 where the budget at this context
    is smaller than sink + recent (1/64 of 4k is 64 tokens against 4 + 64): every method at
    that budget alike, so the budget stays the budget (the config clamps it up otherwise) and
    half of what is left past the sink goes to selected blocks."""
    want = cfg.budget if cfg.budget is not None else int(cfg.budget_fraction * context_len)
    if want >= cfg.sink + cfg.recent:
        return cfg
    return cfg.replace(recent=max(1, (want - cfg.sink) // 2))


def run(args) -> list[dict]:
    parsed = [(b, *parse_variant(v, b)) for b in args.budget for v in args.variant]
    labels = [f"{lab}@{b}" for b, lab, _, _ in parsed]
    variants = [cfg for _, _, cfg, _ in parsed]
    options = dict(zip(labels, [opts for *_, opts in parsed]))
    rows = []
    if args.resume and args.out.exists():
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    done = {(r["sample"], r["variant"]) for r in rows}
    model, tok = D.load_model(args.model)
    # Sample-major: a run stopped part-way has covered every task alike.
    todo = [(t, c, i) for c in args.context for i in range(args.samples) for t in args.task]
    made = {}  # (task, context) -> its n samples: sample i of n is a prompt of its own (ids)
    t0 = time.time()
    with (args.out.open("a") if args.out else open("/dev/null", "w")) as fh:
        for k, (task, ctx, i) in enumerate(todo):
            if (task, ctx) not in made:
                made[task, ctx] = T.generate(task, tok, ctx, args.samples, args.seed)
            s = made[task, ctx][i]
            if all((s.id, lab) in done for lab in labels + ["full"]):
                continue
            pre = D.Prefills(model, s.input_ids, variants)
            work = [("full", variants[0].replace(budget_fraction=1.0, budget=None))]
            work += list(zip(labels, variants))
            full_ids = next((r["output_ids"] for r in rows
                             if r["sample"] == s.id and r["variant"] == "full"), None)
            for lab, cfg in work:
                if (s.id, lab) in done:
                    continue
                cfg = fit_window(cfg, len(s.input_ids))
                opts = options.get(lab, {})
                out = core_eval.generate(model, tok, s.input_ids, cfg, s.max_new_tokens,
                                         pre.get(cfg), **opts)
                text = tok.decode(out["output_ids"])
                row = dict(sample=s.id, model=args.model, task=task, context_len=ctx, variant=lab,
                           score=T.score(text, s.answers), output=text[:120],
                           output_ids=out["output_ids"], tokens_attended=out["tokens_attended"],
                           recent=cfg.recent)
                if lab == "full":
                    full_ids = out["output_ids"]
                elif args.forced and full_ids:
                    f = core_eval.generate(model, tok, s.input_ids, cfg, 0, pre.get(cfg),
                                           forced=full_ids, **opts)
                    lp = f["forced_logprobs"]
                    row.update(logprob=sum(lp) / len(lp), match=sum(f["forced_match"]) / len(lp),
                               first_logprob=lp[0], logprobs=[round(x, 4) for x in lp])
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            mine = {r["variant"]: r["score"] for r in rows if r["sample"] == s.id}
            print(f"[{k + 1}/{len(todo)} {time.time() - t0:.0f}s] {s.id}: "
                  + " ".join(f"{lab} {mine.get(lab, float('nan')):.2f}"
                             for lab in ["full"] + labels),
                  file=sys.stderr, flush=True)
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def summary(rows: list[dict], pairs: list[str]) -> str:
    """Accuracy, teacher-forced agreement with full KV (match: fraction of full KV's tokens that
    stay the argmax; logprob: their mean log-probability) and paired differences."""
    by = defaultdict(list)
    for r in rows:
        by[r["variant"]].append(r)
    lines = ["| variant | n | accuracy (%) | match full (%) | logprob of full |",
             "|---|---|---|---|---|"]
    lines += [f"| {v} | {len(rs)} | {100 * _mean([r['score'] for r in rs]):.1f} | "
              f"{100 * _mean([r.get('match') for r in rs]):.1f} | "
              f"{_mean([r.get('logprob') for r in rs]):.3f} |" for v, rs in sorted(by.items())]
    if pairs:
        lines += ["", "| a − b | measure | n | mean (×100) | 95% CI (×100) | wins / losses |",
                  "|---|---|---|---|---|---|"]
    for p in pairs:
        a, b = p.split(":")
        for suffix in sorted({v.split("@", 1)[1] for v in by if "@" in v}):
            for measure in ("score", "match", "logprob", "first_logprob"):
                recs = [dict(sample=r["sample"], model="m", budget=0, method=r["variant"],
                             score=r[measure]) for r in rows if r.get(measure) is not None]
                s = stats.paired_summary(recs, "m", 0, f"{a}@{suffix}", f"{b}@{suffix}")
                if s["n"]:
                    lines.append(f"| {a} − {b} @{suffix} | {measure} | {s['n']} | "
                                 f"{s['mean']:+.1f} | "
                                 f"[{s['ci_low']:+.1f}, {s['ci_high']:+.1f}] | "
                                 f"{s['wins']} / {s['losses']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", nargs="+", default=[t for t in T.TASKS if t != "passkey"],
                    choices=T.TASKS)
    ap.add_argument("--context", nargs="+", type=int, default=[4096])
    ap.add_argument("-n", "--samples", type=int, default=4, help="samples per (task, context)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", nargs="+", default=["0.125"], help="fractions (<= 1) or tokens")
    ap.add_argument("--variant", nargs="+", required=True, help="LABEL=STRATEGY[,FIELD=JSON...]")
    ap.add_argument("--pair", nargs="*", default=[], help="A:B paired differences to report")
    ap.add_argument("--out", type=Path, help="JSON lines, one per (sample, variant)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-forced", dest="forced", action="store_false",
                    help="skip the teacher-forced agreement with full KV")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.report_only:
        rows = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()]
    else:
        rows = run(args)
    print(summary(rows, args.pair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
