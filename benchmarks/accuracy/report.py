"""Markdown table, target check and PNG plots (accuracy vs budget) from a results JSON.

    python benchmarks/accuracy/report.py benchmarks/accuracy/results/quick.json

Writes next to the JSON: ``<stem>.md`` (tables + targets), ``<stem>-<model>.png`` (one panel per
task x context, accuracy vs budget per method) and, for the ``quick``/``full`` runs,
``README-section.md`` (the block the README shows: date, versions, table, plot links).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RIGID = ("fixed", "delimiter", "streaming")
README_STEMS = ("headline", "quick", "full")  # the runs whose table the README shows, by rank
KVPRESS_TARGETS = ("kvpress-chunkkv", "kvpress-snapkv")
ORDER = ("none", "dynsplit", "fixed", "quest", "delimiter", "streaming", "dynsplit-bound",
         "kvpress-snapkv", "kvpress-snapkv-paper", "kvpress-chunkkv", "kvpress-streamingllm")
STYLE = {
    "none": dict(color="black", ls="--", marker=""),
    "dynsplit": dict(color="tab:red", ls="-", marker="o", lw=2.2),
    "fixed": dict(color="tab:blue", ls="-", marker="s"),
    "quest": dict(color="tab:brown", ls="--", marker="s"),
    "dynsplit-bound": dict(color="tab:pink", ls="--", marker="o"),
    "kvpress-snapkv-paper": dict(color="tab:green", ls="-.", marker="d"),
    "delimiter": dict(color="tab:cyan", ls="-", marker="^"),
    "streaming": dict(color="tab:gray", ls="-", marker="v"),
    "kvpress-snapkv": dict(color="tab:green", ls=":", marker="D"),
    "kvpress-chunkkv": dict(color="tab:olive", ls=":", marker="P"),
    "kvpress-streamingllm": dict(color="tab:purple", ls=":", marker="x"),
}


def _frac(b: float) -> str:
    """A budget's label: a fraction of the context (1.0 = full KV) or tokens (> 1)."""
    if b > 1:
        return f"{int(b)} tok"
    return "full" if b == 1 else f"1/{round(1 / b)}"


def _budget_order(b: float) -> tuple:
    return (b > 1, -b)  # full, fractions large to small, then token budgets large to small


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def _method_order(m: str) -> tuple:
    return (ORDER.index(m) if m in ORDER else len(ORDER), m)


def load(path: Path) -> dict:
    """The results JSON, with the path of its per-output records (run.py's <stem>.samples.jsonl)
    under "samples_path" where they are beside it."""
    path = Path(path)
    data = json.loads(path.read_text())
    records = path.with_name(path.stem + ".samples.jsonl")
    if records.exists():
        data["samples_path"] = str(records)
    return data


def _records(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _index(rows):
    acc = {}
    for r in rows:
        acc[(r["model"], r["task"], r["context_len"], r["method"], r["budget"])] = r
    return acc


def resolution(n: int, cells: int) -> str:
    """How far apart two numbers must be to mean something: binomial noise at 50%."""
    se_cell = 100 * (0.25 / n) ** 0.5
    se_mean = se_cell / cells ** 0.5
    return (f"one sample = {100 / n:.0f} points; standard error at 50% accuracy "
            f"±{se_cell:.0f} points per cell, ±{se_mean:.0f} on a {cells}-cell mean")


def tables(data: dict) -> str:
    rows = data["rows"]
    idx = _index(rows)
    out = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        cols = sorted({(r["task"], r["context_len"]) for r in mrows},
                      key=lambda tc: (_task_order(tc[0]), tc[1]))
        ns = sorted({r["n"] for r in mrows})
        out.append(f"**{model}** — accuracy (%) per task and context; "
                   f"n = {ns[0] if len(ns) == 1 else f'{ns[0]}–{ns[-1]}'} samples per cell "
                   f"({resolution(ns[0], len(cols))})\n")
        head = "| method | budget | " + " | ".join(f"{t} {c // 1024}k" for t, c in cols) + " | mean |"
        out += [head, "|" + "---|" * (len(cols) + 3)]
        methods = sorted({r["method"] for r in mrows}, key=_method_order)
        budgets = sorted({r["budget"] for r in mrows}, key=_budget_order)
        for b in budgets:
            for m in methods:
                vals = [idx.get((model, t, c, m, b)) for t, c in cols]
                if not any(vals):
                    continue
                got = [v["accuracy"] for v in vals if v]
                mean = sum(got) / len(got) if len(got) == len(vals) else None
                name = f"**{m}**" if m == "dynsplit" else m
                out.append(f"| {name} | {_frac(b)} | "
                           + " | ".join(_pct(v["accuracy"] if v else None) for v in vals)
                           + f" | {_pct(mean)} |")
        out.append("")
    return "\n".join(out)


def _task_order(t: str) -> int:
    order = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe",
             "code_niah", "niah_multiturn", "twohop")
    return order.index(t) if t in order else len(order)


