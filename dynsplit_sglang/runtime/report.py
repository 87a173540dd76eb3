"""Where the compressor's counters go: a JSON file, SGLang's Prometheus ``/metrics``, the log.

SGLang 0.5.23 runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set
for every server process when ``--enable-metrics`` is on), so counters incremented in the scheduler
show up in the HTTP server's ``/metrics`` next to SGLang's own.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter

logger = logging.getLogger("dynsplit_sglang")

COUNTERS = {
    "blocks_built": "Semantic blocks segmented and summarised",
    "blocks_reused": "Blocks adopted from a radix-shared prefix instead of being rebuilt",
    "tokens_attended": "K/V tokens read by compressed decode attention (per KV head and layer)",
    "tokens_dense": "K/V tokens dense attention would have read for the same steps",
    "requests": "Requests seen by the compressor",
    "fallback_rows": "Requests whose blocks did not fit the store (attended densely)",
    "fallback_rows_store": "Of these: block entries ran out (after reclaiming unreachable ones)",
    "fallback_rows_table": "Of these: more blocks than a request row's table holds",
    "entries_reclaimed": "Block entries of freed slots and finished rows returned to the store",
}


def report_fallback(reason: str, stats: Counter) -> None:
    """A dense fallback is never silent: a warning for the first of each kind and every
    hundredth after it (the counters have them all)."""
    n = stats[f"fallback_rows_{reason}"]
    if n == 1 or n % 100 == 0:
        why = {"store": "the block store's entries ran out",
               "table": "the request has more blocks than its row table holds"}[reason]
        logger.warning("dynsplit-sglang: a request attends densely because %s (%d so far; "
                       "counter fallback_rows_%s)", why, n, reason)


def summary(stats: Counter) -> dict:
    data = dict(stats)
    if data.get("tokens_attended"):
        data["compression_ratio"] = data["tokens_dense"] / data["tokens_attended"]
    return data


class Reporter:
    def __init__(self, path: str | None = None, prometheus: bool = False,
                 log_every_s: float = 60.0) -> None:
        self.path = path
        self.log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._pushed: Counter = Counter()
        self._prom = self._make_prometheus() if prometheus else None

    @staticmethod
    def _make_prometheus():
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge

        counters = {k: PCounter(f"sglang:dynsplit_{k}", doc) for k, doc in COUNTERS.items()}
        ratio = Gauge("sglang:dynsplit_compression_ratio",
                      "Dense K/V tokens per attended K/V token, since start",
                      multiprocess_mode="mostrecent")
        return counters, ratio

    def report(self, stats: Counter) -> None:
        data = summary(stats)
        if self.path:
            d = os.path.dirname(self.path) or "."
            with tempfile.NamedTemporaryFile("w", dir=d, delete=False) as f:
                json.dump(data, f)
            os.replace(f.name, self.path)
        if self._prom is not None:
            counters, ratio = self._prom
            for k, c in counters.items():
                delta = stats.get(k, 0) - self._pushed.get(k, 0)
                if delta > 0:
                    c.inc(delta)
                    self._pushed[k] = stats[k]
            if "compression_ratio" in data:
                ratio.set(data["compression_ratio"])
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            logger.info(
                "dynsplit-sglang: blocks built %d, reused %d; K/V tokens attended %d of %d "
                "(compression %.2fx); requests %d, dense fallbacks %d",
                data.get("blocks_built", 0), data.get("blocks_reused", 0),
                data.get("tokens_attended", 0), data.get("tokens_dense", 0),
                data.get("compression_ratio", 1.0), data.get("requests", 0),
                data.get("fallback_rows", 0),
            )
