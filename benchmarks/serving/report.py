"""Plots and the README performance section from the serving benchmark's JSON.

    python benchmarks/serving/report.py benchmarks/serving/results/quick.json \
        [--profile benchmarks/serving/results/profile-decode.json] \
        [--bench-serving benchmarks/serving/results/bench-serving.json] [--out-dir DIR]

Writes, next to the JSON (or in --out-dir):
* ``<stem>-decode.png``: the decode probe, decode tokens/s vs context (median, min-max bars) and
  the paired ratio against dense, with the targets;
* ``<stem>-concurrency.png``: the agent cells' output tokens/s (includes TTFT), per-request decode
  tokens/s, TTFT p50 and TPOT p50 vs concurrency (medians over the repeats), one column per
  shared-prefix length, one line per configuration;
* ``<stem>-context.png``: the same vs shared-prefix length, one column per concurrency;
* ``README-section.md``: the README's "Performance" section: the target checks, the decode
  table, SGLang's bench_serving table (``bench_serving.py``'s JSON, default
  ``bench-serving.json`` beside the input, if present), the decode-time profile of
  ``profile_decode.py`` (if present) and the agent cells.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # appended: other benchmarks have a `run` and a `report` too
    sys.path.append(str(HERE))

import serving_stats as st  # noqa: E402

REPO = HERE.parents[1]
SPEED_TARGET, SPEED_AT, BREAK_EVEN_AT = 2.0, 8192, 2048  # the done-when


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _med(row, key):
    s = row.get(key)
    return s["median"] if isinstance(s, dict) else s


def _range(s, nd=1) -> str:
    """'median (min–max)' of a serving_stats.spread."""
    if not s:
        return "–"
    return f"{s['median']:.{nd}f} ({s['min']:.{nd}f}–{s['max']:.{nd}f})"


def _iqr(s) -> str:
    if not s:
        return "–"
    rel = f" ({s['rel_iqr']:.0%})" if s.get("rel_iqr") is not None else ""
    return f"{s['iqr']:.2f}{rel}"


def _ratio(row, metric, paired=True) -> str:
    vs = (row.get("vs_dense") or {}).get(metric)
    if not vs:
        return "baseline" if st.is_dense(row) else "–"
    if not paired:
        return f"{vs['ratio_of_medians']:.2f}x" if vs["ratio_of_medians"] else "–"
    p = vs["paired"]
    return f"{p['median']:.2f}x [{p['min']:.2f}–{p['max']:.2f}]" if p else "–"


def _order(row) -> tuple:
    return (-row["budget"], row["config"])


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


# -- plots ----------------------------------------------------------------------------------------

CELL_PLOTS = [("output_tok_per_s", "output tok/s (incl. TTFT)"),
              ("decode_tok_per_s_p50", "decode tok/s per request"),
              ("ttft_ms_p50", "TTFT p50 (ms)"), ("tpot_ms_p50", "TPOT p50 (ms/token)")]


def plot_vs(rows, x_key, group_key, title_fmt, path: Path, subtitle: str) -> None:
    groups = sorted({r[group_key] for r in rows})
    cfgs = sorted({r["label"]: r for r in rows}.values(), key=_order)
    fig, axes = plt.subplots(len(CELL_PLOTS), len(groups), figsize=(4.2 * len(groups), 11),
                             squeeze=False, sharex="col")
    for j, g in enumerate(groups):
        for i, (key, name) in enumerate(CELL_PLOTS):
            ax = axes[i][j]
            for c in cfgs:
                pts = sorted((r[x_key], _med(r, key)) for r in rows
                             if r[group_key] == g and r["label"] == c["label"]
                             and _med(r, key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=c["label"])
            if i == 0:
                ax.set_title(title_fmt.format(g))
            if j == 0:
                ax.set_ylabel(name)
            if i == len(CELL_PLOTS) - 1:
                ax.set_xlabel(x_key.replace("_", " "))
            ax.set_xticks(sorted({r[x_key] for r in rows}))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(subtitle + "; medians over the repeats", 30 * len(groups) + 20),
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(decode, path: Path, subtitle: str) -> None:
    if not decode:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(sorted({r["label"]: r for r in decode}.values(), key=_order)):
        color = colors[i % len(colors)]  # the same in both panels
        rows = sorted((r for r in decode if r["label"] == c["label"]), key=lambda r: r["context"])
        xs = [r["context"] for r in rows]
        s = [r["decode_tok_per_s"] for r in rows]
        med = [x["median"] for x in s]
        ax.errorbar(xs, med, yerr=[[m - x["min"] for m, x in zip(med, s)],
                                   [x["max"] - m for m, x in zip(med, s)]],
                    marker="o", capsize=3, label=c["label"], color=color)
        pr = [((r.get("vs_dense") or {}).get("decode_tok_per_s") or {}).get("paired")
              for r in rows]
        pts = [(x, p) for x, p in zip(xs, pr) if p]
        if pts:
            bx.errorbar([x for x, _ in pts], [p["median"] for _, p in pts],
                        yerr=[[p["median"] - p["min"] for _, p in pts],
                              [p["max"] - p["median"] for _, p in pts]],
                        marker="o", capsize=3, label=c["label"], color=color)
    ax.set_xlabel("context (prompt + output tokens)")
    ax.set_ylabel("decode tok/s, 1 request (median, min–max)")
    bx.axhline(1.0, color="#888", lw=1)
    bx.axhline(SPEED_TARGET, ls="--", color="#c33", lw=1,
               label=(f"target {SPEED_TARGET}x at {SPEED_AT} (1/8)"
                      if any(r["context"] == SPEED_AT for r in decode)
                      else f"{SPEED_TARGET}x (the target's ratio, for reference)"))
    bx.set_xlabel("context (prompt + output tokens)")
    bx.set_ylabel("paired ratio vs dense, same round")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xticks(sorted({r["context"] for r in decode}))
        a.set_xticklabels([str(c) for c in sorted({r["context"] for r in decode})])
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(textwrap.fill(subtitle, 120), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- README section -------------------------------------------------------------------------------


def protocol_line(m: dict) -> str:
    p = m.get("protocol") or {}
    n, c = p.get("decode_repeats"), p.get("cell_repeats")
    line = (f"Protocol: every server is up for the whole run (sleeping when idle); "
            f"{p.get('interleaving', '')}"
            + (f"; servers started in the order {', '.join(m['start_order'])} (the dense "
               "baseline last: on this host a server started first decoded 1.4–3.5% slower in "
               "A/A runs)" if m.get("start_order") else
               "; the dense baseline's server was started first (runs before 2026-11-29, late "
               "evening), which favours the compressed rows by about 1.4–3.5% on this host")
            + f". Decode probe: {n} timed repeats per cell"
            + ("" if p.get("decode_meets_protocol") else
               f" — **below the protocol's {p.get('min_repeats')} repeats: not a valid result**")
            + ".")
    if c:
        line += (f" Agent cells: {c} repeats"
                 + ("." if p.get("cells_meet_protocol") else
                    f" (fewer than {p.get('min_repeats')}, to keep the quick run under 30 min: "
                    "their spread is indicative; the decode probe is the headline)."))
    return line


def target_lines(decode: list[dict]) -> list[str]:
    checks = st.target_checks(decode, break_even_at=BREAK_EVEN_AT, speed_at=SPEED_AT,
                              speed_target=SPEED_TARGET)
    lines = ["**Targets** (decode probe, one request, decode only; dynsplit at budget 1/8):", ""]
    for c in checks:
        val = "not measured" if c["value"] is None else (
            f"median paired ratio {c['value']:.2f}x over {c['n']} rounds"
            + (f", ratio of medians {c['ratio_of_medians']:.2f}x"
               if c.get("ratio_of_medians") is not None else "")
            + f" (threshold {c['threshold']:.2f}x)")
        lines.append(f"* {c['name']}: **{c['verdict']}** — {val}; baseline: {c['baseline']}; "
                     f"{c['definition']}.")
    be = st.break_even_context(decode, "dynsplit", 0.125)
    ctxs = sorted(be["verdicts"])
    if ctxs:
        where = ("not reached at any measured context" if be["context"] is None else
                 f"≤ {be['context']} (not slower within noise at every measured context)"
                 if be["at_smallest"] else
                 f"between {ctxs[ctxs.index(be['context']) - 1]} and {be['context']}")
        lines.append(f"* Break-even of dynsplit@1/8 vs dense (decode tok/s, within noise as "
                     f"above): {where}; measured at {', '.join(map(str, ctxs))}.")
    lines.append("")
    return lines


def decode_table(decode: list[dict]) -> list[str]:
    d0 = decode[0]
    lines = [
        f"**Decode probe** (one request, {d0['output_tokens']} output tokens; the prompt was "
        "prefilled by an untimed warm-up, so every timed repeat is a radix hit and measures "
        "decode only: tok/s from the first to the last streamed token; TTFT apart). Both ratios "
        "have the baseline none (dense) at the same context: ratio of medians = median(config) / "
        "median(dense); paired = repeat r / dense repeat r of the same round, median [range].",
        "",
        "| context | config | repeats | decode tok/s median (min–max) | IQR (rel.) | TPOT ms "
        "median | vs dense: ratio of medians | vs dense: paired | TTFT ms (cached prompt) | "
        "prefill TTFT ms (warm-up) | uncached prompt tokens (max) | K/V rows read per step "
        "per KV head |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(decode, key=lambda r: (r["context"], _order(r))):
        unc = r.get("uncached_tokens") or {}
        att = r.get("kv_tokens_read_per_head")
        lines.append(
            f"| {r['context']} | {r['label']} | {r['n']} | {_range(r['decode_tok_per_s'])} | "
            f"{_iqr(r['decode_tok_per_s'])} | {_fmt(_med(r, 'tpot_ms'))} | "
            f"{_ratio(r, 'decode_tok_per_s', paired=False)} | {_ratio(r, 'decode_tok_per_s')} | "
            f"{_fmt(_med(r, 'ttft_ms'), 0)} | {_fmt(r.get('prefill_ttft_ms'), 0)} | "
            f"{_fmt(unc.get('max'), 0)}{'' if r.get('radix_hit_ok') else ' (not a full hit)'} | "
            f"{_fmt(att, 0) if att else r['prompt_tokens'] if st.is_dense(r) else '–'} |")
    lines.append("")
    return lines


def cells_table(data: dict) -> list[str]:
    m, rows = data["meta"], data["rows"]
    lines = [
        f"**Agent workload** (N concurrent agent sessions x {m['turns']} turns, an SGLang "
        f"frontend program, over a shared system/tool prefix of `context_len` tokens; each turn "
        f"appends a ~{m['obs_tokens']}-token tool observation and generates "
        f"{m['output_tokens']} tokens; new sessions every repeat, the same text for every "
        "configuration). Values: median (min–max) over the repeats. Output tok/s = all "
        "completion tokens / wall time of the cell: it **includes TTFT and prefill**; decode "
        "tok/s = per request, 1000 / TPOT (TTFT excluded), median over the cell's requests; "
        "paired = repeat r / dense repeat r of the same round (baseline none at the same "
        "context_len and concurrency).",
        "",
        "| context_len | concurrency | config | repeats | output tok/s (incl. TTFT) | "
        "decode tok/s per request | decode vs dense: paired | TTFT p50 ms | TPOT p50 ms | "
        "radix hit rate | KV slots in use |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["context_len"], r["concurrency"], _order(r))):
        lines.append(
            f"| {r['context_len']} | {r['concurrency']} | {r['label']} | {r['n']} | "
            f"{_range(r['output_tok_per_s'])} | {_range(r['decode_tok_per_s_p50'])} | "
            f"{_ratio(r, 'decode_tok_per_s_p50')} | {_range(r['ttft_ms_p50'], 0)} | "
            f"{_fmt(_med(r, 'tpot_ms_p50'))} | {_fmt(_med(r, 'radix_hit_rate'), 3)} | "
            f"{_fmt((r.get('kv_slots_in_use') or {}).get('max'), 0)} |")
    lines.append("")
    return lines


def bench_serving_table(b: dict, path: Path) -> list[str]:
    m = b["meta"]
    g = m["bench"]
    lines = [
        f"**SGLang's own `bench_serving`** (`python -m sglang.benchmark.serving`, generated "
        f"shared-prefix multi-turn dataset: {g['gsp_num_groups']} groups x "
        f"{g['gsp_prompts_per_group']} conversations, system prompt {g['gsp_system_prompt_len']} "
        f"tokens, {g['gsp_num_turns']} turns of a {g['gsp_question_len']}-token question and "
        f"{g['gsp_output_len']} output tokens, max concurrency {g['max_concurrency']}; prefix "
        f"cache flushed before every run; driven by `bench_serving.py`, "
        f"`{_rel(path)}`; {m['repeats']} interleaved runs per server"
        + ("" if m["protocol"]["meets_protocol"] else
           " — **below the protocol's 5 repeats: not a valid result**")
        + f"; {m['wall_s'] / 60:.1f} min, 1-min load {_fmt(m['load_avg_1m'].get('median'))}). "
        "Median (min–max) over the runs; output tok/s **includes TTFT and prefill**; decode "
        "tok/s = 1000 / bench_serving's median TPOT; paired = run r / dense run r of the same "
        "round (baseline none).",
        "",
        "| config | runs | output tok/s (incl. TTFT) | output vs dense: paired | median TPOT "
        "ms | decode tok/s | decode vs dense: paired | median TTFT ms | cache hit rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(b["rows"], key=_order):
        lines.append(
            f"| {r['label']} | {r['n']} | {_range(r['output_throughput'])} | "
            f"{_ratio(r, 'output_throughput')} | {_range(r['median_tpot_ms'])} | "
            f"{_range(r['decode_tok_per_s'])} | {_ratio(r, 'decode_tok_per_s')} | "
            f"{_range(r['median_ttft_ms'], 0)} | {_fmt(_med(r, 'cache_hit_rate'), 3)} |")
    cmd = m["reproduce_command"]
    lines += ["", "Reproduce one run against a server of your own (`bench-serving.json` has the "
                  "exact server and bench_serving command lines per configuration):", "",
              "```bash", cmd, "```", ""]
    if m.get("datasets_standin"):
        lines += ["(This host's venv has no Hugging Face `datasets`, which the module imports "
                  "for other datasets; `bench_serving.py` ran it unchanged under a stand-in "
                  "`datasets` module.)", ""]
    return lines


def selection_note(meta: dict) -> str:
    """Which block selection the run's compressed servers ran (runs before two-stage selection
    record no refine: the score alone)."""
    r = meta.get("dynsplit_refine")
    if r is None:
        return ("block selection: the summary score alone (refine = 1; recorded before two-stage "
                "selection became the default)")
    return f"block selection: two-stage, refine = {r:g}" if r > 1 else \
        "block selection: the summary score alone (refine = 1)"


def long_context_lines(long, long_path: Path) -> list[str]:
    """The decode probe of a second run at the contexts the default model cannot take (16k,
    32k with a 32k-context model), same protocol and table."""
    m = long["meta"]
    la = m.get("load_avg_1m", {})
    plot = long_path.with_name(f"{long_path.stem}-decode.png")  # run.py's report wrote it
    cmd = m.get("command") or f"python benchmarks/serving/run.py --out {_rel(long_path)}"
    return [f"**Long contexts** (`{_rel(long_path)}`): model {m['model']}, the same server "
            f"options and protocol ({m['protocol']['decode_repeats']} interleaved rounds); "
            f"whole run {m['wall_s'] / 60:.1f} min, 1-min load average {_fmt(la.get('min'))}–"
            f"{_fmt(la.get('max'))}; {selection_note(m)}.", "", "```bash", cmd, "```", ""] + decode_table(long["decode"]) + (
        [f"![{plot.stem}]({_rel(plot)})", ""] if plot.exists() else [])


def section(data, profile, pngs, json_path: Path, bench=None, bench_path=None,
            before=None, long=None, long_path=None) -> str:
    m = data["meta"]
    decode = data["decode"]
    la = m.get("load_avg_1m", {})
    lines = [
        f"### Serving ({'quick' if m['quick'] else 'full'} mode)",
        "",
        f"Serving benchmark (`benchmarks/serving/`, generated from `{_rel(json_path)}` by "
        "`report.py`): SGLang 0.5.23 on "
        f"{m['machine']} ({m['device']}, `{m['attention_backend']}`, {m['dtype']}), "
        f"model {m['model']}; one server per configuration; {selection_note(m)}. "
        f"Whole run: {m['wall_s'] / 60:.1f} min, 1-min load average "
        f"{_fmt(la.get('min'))}–{_fmt(la.get('max'))} (median {_fmt(la.get('median'))}; the "
        "host is shared, timings are only comparable at a similar load).",
        "",
        protocol_line(m),
        "",
        "```bash",
        m.get("command") or ("python benchmarks/serving/run.py " + ("--quick " if m["quick"]
                                                                     else "")
                             + f"--out {_rel(json_path)}"),
        "```",
        "",
    ]
    if decode:
        lines += target_lines(decode) + decode_table(decode)
    if long and long.get("decode"):
        lines += long_context_lines(long, long_path)
    if bench:
        lines += bench_serving_table(bench, bench_path)
    if profile:
        lines += profile_section(profile)
    if profile and before:
        lines += before_after_lines(before, profile)
    if data["rows"]:
        lines += cells_table(data)
        lines += radix_lines(data["rows"])
    lines += [
        "`budget`: fraction of a request's context attended per KV head in the compressed layers "
        "(sink 4 + recent 64 included, first 2 layers dense; 1.0 = dense); `KV slots in use`: "
        "peak of SGLang's `sglang:num_used_tokens`, the slots held by running requests (a shared "
        "prefix counts once; idle radix-cached tokens are not included). Selection reads fewer "
        "K/V rows per step but keeps every slot, so KV memory is the same as dense (plus the "
        "block store outside the pool, ~6% of K/V); reducing it is eviction's job "
        "(`--dynsplit-evict`; `run.py --eviction` adds `<method>-evict` rows; peak slots and "
        "concurrency in the Memory section).",
        "",
    ]
    lines += [f"![{p.stem}]({_rel(p)})" for p in pngs if p.exists()]
    lines.append("")
    return "\n".join(lines)


def radix_lines(rows) -> list[str]:
    dense = {(r["context_len"], r["concurrency"]): _med(r, "radix_hit_rate") for r in rows
             if st.is_dense(r)}
    diffs = [abs(_med(r, "radix_hit_rate") - dense[(r["context_len"], r["concurrency"])])
             for r in rows if not st.is_dense(r) and _med(r, "radix_hit_rate") is not None
             and dense.get((r["context_len"], r["concurrency"])) is not None]
    if not diffs:
        return []
    same = max(diffs) < 1e-9
    return [f"Radix hit rate vs dense, same cell (medians): largest difference {max(diffs):.4f}"
            + (" (identical)." if same else
               " — the shared prefix and earlier turns hit the cache as in dense; the residue "
               "comes from the replies themselves (compressed decoding writes different "
               "replies, and later turns' prompts include them)."), ""]


def profile_section(p) -> list[str]:
    lines = [f"**Where decode time goes at {p['context_len']} tokens** "
             f"(`profile_decode.py`, {p['layout']}, {p['threads']} threads, one request; "
             f"{selection_note(p)}):", ""]
    step = p.get("step") or {}
    if step:
        lines += ["| per decode step | dense | " + " | ".join(
            f"1/{round(1 / b)}" for b in p["budgets"]) + " |",
                  "|---|---|" + "---|" * len(p["budgets"])]
        for key, name in (("attention_ms", "attention (all layers)"),
                          ("plan_ms", "DynSplit step plan + block freeze"),
                          ("rest_ms", "rest of the step (measured, 1 layer-free step)"),
                          ("total_ms", "modelled step"),
                          ("server_tpot_ms", "measured server TPOT")):
            vals = [step["dense"].get(key)] + [step[f"{b}"].get(key) for b in p["budgets"]]
            if any(v is not None for v in vals):
                lines.append(f"| {name} | " + " | ".join(_fmt(v, 1) for v in vals) + " |")
        lines.append("")
    for note in p.get("findings", []):
        lines.append(f"* {note}")
    lines += ceiling_lines(step)
    lines += bottleneck_lines(p)
    lines.append("")
    return lines


def ceiling_lines(step: dict, target: float = 2.0) -> list[str]:
    """What the modelled step says about a decode-speed target: the speedup with attention free,
    and the attention + plan time per step that the target would leave."""
    dense = step.get("dense", {})
    total, rest = dense.get("server_tpot_ms"), dense.get("rest_ms")
    if not total or not rest or rest <= 0:
        return []
    room = total / target - rest
    return [f"* Ceiling: with attention free, the step would still cost {rest:.0f} ms, "
            f"{total / rest:.2f}x dense at best. {target:.1f}x dense needs attention + plan "
            f"<= {room:.0f} ms per step"
            + "".join(f"; 1/{round(1 / float(k))} spends "
                      f"{v['attention_ms'] + v['plan_ms']:.0f} ms" for k, v in step.items()
                      if k != "dense")
            + " (the 2 dense layers included)."]


def before_after_lines(before, after) -> list[str]:
    """The decode step before and after a change, both profiled by profile_decode.py on this
    host in the same session (profile-decode-before.json, profile-decode.json)."""
    budgets = [b for b in after["budgets"] if f"{b}" in before.get("attention", {})]
    if not budgets:
        return []
    if "cpu_path" in before:  # both replays say what they ran
        what = (f"before = `profile-decode-before.json`: {before['cpu_path']}, "
                f"{before['huge_pages']}; after: {after['cpu_path']}, {after['huge_pages']}; "
                "profiled in the same session; the three stages timed as separate calls")
    else:
        what = "before = `profile-decode-before.json`, the previous code, profiled in the same session"
    head = ["**The decode step before and after** (`profile_decode.py`, "
            f"in-process replay at {after['context_len']} tokens, {after['threads']} thread(s), "
            f"medians per layer; {what}):", "",
            "| ms | " + " | ".join(f"1/{round(1 / b)} before | 1/{round(1 / b)} after"
                                   for b in budgets) + " |",
            "|---|" + "---|---|" * len(budgets)]
    rows = [("compressed layer (p50)", lambda a: a.get("sparse_layer_ms_p50")),
            ("  score", lambda a: a["run_stages_ms_per_layer"].get("score_ms")),
            ("  select", lambda a: a["run_stages_ms_per_layer"].get("select_ms")),
            ("  positions + attention", lambda a: (
                a["run_stages_ms_per_layer"].get("attention_ms", 0)
                + a["run_stages_ms_per_layer"].get("positions_to_slots_ms", 0))),
            ("step plan (begin_forward, p50)", lambda a: a.get("plan_ms_p50")),
            ("attention + plan per step", lambda a: a["attention_ms"] + a["plan_ms"])]
    out = []
    for name, get in rows:
        vals = []
        for b in budgets:
            vals += [_fmt(get(before["attention"][f"{b}"]), 2), _fmt(get(after["attention"][f"{b}"]), 2)]
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    dense = [before["attention"]["dense"]["attn_layer_ms_p50"],
             after["attention"]["dense"]["attn_layer_ms_p50"]]
    why = ("the same code, each under its replay's memory setting" if "cpu_path" in before
           else "unchanged code, the host's drift")
    return head + out + ["", f"Dense attention per layer in the same replays ({why}): "
                             f"{dense[0]:.2f} ms before, {dense[1]:.2f} ms after.", ""]


LAYERS, COMPRESSED_LAYERS = 30, 28  # the default model; 2 dense layers


def bottleneck_lines(p) -> list[str]:
    """The bottleneck, from the live server's profile (the in-process replay measures less
    attention time than the server spends, so the live split is the reference)."""
    sp = p.get("server_profile") or {}
    dense, b8 = sp.get("dense"), sp.get("0.125")
    if not dense or not b8:
        return []
    att = lambda prof: sum(v for k, v in prof["ms_per_step"].items()  # noqa: E731
                           if "attention (" in k and "outside" not in k)
    d_att, s_att = att(dense), att(b8)
    rest = b8["tpot_ms"] - s_att
    top = max(b8["ms_per_step"].items(), key=lambda kv: kv[1])
    sparse = sum(v for k, v in b8["ms_per_step"].items() if k.startswith("dynsplit sparse"))
    replay = (p.get("step") or {}).get("dense", {}).get("attention_ms")
    replay_layer = ((p.get("attention") or {}).get("0.125") or {}).get("sparse_layer_ms_p50")
    out = [f"* **Bottleneck (live server, 8k context).** Dense: attention {d_att:.0f} ms of a "
           f"{dense['tpot_ms']:.0f} ms step ({d_att / dense['tpot_ms']:.0%})"
           + (f"; the in-process replay measures only {replay:.0f} ms for it, so the live split "
              "is the reference" if replay else "") + ". "
           f"At 1/8 the largest part is {top[0]}: {top[1]:.0f} ms per step "
           f"({top[1] / b8['tpot_ms']:.0%}), {sparse / COMPRESSED_LAYERS:.1f} ms per compressed "
           f"layer for ~1/8 of the keys (dense: {d_att / LAYERS:.1f} ms per layer for all)"
           + (f", against {replay_layer:.2f} ms in the in-process replay" if replay_layer else "")
           + f" ({p.get('cpu_path', 'the CPU path')}; in the server the caches are cold after "
           "the model's matmuls and other processes share the cores; docs/kernels.md). "
           "With attention free the step would still cost "
           f"{rest:.0f} ms: the ceiling on this host is {dense['tpot_ms'] / rest:.1f}x dense; "
           f"1/8 reaches {dense['tpot_ms'] / b8['tpot_ms']:.2f}x under py-spy "
           "(the decode probe above, without the profiler, is the figure to quote)."]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--profile", default=None,
                    help="profile_decode.py JSON (default: profile-decode.json beside the input)")
    ap.add_argument("--bench-serving", default=None,
                    help="bench_serving.py JSON (default: bench-serving.json beside the input)")
    ap.add_argument("--long", default=None,
                    help="run.py JSON of the long-context decode probe (default: qwen-decode.json "
                         "beside the input)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    src = Path(args.json)
    data = json.loads(src.read_text())
    out = Path(args.out_dir or src.parent)
    out.mkdir(parents=True, exist_ok=True)
    prof_path = Path(args.profile) if args.profile else src.parent / "profile-decode.json"
    profile = json.loads(prof_path.read_text()) if prof_path.exists() else None
    before_path = prof_path.with_name(prof_path.stem + "-before.json")
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    bench_path = (Path(args.bench_serving) if args.bench_serving
                  else src.parent / "bench-serving.json")
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
    long_path = Path(args.long) if args.long else src.parent / "qwen-decode.json"
    long = (json.loads(long_path.read_text())
            if long_path.exists() and long_path.resolve() != src.resolve() else None)
    m = data["meta"]
    sub = (f"{m['model']} on {m['machine']} ({m['device']}, {m['attention_backend']}, "
           f"{m['dtype']}); load avg {_fmt(m.get('load_avg_1m', {}).get('median'))}")
    pngs = [out / f"{src.stem}-decode.png", out / f"{src.stem}-concurrency.png",
            out / f"{src.stem}-context.png"]
    rows = data["rows"]
    plot_decode(data["decode"], pngs[0], sub + f"; {m['protocol']['decode_repeats']} "
                                                 "interleaved repeats")
    if rows:
        cell_sub = sub + f"; {m['turns']} turns x {m['output_tokens']} tokens"
        plot_vs(rows, "concurrency", "context_len", "shared prefix {} tokens", pngs[1], cell_sub)
        plot_vs(rows, "context_len", "concurrency", "{} concurrent sessions", pngs[2], cell_sub)
    else:  # no cells in this run: an older run's cell plots must not be shown with it
        pngs = pngs[:1]
    text = section(data, profile, pngs, src, bench, bench_path, before, long, long_path)
    (out / "README-section.md").write_text(text)
    print(f"wrote {', '.join(str(p) for p in pngs if p.exists())}, {out / 'README-section.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