def targets(data: dict) -> str:
    """The issue's targets, checked per model from the rows (points = accuracy x 100)."""
    rows = data["rows"]
    idx = _index(rows)
    lines = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        cells = sorted({(r["task"], r["context_len"]) for r in mrows})
        budgets = sorted({r["budget"] for r in mrows if r["budget"] < 1}, reverse=True)

        def mean(method, b):
            v = [idx.get((model, t, c, method, b)) for t, c in cells]
            return None if not all(v) else 100 * sum(x["accuracy"] for x in v) / len(v)

        full = mean("none", 1.0)
        lines.append(f"**{model}**\n")
        if 0.125 in budgets and full is not None and mean("dynsplit", 0.125) is not None:
            d = mean("dynsplit", 0.125)
            ok = d >= full - 2
            lines.append(f"- budget 1/8: dynsplit mean {d:.1f} vs full KV {full:.1f} "
                         f"({d - full:+.1f} points; target ≥ −2): **{'met' if ok else 'missed'}**")
        misses, total = [], 0
        for b in budgets:
            for t, c in cells:
                dv = idx.get((model, t, c, "dynsplit", b))
                if not dv:
                    continue
                for m in RIGID:
                    rv = idx.get((model, t, c, m, b))
                    if rv:
                        total += 1
                        if dv["accuracy"] < rv["accuracy"]:
                            misses.append(f"{m} on {t} {c // 1024}k at {_frac(b)} "
                                          f"({100 * (dv['accuracy'] - rv['accuracy']):+.0f})")
        if total:
            lines.append(f"- dynsplit ≥ every rigid strategy in every (task, context, budget) "
                         f"cell: {total - len(misses)}/{total} cells: "
                         f"**{'met' if not misses else 'missed'}**"
                         + (f" — behind in: {'; '.join(misses)}" if misses else ""))
        for b in budgets:
            d = mean("dynsplit", b)
            parts = []
            for m in RIGID + KVPRESS_TARGETS + ("kvpress-streamingllm",):
                v = mean(m, b)
                if d is not None and v is not None:
                    parts.append(f"{m} {v:.1f} ({d - v:+.1f})")
            if d is not None:
                lines.append(f"- budget {_frac(b)} means: dynsplit {d:.1f}; " + ", ".join(parts))
        for b in budgets:
            d = mean("dynsplit", b)
            for m in KVPRESS_TARGETS:
                v = mean(m, b)
                if d is not None and v is not None:
                    lines.append(f"- dynsplit ≥ {m} at {_frac(b)} (mean over cells): "
                                 f"{d:.1f} vs {v:.1f}: **{'met' if d >= v else 'missed'}**")
        lines.append("")
    return "\n".join(lines)


