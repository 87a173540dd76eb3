"""Statistics of the serving benchmark: spread of repeats, ratios against dense, target checks.

Pure Python, no server, so ``tests/test_serving_report.py`` checks it against hand-computed
values. Used by ``run.py`` (decode probe, agent cells), ``bench_serving.py`` and ``report.py``.

Definitions (the report prints them):

* quartiles: linear interpolation between order statistics (``statistics.quantiles(...,
  method="inclusive")``, numpy's default); for 5 values Q1 and Q3 are the 2nd and 4th smallest;
  IQR = Q3 - Q1, relative IQR = IQR / median;
* ratio of medians: median(config) / median(dense) over all repeats of one cell;
* paired ratio: repeat r of the config / repeat r of dense, both from the same round of the
  interleaved schedule (run back to back on the same host load); reported as its median and
  range over the rounds;
* *within noise*: the median paired ratio is at least 1 - the dense repeats' relative IQR.
"""

from __future__ import annotations

import statistics

MIN_REPEATS = 5  # the protocol: at least 5 interleaved repeats per cell
DENSE = "none"


def label(config: str, budget: float) -> str:
    """'none', 'dynsplit@1/8' (the same names as run.Config.label)."""
    return config if budget >= 1.0 else f"{config}@1/{round(1 / budget)}"


def is_dense(rec: dict) -> bool:
    return rec["config"] == DENSE and rec["budget"] >= 1.0


def rotate(items: list, r: int) -> list:
    """Round r's order: the items rotated by r, so that none is always measured first."""
    k = r % len(items)
    return items[k:] + items[:k]


def start_order(configs: list) -> list:
    """The dense baseline last, the others as given. In A/A runs on this host (two identical
    dynsplit servers, 8k decode probes interleaved, 3 runs of 6 paired rounds) the server started
    first decoded 1.4-3.5% slower (median per run; 17 of 18 pairs), spending more CPU on the
    same tokens; a baseline started first would flatter every ratio against it."""
    return sorted(configs, key=lambda c: c.name == DENSE)


