"""Paired statistics of two methods on the same samples: mean difference and a bootstrap CI.

Both methods answered the same prompts, so the comparison is per sample (score_a - score_b);
the 95% interval is the percentile bootstrap over samples (10 000 resamples, fixed seed, so a
report regenerates to the same numbers). Pure Python: the report needs no numpy.
"""

from __future__ import annotations

import random
from collections import defaultdict


def paired_differences(records, model: str, budget, a: str, b: str) -> list[float]:
    """score_a - score_b for every sample that both methods answered at this budget."""
    by = defaultdict(dict)
    for r in records:
        if r["model"] == model and r["budget"] == budget and r["method"] in (a, b):
            by[r["sample"]][r["method"]] = r["score"]
    return [d[a] - d[b] for _, d in sorted(by.items()) if a in d and b in d]


def bootstrap_ci(diffs: list[float], n_boot: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of diffs."""
    if not diffs:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return (lo, hi)


def paired_summary(records, model: str, budget, a: str, b: str) -> dict:
    """{n, mean, ci_low, ci_high, wins, losses} of a - b (scores in [0, 1]; mean in points)."""
    d = paired_differences(records, model, budget, a, b)
    lo, hi = bootstrap_ci(d)
    n = len(d)
    return dict(a=a, b=b, model=model, budget=budget, n=n,
                mean=round(100 * sum(d) / n, 2) if n else None,
                ci_low=round(100 * lo, 2) if n else None, ci_high=round(100 * hi, 2) if n else None,
                wins=sum(x > 0 for x in d), losses=sum(x < 0 for x in d))