def pooled(data: dict) -> str:
    """Per model: each method's accuracy pooled over every (task, context) sample, per budget;
    then the paired differences of dynsplit against each rigid row (same samples)."""
    rows, out = data["rows"], []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        budgets = sorted({r["budget"] for r in mrows if r["budget"] != 1}, key=_budget_order)
        methods = sorted({r["method"] for r in mrows if r["method"] != "none"},
                         key=_method_order)

        def acc(m, b):
            sel = [r for r in mrows if r["method"] == m and r["budget"] == b]
            n = sum(r["n"] for r in sel)
            return (sum(r["accuracy"] * r["n"] for r in sel) / n, n) if n else (None, 0)

        full, nf = acc("none", 1.0)
        out.append(f"**{model}** — accuracy (%) pooled over tasks and contexts "
                   f"(full KV {_pct(full)}, n = {nf}); budget = K/V tokens attended per KV head "
                   "and decode step\n")
        out += ["| method | " + " | ".join(_frac(b) for b in budgets) + " |",
                "|" + "---|" * (len(budgets) + 1)]
        for m in methods:
            cells = [acc(m, b) for b in budgets]
            name = f"**{m}**" if m == "dynsplit" else m
            out.append(f"| {name} | " + " | ".join(
                f"{_pct(a)} (n={n})" if n else "–" for a, n in cells) + " |")
        pairs = [p for p in data.get("paired", []) if p["model"] == model]
        if pairs:
            out += ["", "| dynsplit − | budget | n | mean (points) | 95% CI | wins / losses |",
                    "|---|---|---|---|---|---|"]
            for p in sorted(pairs, key=lambda p: (_method_order(p["b"]),
                                                  _budget_order(p["budget"]))):
                out.append(f"| {p['b']} | {_frac(p['budget'])} | {p['n']} | {p['mean']:+.1f} | "
                           f"[{p['ci_low']:+.1f}, {p['ci_high']:+.1f}] | "
                           f"{p['wins']} / {p['losses']} |")
        out.append("")
    return "\n".join(out)


MIN_PAIRED = 50  # samples per (model, budget), pooled over tasks and lengths


def headline_targets(data: dict) -> str:
    """The accuracy issue's done-when points, checked from the rows and the paired stats."""
    rows, lines = data["rows"], []
    paired = {(p["model"], p["b"], p["budget"]): p for p in data.get("paired", [])}

    def pooled_acc(model, m, b):
        sel = [r for r in rows if r["model"] == model and r["method"] == m and r["budget"] == b]
        n = sum(r["n"] for r in sel)
        return 100 * sum(r["accuracy"] * r["n"] for r in sel) / n if n else None

    def below_full(model, b):
        """Points by which fixed trails full KV over the (task, context) cells both ran."""
        cell = {(r["task"], r["context_len"], r["method"]): r for r in rows
                if r["model"] == model and (r["method"], r["budget"]) in (("none", 1.0),
                                                                          ("fixed", b))}
        both = [(cell[t, c, "none"], f) for (t, c, m), f in cell.items()
                if m == "fixed" and (t, c, "none") in cell]
        n = sum(f["n"] for _, f in both)
        if not n:
            return None
        return 100 * sum((full["accuracy"] - f["accuracy"]) * f["n"] for full, f in both) / n

    for model in sorted({r["model"] for r in rows}):
        qwen = "qwen" in model
        for b in sorted({r["budget"] for r in rows if r["model"] == model and r["budget"] != 1},
                        key=_budget_order):
            p = paired.get((model, "fixed", b))
            if p is None:
                continue
            lines.append(f"- {model} at {_frac(b)}: {p['n']} paired samples "
                         f"(target ≥ {MIN_PAIRED}): **{'met' if p['n'] >= MIN_PAIRED else 'missed'}**")
            if qwen and b in (0.125, 512):
                ok = p["mean"] >= 3 and p["ci_low"] > 0
                room = below_full(model, b)
                why = ("" if ok or room is None or room >= 3 else
                       f"; fixed is {room:.1f} points below full KV on these cells, so +3 would "
                       f"need dynsplit {3 - room:.1f} points above full KV")
                lines.append(f"- {model} at {_frac(b)}: dynsplit − fixed = {p['mean']:+.1f} "
                             f"points, 95% CI [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}] "
                             f"(target ≥ +3 with the CI above 0): **{'met' if ok else 'missed'}**"
                             f"{why}")
            elif not qwen:
                ok = p["mean"] >= 0
                lines.append(f"- {model} at {_frac(b)}: dynsplit − fixed = {p['mean']:+.1f} "
                             f"points (target: not below): **{'met' if ok else 'missed'}**")
        if qwen:
            d, f = pooled_acc(model, "dynsplit", 0.125), pooled_acc(model, "none", 1.0)
            if d is not None and f is not None:
                lines.append(f"- {model} at 1/8: dynsplit {d:.1f} vs full KV {f:.1f} "
                             f"({d - f:+.1f} points; target within 10): "
                             f"**{'met' if d >= f - 10 else 'missed'}**")
        lines += _repetition_lines(data, model)
        lines += score_only_lines(data, model)
        lines += oracle_lines(data, model)
        fb = data.get("fallback_records", {})
        sg = data.get("meta", {}).get("phases", {}).get(model, {}).get("sglang") or {}
        if model in fb:
            lines.append(f"- {model}: records from batches with a dense fallback {fb[model]} "
                         f"(target 0): **{'met' if not fb[model] else 'missed'}**")
        elif "fallback_rows" in sg:
            lines.append(f"- {model}: dense fallbacks {sg['fallback_rows']} (target 0): "
                         f"**{'met' if not sg['fallback_rows'] else 'missed'}**")
    return "\n".join(lines) + "\n"


