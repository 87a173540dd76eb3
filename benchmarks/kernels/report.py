"""README section of the kernel benchmark, generated from its JSON (run.py writes both).

    python benchmarks/kernels/report.py benchmarks/kernels/results/cpu-full.json \
        [--threads-run benchmarks/kernels/results/cpu-2threads-full.json]

Writes README-section.md next to the first JSON; benchmarks/update_readme.py splices it into
README.md. With two runs, the one whose dense decode is fastest at the targets' cell comes first
and its targets are the judged ones: the strongest dense baseline the machine gave.
Every ratio names its baseline: `dense` is the fastest dense decode of the same run (its
implementation is named), SGLang's torch_native decode is shown beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE = (32, 8, 128)  # the Llama-8B-like layout of the targets


def _row(rows, **want):
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def _layout(r) -> tuple:
    return r["q_heads"], r["kv_heads"], r["head_dim"]


def speed_table(rows, frac: int = 16) -> list[str]:
    """Batch x context for the headline layout at budget 1/frac."""
    out = ["| batch | context | fastest dense (impl) | SGLang torch_native | dynsplit 1/%d | "
           "speedup vs fastest dense | ideal | of ideal | selection / dense | uniform / ragged "
           "selection | refine = 2: speedup (of its ideal) |" % frac,
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["batch"], r["context_len"]) for r in rows if _layout(r) == HEADLINE})
    for b, ctx in cells:
        at = [r for r in rows if _layout(r) == HEADLINE and r["batch"] == b
              and r["context_len"] == ctx]
        budget = ctx // frac
        dense, native = _row(at, method="dense"), _row(at, method="dense-sglang-torch-native")
        comp = _row(at, method="dynsplit", budget=budget)
        uni, rag = (_row(at, method=m, budget=budget) for m in ("select-uniform", "select-ragged"))
        if not (dense and comp):
            continue
        sel = f"{uni['median_ms'] / dense['median_ms']:.2f}" if uni else "–"
        ur = f"{rag['median_ms'] / uni['median_ms']:.2f}x" if uni and rag else "–"
        ref = _row(at, method="dynsplit-refine2", budget=budget)
        two = (f"{ref['speedup']:.2f}x ({ref['speedup'] / ref['ideal_speedup']:.2f} of "
               f"{ref['ideal_speedup']:.2f}x)" if ref else "–")
        out.append(
            f"| {b} | {ctx // 1024}k | {dense['median_ms']:.2f} ms ({dense['impl']}) | "
            f"{native['median_ms']:.1f} ms | {comp['median_ms']:.2f} ms | "
            f"{comp['speedup']:.2f}x | {comp['ideal_speedup']:.2f}x | "
            f"{comp['speedup'] / comp['ideal_speedup']:.2f} | {sel} | {ur} | {two} |")
    return out


def _targets(data: dict) -> list[str]:
    out = []
    for t in data.get("targets", {}).get("cpu", []):
        if t["layout"].startswith("llama8b"):
            mark = "info" if t["passed"] is None else ("pass" if t["passed"] else "**MISS**")
            out.append(f"* [{mark}] {t['target']}: {t['value']:.2f} ({t['detail']})")
    return out


def threads_lines(data: dict, json_path: str) -> list[str]:
    """The same targets from a second run at another thread count (the server's), every method
    on the same threads, so that its ratios stand beside the first run's, not mixed with them."""
    meta = data["meta"]
    rows = [r for r in data["rows"] if r["device"].startswith("cpu")]
    n = meta["threads"]
    why = "one core" if n == 1 else "the count the CPU server runs"
    return [
        "",
        f"The same run on **{n} torch thread{'s' if n != 1 else ''}** ({why}; "
        f"{meta['cpu_clock']} clock; every method, dense included, on the same threads; "
        f"`{json_path}`):",
        "",
        *speed_table(rows),
        "",
        *_targets(data),
    ]


def target_dense_ms(data: dict) -> float:
    """The fastest dense decode's time at the targets' cell (batch 1, 32k, headline layout)."""
    rows = [r for r in data["rows"] if r["device"].startswith("cpu") and _layout(r) == HEADLINE]
    dense = _row(rows, method="dense", batch=1, context_len=32768)
    return dense["median_ms"] if dense else float("inf")


def strongest(runs: list) -> tuple:
    """Of (data, path) runs at different thread counts, the one whose dense decode was fastest
    at the targets' cell: the targets are judged against the strongest dense baseline."""
    return min(runs, key=lambda run: target_dense_ms(run[0]))


def section(data: dict, json_path: str, threads_run: tuple[dict, str] | None = None) -> str:
    meta, rows = data["meta"], [r for r in data["rows"] if r["device"].startswith("cpu")]
    bw = data.get("bandwidth_gbps", {}).get("cpu")
    order = f" ({meta['order']})" if meta.get("order") else ""
    lines = [
        "### Kernels (one compressed layer)",
        "",
        f"Kernel benchmark (`benchmarks/kernels/run.py`, generated from `{json_path}` by "
        f"`benchmarks/kernels/report.py`): CPU, {meta['threads']} torch "
        f"thread{'s' if meta['threads'] != 1 else ''}, "
        f"{meta['cpu_clock']} clock, fp32, layout {HEADLINE[0]} query / {HEADLINE[1]} KV heads, "
        f"head dim {HEADLINE[2]}, budget 1/16 (sink {meta['sink']} + recent {meta['recent']} "
        f"included). Median of interleaved repeats{order}; every ratio is to the **fastest "
        f"dense decode of the same run** (SDPA or a plain matmul, named); SGLang's own "
        f"`torch_native` decode (what CPU users run today) is shown beside it. Ideal = "
        f"{meta['ideal']}. "
        f"Copy bandwidth at start {bw:.1f} GB/s; load average {meta['load_avg_start'][0]:.1f} → "
        f"{meta['load_avg_end'][0]:.1f}." + (
            f" Compressed step: {meta['cpu_path']}; memory: {meta['huge_pages']} (every "
            f"method alike)." if "cpu_path" in meta else "") if bw else "",
        "",
        *speed_table(rows),
        "",
        "Targets at 32k, 1/16, batch 1 (from the same run" + (
            "; of the runs below, the one whose dense decode was fastest at that cell: the "
            "strongest dense baseline this machine gave" if threads_run else "") + "):",
        "",
        *_targets(data),
        *(threads_lines(*threads_run) if threads_run else []),
    ]
    lines += [
        "",
        "`selection / dense`: scoring + top-k + lay-out time over the fastest dense time. "
        "`uniform / ragged`: the vectorised ragged selection's time over the uniform mapping's "
        "(> 1: the uniform mapping is faster). On a CPU data-dependent sizes cost nothing, so "
        "the mapping does not pay there; on a GPU it gives static shapes (no host sync, one "
        "graph-capturable kernel), which is what it is for. See docs/kernels.md.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="run.py output (CPU rows)")
    ap.add_argument("--threads-run", default=None,
                    help="a second run.py output at another thread count (e.g. the server's)")
    args = ap.parse_args(argv)
    runs = [(json.loads(Path(p).read_text()), Path(p).as_posix())
            for p in [args.json] + ([args.threads_run] if args.threads_run else [])]
    first = strongest(runs)
    second = next((r for r in runs if r is not first), None)
    out = Path(args.json).parent / "README-section.md"
    out.write_text(section(*first, second))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
