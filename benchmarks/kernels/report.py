"""README section of the kernel benchmark, generated from its JSON (run.py writes both).

    python benchmarks/kernels/report.py benchmarks/kernels/results/cpu-full.json \
        [--threads-run benchmarks/kernels/results/cpu-2threads-full.json]

Writes README-section.md next to the JSON; benchmarks/update_readme.py splices it into README.md.
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
           "selection |" % frac, "|---|---|---|---|---|---|---|---|---|---|"]
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
        out.append(
            f"| {b} | {ctx // 1024}k | {dense['median_ms']:.2f} ms ({dense['impl']}) | "
            f"{native['median_ms']:.1f} ms | {comp['median_ms']:.2f} ms | "
            f"{comp['speedup']:.2f}x | {comp['ideal_speedup']:.2f}x | "
            f"{comp['speedup'] / comp['ideal_speedup']:.2f} | {sel} | {ur} |")
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
    return [
        "",
        f"The same run on **{meta['threads']} torch threads** (the count the CPU server runs; "
        f"{meta['cpu_clock']} clock; every method, dense included, on the same threads; "
        f"`{json_path}`):",
        "",
        *speed_table(rows),
        "",
        *_targets(data),
    ]


def section(data: dict, json_path: str, threads_run: tuple[dict, str] | None = None) -> str:
    meta, rows = data["meta"], [r for r in data["rows"] if r["device"].startswith("cpu")]
    bw = data.get("bandwidth_gbps", {}).get("cpu")
    lines = [
        "### Kernels (one compressed layer)",
        "",
        f"Kernel benchmark (`benchmarks/kernels/run.py`, generated from `{json_path}` by "
        f"`benchmarks/kernels/report.py`): CPU, {meta['threads']} torch thread, "
        f"{meta['cpu_clock']} clock, fp32, layout {HEADLINE[0]} query / {HEADLINE[1]} KV heads, "
        f"head dim {HEADLINE[2]}, budget 1/16 (sink {meta['sink']} + recent {meta['recent']} "
        f"included). Median of interleaved repeats; every ratio is to the **fastest dense "
        f"decode of the same run** (SDPA or a plain matmul, named); SGLang's own `torch_native` "
        f"decode (what CPU users run today) is shown beside it. Ideal = {meta['ideal']}. "
        f"Copy bandwidth at start {bw:.1f} GB/s; load average {meta['load_avg_start'][0]:.1f} → "
        f"{meta['load_avg_end'][0]:.1f}." + (
            f" Compressed step: {meta['cpu_path']}; memory: {meta['huge_pages']} (every "
            f"method alike)." if "cpu_path" in meta else "") if bw else "",
        "",
        *speed_table(rows),
        "",
        "Targets at 32k, 1/16, batch 1 (from the same run):",
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
    path = Path(args.json)
    data = json.loads(path.read_text())
    second = None
    if args.threads_run:
        second = (json.loads(Path(args.threads_run).read_text()), Path(args.threads_run).as_posix())
    out = path.parent / "README-section.md"
    out.write_text(section(data, path.as_posix(), second))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