# The headline as served before two-stage selection (refine = 1: the gauss score alone), on the
# same prompts: what refine = 2 changed, paired sample for sample.
SCORE_ONLY = Path(__file__).resolve().parent / "results" / "headline-score-only.samples.jsonl"


def score_only_lines(data: dict, model: str, path: Path = SCORE_ONLY) -> list[str]:
    """Per budget: dynsplit and fixed with two-stage selection (this run) against the same
    methods served with the score alone (the earlier run's records at `path`), paired on the
    prompts both answered, and dynsplit − fixed before and after."""
    if not path.exists() or not data.get("samples_path"):
        return []
    from stats import paired_summary

    old = [dict(r, method=r["method"] + "@score") for r in _records(path)
           if r["model"] == model]
    recs = [r for r in _records(data["samples_path"]) if r["model"] == model] + old
    out = []
    for b in sorted({r["budget"] for r in old if r["budget"] != 1}, key=_budget_order):
        parts = []
        for m in ("dynsplit", "fixed"):
            p = paired_summary(recs, model, b, m, m + "@score")
            if p["n"]:
                parts.append(f"{m} {p['mean']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}] "
                             f"({p['wins']} won / {p['losses']} lost, n = {p['n']})")
        if len(parts) < 2:
            continue
        new = paired_summary(recs, model, b, "dynsplit", "fixed")
        was = paired_summary(recs, model, b, "dynsplit@score", "fixed@score")
        out.append(f"- {model} at {_frac(b)}: two-stage selection (refine = 2) against the "
                   f"score alone on the same prompts: " + "; ".join(parts)
                   + f"; dynsplit − fixed {was['mean']:+.1f} → {new['mean']:+.1f}")
    return out


# The diagnosis replay behind the misses (docs/accuracy.md, "The exact block score"): sweep.py
# rows of the same prompts through the pure core with the gauss score and with the exact one
# (oracle=1: every block scored by its true max q·k at every step).
VARIANT_SWEEP = Path(__file__).resolve().parent / "results" / "variants-smollm2-4k.jsonl"


