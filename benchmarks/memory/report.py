"""Plot and README section from the memory benchmark's JSON.

    python benchmarks/memory/report.py benchmarks/memory/results/quick.json

Writes next to the JSON: ``<stem>.png`` (peak KV slots per request and concurrent requests at
the fixed pool, per context and configuration) and ``README-section.md`` (the README's "Memory"
section; ``benchmarks/update_readme.py`` splices it in).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(r) -> str:
    return r["method"] if r["budget"] >= 1.0 else f"{r['method']} 1/{round(1 / r['budget'])}"


def plot_accuracy(ax, table) -> None:
    """Accuracy per kept budget: this package's rows and the peers, full KV as a line."""
    budgets = sorted({t["budget"] for t in table if t["budget"] < 1.0}, reverse=True)
    methods = list(dict.fromkeys(t["method"] for t in table if t["budget"] < 1.0))
    acc = {(t["method"], t["budget"]): t["accuracy"] for t in table}
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        xs = [i + k * width for i, b in enumerate(budgets) if (m, b) in acc]
        ax.bar(xs, [acc[(m, b)] for b in budgets if (m, b) in acc], width, label=m)
    if ("none", 1.0) in acc:
        ax.axhline(acc[("none", 1.0)], color="k", ls="--", lw=1, label="full KV")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(budgets))])
    ax.set_xticklabels([f"1/{round(1 / b)} kept" for b in budgets])
    ax.set_title("accuracy, same samples (higher is better)", fontsize=10)
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def plot(rows, path: Path, table=()) -> None:
    ctxs = sorted({r["context_len"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows))
    fig, axes = plt.subplots(1, 3 if table else 2, figsize=(16 if table else 11, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        by = {r["context_len"]: r for r in rows if label(r) == name}
        xs = [i + k * width for i, c in enumerate(ctxs) if c in by]
        axes[0].bar(xs, [by[c]["peak_kv_slots_per_request"] for c in ctxs if c in by], width,
                    label=name)
        axes[1].bar(xs, [by[c]["max_concurrent_requests"] for c in ctxs if c in by], width,
                    label=name)
    for ax, title in zip(axes[:2], ("peak KV slots per request (lower is better)",
                                "concurrent requests at the fixed pool (higher is better)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ctxs))])
        ax.set_xticklabels([f"{c} tokens" for c in ctxs])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if table:
        plot_accuracy(axes[2], table)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frac(b) -> str:
    return "full" if b >= 1.0 else f"1/{round(1 / b)}"


def _acc(a) -> str:
    return "—" if a is None else f"{a:.1f}"


def target_lines(method, rows, table, targets) -> list[str]:
    """The issue's targets for one eviction method: peak slots per request and accuracy
    against the best of the kvpress SnapKV settings and ChunkKV, per kept budget."""
    out = []
    for b, want in sorted(targets.items(), reverse=True):
        ev = [r for r in rows if r["method"] == method and r["budget"] == b]
        if not ev:
            continue
        got = ", ".join(f"{r['peak_reduction_vs_full']:.2f}x at {r['context_len']}" for r in ev)
        ok = all(r["peak_reduction_vs_full"] >= want for r in ev)
        out.append(f"- {method}: peak slots ≥ {want}x fewer at 1/{round(1 / b)}: "
                   f"**{'met' if ok else 'missed'}** ({got}).")
        mine = table.get((method, b))
        peers = {m: a for (m, bb), a in table.items() if bb == b and m.startswith("kvpress-")
                 and m != "kvpress-streamingllm"}
        if mine is not None and peers:
            best = max(peers, key=peers.get)
            out.append(f"- {method}: accuracy ≥ the best of SnapKV / ChunkKV at "
                       f"1/{round(1 / b)} kept: **{'met' if mine >= peers[best] else 'missed'}**"
                       f" ({mine:.1f} vs {best} {peers[best]:.1f}).")
    return out


def section(data, png: str) -> str:
    meta, rows = data["meta"], data["rows"]
    targets = {float(k): v for k, v in meta["targets"].items()}
    acc = meta["accuracy"]
    n_cells = len(acc["tasks"]) * len(acc["contexts"])
    out = [
        "### Memory: eviction against peers that evict",
        "",
        f"Measured {meta['date']} on {meta['machine']['cpus']} CPU cores by `{meta['command']}` "
        f"({meta['wall_s'] / 60:.0f} min); SmolLM2-135M-Instruct, `--max-total-tokens "
        f"{meta['max_total_tokens']}`, `--chunked-prefill-size {meta['chunked_prefill']}`. "
        "Peak: one request alone (allocator slots in use at the end of every prefill chunk, "
        "before eviction, and at every decode step). Kept: slots it holds once its prompt is "
        "in. Concurrent: the largest decode batch when more prompts than fit (sharing no "
        "prefix) arrive at once. `dynsplit-evict` decides once the whole prompt (question "
        "included) is in; `dynsplit-evict-hold` (`--dynsplit-evict-hold 1`) does too, but "
        "until then holds the prompt's own part to its budget at the length so far after every "
        "chunk (blocks ranked by their most distinctive key: the question is not in yet), so "
        "the question decides among what was held plus the last chunk; `dynsplit-evict-chunk` decides after every prefill "
        "chunk among its new tokens, before the question (query-agnostic)."
        + (f" Note: {meta['note']}." if meta.get("note") else ""),
        "",
        "| context | method | kept budget | peak KV slots / request | vs full KV | kept after "
        "prefill | concurrent requests | retractions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['context_len']} | {r['method']} | {_frac(r['budget'])} "
                   f"| {r['peak_kv_slots_per_request']} | {r['peak_reduction_vs_full']:.2f}x "
                   f"| {r['kv_slots_after_prefill']} | {r['max_concurrent_requests']} "
                   f"(of {r['offered_requests']}) | {r['retractions']} |")
    out += [
        "",
        f"Accuracy, same samples for every row: {', '.join(acc['tasks'])} at "
        f"{' and '.join(map(str, acc['contexts']))} tokens, {acc['n']} per (task, context): "
        f"n = {acc['n'] * n_cells} per cell. Budgets are *kept* fractions of the prompt. The "
        "kvpress peers (SnapKV with kvpress's defaults, window 64 / pool 5, and with its "
        "paper's window 32 / max-pool 7; ChunkKV; StreamingLLM) compress every layer, as an "
        "evicted slot is gone from every layer (`--kvpress-dense-layers "
        f"{acc.get('kvpress_dense_layers', 0)}`), in HF transformers on the same token ids; "
        "the first answer token comes from the dense prefill on the SGLang side (a new prompt "
        "is evicted after its last layer) and, since 2026-12-08, on the kvpress side too "
        "(earlier runs fed the kvpress side's last prompt token as its first decode step).",
        "",
        "| method | kept budget | n | accuracy (%) |",
        "|---|---|---|---|",
    ]
    for t in data.get("accuracy", []):
        out.append(f"| {t['method']} | {_frac(t['budget'])} | {t['n']} | {_acc(t['accuracy'])} |")
    pairs = data.get("paired", [])
    if pairs:
        out += ["", "Paired, eviction − other (points, 95% bootstrap CI over samples):", "",
                "| eviction | kept budget | other | n | mean | 95% CI | won / lost |",
                "|---|---|---|---|---|---|---|"]
        for p in pairs:
            out.append(f"| {p['a']} | {_frac(p['budget'])} | {p['b']} | {p['n']} "
                       f"| {p['mean']:+.1f} "
                       f"| [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}] | {p['wins']} / "
                       f"{p['losses']} |")
    out += ["", "Targets:"]
    table = {(t["method"], t["budget"]): t["accuracy"] for t in data.get("accuracy", [])}
    for method in ("dynsplit-evict", "dynsplit-evict-hold"):
        out += target_lines(method, rows, table, targets)
    full_kept = {r["context_len"]: r["kv_slots_after_prefill"] for r in rows
                 if r["method"] == "none"}
    kept = [f"{r['kv_slots_after_prefill']} at 1/{round(1 / r['budget'])} "
            f"({full_kept[r['context_len']] / r['kv_slots_after_prefill']:.1f}x fewer)"
            for r in rows if r["method"] == "dynsplit-evict" and r["context_len"] in full_kept
            and r["kv_slots_after_prefill"]]
    out += [
        "",
        "Why the peak is what it is: with the default scope a request keeps its whole prompt "
        "until the prompt (and its question) is in, so a request alone peaks at its prompt, "
        "as with full KV. SGLang admits a request only if its whole prompt fits in free + "
        "evictable slots either way, so what sets concurrency is what each request keeps once "
        f"its prompt is in: {', '.join(kept) or '—'} slots per request against full KV. "
        "`dynsplit-evict-hold` bounds the peak at about the budget plus one chunk: every chunk "
        "before the last evicts by key distinctiveness, before the question, and the question "
        "decides only among what was held plus the last chunk; `dynsplit-evict-chunk` decides "
        "every chunk among its own new tokens, query-agnostic.",
        "",
        f"![memory]({png})", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    png = args.json.with_suffix(".png")
    plot(data["rows"], png, data.get("accuracy", []))
    rel = f"benchmarks/memory/results/{png.name}"
    (args.json.parent / "README-section.md").write_text(section(data, rel) + "\n")
    print(f"wrote {png} and {args.json.parent / 'README-section.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
