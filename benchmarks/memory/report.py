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


def plot(rows, path: Path) -> None:
    ctxs = sorted({r["context_len"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        by = {r["context_len"]: r for r in rows if label(r) == name}
        xs = [i + k * width for i, c in enumerate(ctxs) if c in by]
        axes[0].bar(xs, [by[c]["peak_kv_slots_per_request"] for c in ctxs if c in by], width,
                    label=name)
        axes[1].bar(xs, [by[c]["max_concurrent_requests"] for c in ctxs if c in by], width,
                    label=name)
    for ax, title in zip(axes, ("peak KV slots per request (lower is better)",
                                "concurrent requests at the fixed pool (higher is better)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ctxs))])
        ax.set_xticklabels([f"{c} tokens" for c in ctxs])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(data, png: str) -> str:
    meta, rows = data["meta"], data["rows"]
    targets = {float(k): v for k, v in meta["targets"].items()}
    out = [
        "### Memory (quick mode)",
        "",
        f"Measured {meta['date']} on {meta['machine']['cpus']} CPU cores by `{meta['command']}` "
        f"({meta['wall_s'] / 60:.0f} min); SmolLM2-135M-Instruct, `--max-total-tokens "
        f"{meta['max_total_tokens']}`, `--chunked-prefill-size {meta['chunked_prefill']}`. "
        "Peak: one request alone (allocator slots in use at the end of every prefill chunk, "
        "before eviction, and at every decode step). Concurrent: the largest decode batch when "
        "more prompts than fit (sharing no prefix) arrive at once. Accuracy: the accuracy "
        f"suite's quick tasks, {meta['accuracy']['n']} samples per (task, context) cell, "
        "same samples for every row.",
        "",
        "| context | method | budget | peak KV slots / request | vs full KV | concurrent requests "
        "| retractions | accuracy (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = "full" if r["budget"] >= 1.0 else f"1/{round(1 / r['budget'])}"
        acc = "—" if r.get("accuracy") is None else f"{r['accuracy']:.1f}"
        out.append(f"| {r['context_len']} | {r['method']} | {b} | {r['peak_kv_slots_per_request']} "
                   f"| {r['peak_reduction_vs_full']:.2f}x | {r['max_concurrent_requests']} "
                   f"(of {r['offered_requests']}) | {r['retractions']} | {acc} |")
    out += ["", "Targets:"]
    full_acc = next((r["accuracy"] for r in rows if r["method"] == "none"), None)
    for b, want in sorted(targets.items(), reverse=True):
        ev = [r for r in rows if r["method"] == "dynsplit-evict" and r["budget"] == b]
        if not ev:
            continue
        got = ", ".join(f"{r['peak_reduction_vs_full']:.2f}x at {r['context_len']}" for r in ev)
        ok = all(r["peak_reduction_vs_full"] >= want for r in ev)
        out.append(f"- peak slots ≥ {want}x fewer at 1/{round(1 / b)}: "
                   f"**{'met' if ok else 'missed'}** ({got}).")
    ev4 = next((r for r in rows if r["method"] == "dynsplit-evict" and r["budget"] == 0.25), None)
    if ev4 and ev4.get("accuracy") is not None and full_acc is not None:
        gap = ev4["accuracy"] - full_acc
        out.append(f"- accuracy within 3 points of full KV at 1/4: "
                   f"**{'met' if gap >= -3 else 'missed'}** ({ev4['accuracy']:.1f} vs "
                   f"{full_acc:.1f}, {gap:+.1f}).")
    out += [
        "",
        "Why: the peak is what a request keeps plus one prefill chunk, and each chunk's last "
        "`recent` (64) tokens stay, since a chunk goes into the radix tree as soon as it ran "
        "and is never revisited — at 4k and 1/8 those tails alone are the whole budget "
        "(8 chunks x 64), so the request keeps more than its budget and the 4x is missed there; "
        "a larger chunk moves the peak the other way. Accuracy falls far below selection-only "
        "DynSplit: eviction must decide on a prefix before its question arrives (so that every "
        "request sharing the prefix gets the same compressed prefix), and a needle that nothing "
        "marks as distinctive at that point is gone when the question comes. docs/design.md "
        "(Eviction) has the measured alternatives.",
        "",
        f"![memory]({png})",
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    png = args.json.with_suffix(".png")
    plot(data["rows"], png)
    rel = f"benchmarks/memory/results/{png.name}"
    (args.json.parent / "README-section.md").write_text(section(data, rel) + "\n")
    print(f"wrote {png} and {args.json.parent / 'README-section.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