def oracle_lines(data: dict, model: str, path: Path = VARIANT_SWEEP) -> list[str]:
    """What the exact block score says about the misses: whether the split or the score decides
    dynsplit − fixed, and, for each headline output that repeats where full KV's does not,
    whether it still repeats when every block is scored exactly (then the budget, not the
    selection, made it)."""
    from repetition import degenerate  # same detector as the headline's count

    if not path.exists():
        return []
    recs = _records(path)
    recs = [r for r in recs if r.get("model") == model]
    if not recs:
        return []
    by = {(r["sample"], r["variant"]): r for r in recs}
    out = []
    for b in sorted({r["variant"].split("@", 1)[1] for r in recs if "@" in r["variant"]},
                    key=lambda x: _budget_order(float(x))):
        names = [f"{m}@{b}" for m in ("dynsplit", "fixed", "dynsplit-oracle", "fixed-oracle")]
        ids = sorted({s for s, v in by if all((s, n) in by for n in names + ["full"])})
        if not ids:
            continue
        acc = {n: 100 * sum(by[s, n]["score"] for s in ids) / len(ids) for n in names + ["full"]}
        same = sum(by[s, names[2]]["output_ids"] == by[s, names[3]]["output_ids"] for s in ids)
        out.append(
            f"- {model}, split or score? The diagnosis replay (`{_repo_rel(path)}`: pure core, "
            f"{len(ids)} prompts of the suite at {_frac(float(b))}) scores dynsplit "
            f"{acc[names[0]]:.1f} and fixed {acc[names[1]]:.1f} with the gauss block score; "
            f"with the exact one (true max q·k per block, every step) dynsplit "
            f"{acc[names[2]]:.1f} and fixed {acc[names[3]]:.1f} (full KV {acc['full']:.1f}), "
            f"with token-identical outputs on {same} of {len(ids)} prompts. At this budget the "
            f"split does not decide the accuracy; the block score's error does."
            + _refine_clause(by, ids, b))
        deg = {(d["method"], d["budget"]): d for d in data.get("degenerate", [])
               if d["model"] == model}
        looped = sorted({s for (m, _), d in deg.items() if m == "dynsplit"
                         for s in d["added_samples"]})
        traced = []
        for s in looped:
            if (s, names[2]) not in by:
                continue
            still = [m for m, n in (("dynsplit", names[2]), ("fixed", names[3]))
                     if degenerate(by[s, n]["output"])]
            traced.append((s, still))
        if traced:
            parts = [f"{s}: still repeats with the exact score ({', '.join(st)})" if st else
                     f"{s}: no repetition with the exact score" for s, st in traced]
            bad = [s for s, st in traced if not st]
            out.append(f"- {model}: the repeating outputs, replayed with the exact block score "
                       f"at {_frac(float(b))}: " + "; ".join(parts) + ". Traced to the selection's "
                       f"score: {len(bad)} of {len(traced)} (target 0): "
                       f"**{'met' if not bad else 'missed'}**")
    return out


def _refine_clause(by: dict, ids: list, b: str) -> str:
    """The two-stage selection's accuracy on the same prompts, where the replay has it."""
    names = [f"{m}-refine2@{b}" for m in ("dynsplit", "fixed")]
    if not all((s, n) in by for s in ids for n in names):
        return ""
    d, f = (100 * sum(by[s, n]["score"] for s in ids) / len(ids) for n in names)
    return (f" Re-ranking the gauss score's candidates for twice the budget by their exact max "
            f"(core.select_refined, the server's default since): dynsplit {d:.1f}, fixed {f:.1f}.")