def quartiles(values) -> tuple[float, float, float] | None:
    """(Q1, median, Q3) by linear interpolation (inclusive method); None without values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q1, q2, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return q1, q2, q3


def spread(values) -> dict | None:
    """{n, median, min, max, q1, q3, iqr, rel_iqr} of the values that are not None."""
    vals = [v for v in values if v is not None]
    q = quartiles(vals)
    if q is None:
        return None
    q1, med, q3 = q
    return {"n": len(vals), "median": med, "min": min(vals), "max": max(vals), "q1": q1,
            "q3": q3, "iqr": q3 - q1, "rel_iqr": (q3 - q1) / med if med else None}


def paired_ratios(num: dict, den: dict) -> list[float]:
    """num[r] / den[r] for every round r present in both (values keyed by round)."""
    return [num[r] / den[r] for r in sorted(num) if r in den and num[r] is not None
            and den[r] not in (None, 0)]


def ratio_summary(ratios: list[float]) -> dict | None:
    if not ratios:
        return None
    return {"n": len(ratios), "median": statistics.median(ratios), "min": min(ratios),
            "max": max(ratios), "ratios": ratios}


def summarize(records: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...],
              speed_metrics: tuple[str, ...], baseline: str | None = None) -> list[dict]:
    """One row per (keys..., config label): the spread of every metric over the repeats and,
    for the speed metrics (higher is better), the ratios against dense at the same keys.

    A record is one repeat: ``config``, ``budget``, ``round`` and the key and metric fields.
    ``baseline`` names the dense row compared against (default: "none (dense), same <keys>").
    """
    baseline = baseline or f"{DENSE} (dense), same {', '.join(keys)}"
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys) + (label(r["config"], r["budget"]),),
                          []).append(r)
    dense = {k[:-1]: v for k, v in groups.items() if is_dense(v[0])}
    rows = []
    for k, recs in groups.items():
        row = {**dict(zip(keys, k[:-1])), "config": recs[0]["config"],
               "budget": recs[0]["budget"], "label": k[-1],
               "rounds": [r["round"] for r in recs], "n": len(recs)}
        for m in metrics:
            row[m] = spread([r.get(m) for r in recs])
        base = dense.get(k[:-1])
        if base is not None and not is_dense(recs[0]):
            row["vs_dense"] = {}
            for m in speed_metrics:
                mine, theirs = row[m], spread([r.get(m) for r in base])
                by_round = lambda rs: {r["round"]: r.get(m) for r in rs}  # noqa: E731
                row["vs_dense"][m] = {
                    "baseline": baseline,
                    "ratio_of_medians": (mine["median"] / theirs["median"]
                                         if mine and theirs and theirs["median"] else None),
                    "paired": ratio_summary(paired_ratios(by_round(recs), by_round(base))),
                }
        rows.append(row)
    return rows


def find(rows: list[dict], config: str, budget: float, **keys) -> dict | None:
    for r in rows:
        if r["config"] == config and abs(r["budget"] - budget) < 1e-9 and all(
                r.get(k) == v for k, v in keys.items()):
            return r
    return None


# -- target checks of the decode probe -----------------------------------------------------------

NOISE_DEFINITION = ("within noise: the median paired ratio (repeat r of the config / repeat r "
                    "of dense, same round) is at least 1 - the relative IQR of the dense repeats "
                    "at that context (IQR / median)")


def not_slower(row: dict, dense_row: dict, metric: str = "decode_tok_per_s") -> dict | None:
    """Is the config not slower than dense within noise? {paired_median, tolerance, ok}."""
    paired = ((row.get("vs_dense") or {}).get(metric) or {}).get("paired")
    dense = dense_row.get(metric) if dense_row else None
    if not paired or not dense or dense.get("rel_iqr") is None:
        return None
    tol = dense["rel_iqr"]
    return {"paired_median": paired["median"], "tolerance": tol,
            "threshold": 1 - tol, "ok": paired["median"] >= 1 - tol, "n": paired["n"]}


def break_even_context(rows: list[dict], config: str, budget: float,
                       metric: str = "decode_tok_per_s") -> dict:
    """The smallest measured context from which the config is not slower than dense within
    noise at every larger measured context. {"context": c or None, "at_smallest": bool}."""
    ctxs = sorted({r["context"] for r in rows if r["config"] == config
                   and abs(r["budget"] - budget) < 1e-9})
    verdicts = {}
    for c in ctxs:
        v = not_slower(find(rows, config, budget, context=c), find(rows, DENSE, 1.0, context=c),
                       metric)
        verdicts[c] = bool(v and v["ok"])
    best = None
    for c in reversed(ctxs):
        if not verdicts[c]:
            break
        best = c
    return {"context": best, "at_smallest": bool(ctxs) and best == ctxs[0],
            "verdicts": verdicts}


def _verdict(ok: bool, n: int, min_repeats: int) -> str:
    """'pass' or 'MISS'; below the protocol neither counts: 'not valid (...; measured MISS)'."""
    if n < min_repeats:
        return f"not valid ({n} < {min_repeats} repeats; measured {'pass' if ok else 'MISS'})"
    return "pass" if ok else "MISS"


def target_checks(rows: list[dict], config: str = "dynsplit", budget: float = 0.125,
                  break_even_at: int = 2048, speed_at: int = 8192, speed_target: float = 2.0,
                  min_repeats: int = MIN_REPEATS) -> list[dict]:
    """The issue's two done-when checks on the decode rows (``context`` = nominal context).

    1. at ``break_even_at``: the config is not slower than dense within noise (NOISE_DEFINITION);
    2. at ``speed_at``: median paired ratio >= speed_target and ratio of medians >= speed_target.

    A check on fewer than ``min_repeats`` paired repeats is 'not valid', whatever it measured.
    """
    name = label(config, budget)
    out = []
    row = find(rows, config, budget, context=break_even_at)
    dense = find(rows, DENSE, 1.0, context=break_even_at)
    v = not_slower(row, dense) if row and dense else None
    check = {"name": f"{name} never slower than dense at {break_even_at} (within noise)",
             "context": break_even_at, "baseline": "none (dense), same context, same round",
             "definition": NOISE_DEFINITION}
    if v is None:
        check.update(verdict="not measured", value=None, threshold=None, n=0)
    else:
        check.update(verdict=_verdict(v["ok"], v["n"], min_repeats), value=v["paired_median"],
                     threshold=v["threshold"], n=v["n"])
    out.append(check)

    row = find(rows, config, budget, context=speed_at)
    vs = ((row or {}).get("vs_dense") or {}).get("decode_tok_per_s") or {}
    paired, rom = vs.get("paired"), vs.get("ratio_of_medians")
    check = {"name": f"{name} decode >= {speed_target:.1f}x dense at {speed_at}",
             "context": speed_at, "baseline": "none (dense), same context",
             "definition": (f"median paired ratio >= {speed_target} and ratio of medians >= "
                            f"{speed_target}")}
    if not paired or rom is None:
        check.update(verdict="not measured", value=None, threshold=speed_target, n=0)
    else:
        ok = paired["median"] >= speed_target and rom >= speed_target
        check.update(verdict=_verdict(ok, paired["n"], min_repeats), value=paired["median"],
                     ratio_of_medians=rom, threshold=speed_target, n=paired["n"])
    out.append(check)
    return out