def _repetition_lines(data: dict, model: str) -> list[str]:
    """dynsplit's outputs that repeat degenerately where full KV's output on the same prompt does
    not (repetition.py on the text; fixed beside it): a stricter check than the issue's "none
    that the diagnosis traces to selection" — each one listed is a case to trace."""
    deg = {(d["method"], d["budget"]): d for d in data.get("degenerate", [])
           if d["model"] == model}
    cells = sorted((b for m, b in deg if m == "dynsplit"), key=_budget_order)
    if not cells:
        return []
    full = deg.get(("none", 1.0))
    parts = []
    for b in cells:
        d, f = deg[("dynsplit", b)], deg.get(("fixed", b))
        parts.append(f"{_frac(b)} {d['added']}/{d['judged']}"
                     + (f" (fixed {f['added']})" if f else ""))
    added = sorted({s for b in cells for s in deg[("dynsplit", b)]["added_samples"]})
    total = sum(deg[("dynsplit", b)]["added"] for b in cells)
    return [f"- {model}: dynsplit outputs with a degenerate repetition that full KV's output on "
            f"the same prompt does not have, of those full KV answered (full KV itself repeats in "
            f"{full['degenerate'] if full else '?'}/{full['n'] if full else '?'}): "
            + ", ".join(parts)
            + (f"; samples: {', '.join(added)}" if added else "")
            + f" (target 0): **{'met' if total == 0 else 'missed'}**"]


def plots(data: dict, json_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    idx = _index(rows)
    out = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        task_list = sorted({r["task"] for r in mrows}, key=_task_order)
        ctxs = sorted({r["context_len"] for r in mrows})
        budgets = sorted({r["budget"] for r in mrows if r["budget"] < 1})
        if not budgets:
            continue
        methods = sorted({r["method"] for r in mrows if "(" not in r["method"]
                          and r["method"] != "none"}, key=_method_order)
        fig, axes = plt.subplots(len(ctxs), len(task_list), squeeze=False, sharey=True,
                                 figsize=(3.6 * len(task_list) + 2.2, 2.9 * len(ctxs) + 0.6))
        for i, c in enumerate(ctxs):
            for j, t in enumerate(task_list):
                ax = axes[i][j]
                full = idx.get((model, t, c, "none", 1.0))
                if full:
                    ax.axhline(100 * full["accuracy"], **{k: v for k, v in STYLE["none"].items()
                                                         if k != "marker"}, label="full KV")
                for m in methods:
                    pts = [(b, idx[(model, t, c, m, b)]["accuracy"]) for b in budgets
                           if (model, t, c, m, b) in idx]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, [100 * y for y in ys], label=m, **STYLE.get(m, {}))
                ax.set_xscale("log", base=2)
                ax.set_xticks(budgets)
                ax.set_xticklabels([_frac(b) for b in budgets])
                ax.set_ylim(-5, 105)
                ax.grid(alpha=0.3)
                ax.set_title(f"{t}, {c // 1024}k", fontsize=10)
                if j == 0:
                    ax.set_ylabel("accuracy (%)")
                if i == len(ctxs) - 1:
                    ax.set_xlabel("KV budget (fraction of context)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=9)
        meta = data.get("meta", {})
        n = sorted({r["n"] for r in mrows})
        fig.suptitle(f"{model}: accuracy vs KV budget (n={n[0] if len(n) == 1 else n}, "
                     f"{meta.get('date', '')})", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1 - 2.1 / fig.get_figwidth(), 0.95))
        path = json_path.with_name(f"{json_path.stem}-{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _repo_rel(p: Path) -> str:
    here = Path(__file__).resolve().parents[2]
    try:
        return str(p.resolve().relative_to(here))
    except ValueError:
        return str(p)


def _selection_sentence(defaults: dict) -> str:
    """Which block selection the run's block strategies used (runs before two-stage selection
    record no refine: the score alone)."""
    r = defaults.get("refine", 1)
    if r > 1:
        return (f"Block selection: two-stage (refine = {r:g}: the summary score nominates "
                f"blocks for {r:g}x the budget, their keys' exact max q·k picks the budget), for "
                "dynsplit, fixed and delimiter alike.")
    return "Block selection: the summary score alone (refine = 1)."


def header(data: dict) -> str:
    meta = data.get("meta", {})
    v = meta.get("versions", {})
    cfg = meta.get("config", {})
    phases = meta.get("phases", {})
    wall = meta.get("wall_s_total") or meta.get("wall_s_this_invocation")
    lines = [
        f"Generated by `{meta.get('command', 'benchmarks/accuracy/run.py')}` on {meta.get('date')}"
        f" ({meta.get('machine', {}).get('cpus')} CPU cores, no GPU"
        + (f"; wall time {wall / 60:.0f} min" if wall else "") + ").",
        f"Versions: dynsplit-sglang {v.get('dynsplit-sglang')} (git {v.get('git')}), "
        f"SGLang {v.get('sglang')}, torch {v.get('torch')}, transformers {v.get('transformers')}"
        + (f"; kvpress {v['kvpress']} (own venv, transformers "
           f"{v.get('transformers (kvpress venv)')})" if v.get("kvpress") else "") + ".",
        f"Tasks generated locally (seed {cfg.get('seed')}): see `benchmarks/accuracy/tasks.py`; "
        "score = fraction of expected strings found verbatim in the greedy output. "
        "Budget = KV tokens attended per KV head per compressed layer, as a fraction of the "
        f"context (sink + recent included; the first {cfg.get('dynsplit_defaults', {}).get('dense_layers')} "
        "layers stay dense on both sides). DynSplit and the rigid baselines run through one "
        "SGLang server (per-request overrides, each prompt prefilled once); kvpress presses "
        "compress the whole prompt (context + question) after one shared dense prefill. "
        + _selection_sentence(cfg.get("dynsplit_defaults", {})),
    ]
    for model, ph in phases.items():
        sg = ph.get("sglang") or {}
        fell = sg.get("fallback_rows", (sg.get("counters") or {}).get("fallback_rows", 0))
        if fell:
            lines.append(f"**Caveat ({model}): {fell} compressed SGLang requests fell back to "
                         "dense attention (block store full)**; their batches are flagged per "
                         "sample (`fallback_rows_in_batch` in the samples file).")
        agree = ph.get("full_kv_agreement")
        if agree:
            lines.append(f"Full-KV cross-check ({model}): SGLang and HF transformers give the same "
                         f"output text on {100 * agree['same_text']:.0f}% of {agree['n']} prompts.")
    return "\n".join(lines)


def write(json_path: Path) -> dict:
    json_path = Path(json_path)
    data = load(json_path)
    pngs = plots(data, json_path)
    body = tables(data)
    tgt = targets(data)
    if data.get("meta", {}).get("mode") == "headline":
        body = pooled(data) + "\n### Per task and context\n\n" + body
        tgt = headline_targets(data)
    md = (f"# Accuracy: {json_path.stem}\n\n{header(data)}\n\n{body}\n## Targets\n\n{tgt}\n"
          + "".join(f"![{p.stem}]({p.name})\n" for p in pngs))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(md)
    section = (f"### Accuracy ({data.get('meta', {}).get('mode', json_path.stem)} mode)\n\n"
               f"{header(data)}\n\n{body}\n{tgt}\n"
               + "".join(f"![{p.stem}]({_repo_rel(p)})\n" for p in pngs)
               + f"\nFull results: [`{_repo_rel(json_path)}`]({_repo_rel(json_path)}), "
                 f"details in [`{_repo_rel(md_path)}`]({_repo_rel(md_path)}).\n")
    # Side runs (ablations, ...) never replace it; a lower-ranked run not when a higher exists.
    if json_path.stem in README_STEMS and not any(
            (json_path.parent / f"{s}.json").exists()
            for s in README_STEMS[:README_STEMS.index(json_path.stem)]):
        (json_path.parent / "README-section.md").write_text(section)
    return {"md": md_path, "pngs": pngs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    args = ap.parse_args(argv)
    out = write(args.results)
    print(out["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
