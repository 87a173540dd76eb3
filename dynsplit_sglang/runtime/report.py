"""Where the compressor's counters go: a JSON file, SGLang's Prometheus ``/metrics``, the log.

SGLang 0.5.23 runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set
for every server process when ``--enable-metrics`` is on), so counters incremented in the scheduler
show up in the HTTP server's ``/metrics`` next to SGLang's own.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
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
    "evict_skipped_rows": "Requests whose prompt could not be evicted: their SGLang request was "
                          "not known (whole-prompt eviction needs its ownership)",
    "entries_reclaimed": "Block entries of freed slots and finished rows returned to the store",
    "tier_tokens_moved_out": "Evicted tokens whose K/V went to the cold tier (--dynsplit-evict-tier)",
    "tier_tokens_recalled": "Tokens brought back from the cold tier into the KV pool",
    "tier_tokens_dropped": "Tokens the cold tier dropped for good (its size cap)",
    "tier_tokens_recall_short": "Tokens a request would have recalled but the KV pool had no room",
}
# Values that go up and down (the last one published).
GAUGES = {"tier_bytes_held": "Bytes the cold tier holds"}


def warn_counted(stats: Counter, counter: str, what: str) -> None:
    """What the user asked for and did not get is never silent: a warning for the first of each
    counter and every hundredth after it (the counter has them all)."""
    n = stats[counter]
    if n == 1 or n % 100 == 0:
        logger.warning("dynsplit-sglang: %s (%d so far; counter %s)", what, n, counter)


def report_fallback(reason: str, stats: Counter) -> None:
    why = {"store": "the block store's entries ran out",
           "table": "the request has more blocks than its row table holds"}[reason]
    warn_counted(stats, f"fallback_rows_{reason}", f"a request attends densely because {why}")


def read_published(path) -> dict:
    """The counters a server's writer published at ``path`` (DYNSPLIT_STATS_PATH), read once it
    has published the last forward: it writes at most every Reporter.MIN_INTERVAL_S. {} when
    there is no file yet."""
    time.sleep(2 * Reporter.MIN_INTERVAL_S)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # not written yet, or replaced between open and read
        return {}


def summary(stats: Counter) -> dict:
    data = dict(stats)
    if data.get("tokens_attended"):
        data["compression_ratio"] = data["tokens_dense"] / data["tokens_attended"]
    return data


class Reporter:
    """Publishes the counters: the JSON file, Prometheus, a log line a minute.

    ``report`` is called on the decode path (once per forward): it only hands over a snapshot.
    A writer thread publishes the latest snapshot (older unwritten ones are dropped: each is a
    running total), so the file write, the Prometheus updates and, on a GPU, the read of the
    device counters never stall a decode step. It writes at most once per ``min_interval_s``:
    on a host whose cores all run the decode step's threads, each write takes one of them from
    the step, so a write per step would cost every step (a reader sees a forward's counters at
    most that long after it). background=False writes in the caller.
    """

    MIN_INTERVAL_S = 0.1

    def __init__(self, path: str | None = None, prometheus: bool = False,
                 log_every_s: float = 60.0, background: bool = True,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self._last_write = float("-inf")
        self.log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._pushed: Counter = Counter()
        self._prom = self._make_prometheus() if prometheus else None
        self.background = background
        self._pending = None  # (stats snapshot, device counters or None)
        self._lock = threading.Lock()  # guards _pending; _write_lock orders the writes
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def report(self, stats: Counter, device_counts=None) -> None:
        """stats: the counters; device_counts: a copy of an int64 [2] device tensor (tokens
        attended, the most one layer attended), read off the decode path."""
        snapshot = (Counter(stats), device_counts)
        if not self.background:
            self._publish(snapshot)
            return
        with self._lock:
            self._pending = snapshot
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dynsplit-stats",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.flush)
        self._wake.set()

    def flush(self) -> None:
        """Publish what is pending now, in the caller."""
        with self._lock:
            snapshot, self._pending = self._pending, None
        if snapshot is not None:
            self._publish(snapshot)

    def close(self) -> None:
        """Publish what is pending and stop the writer thread (a later report restarts it)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop = True
            self._wake.set()
            thread.join()
            self._stop = False
        self.flush()

    _stop = False

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            wait = self._last_write + self.min_interval_s - time.monotonic()
            if wait > 0:  # what is reported meanwhile replaces the pending snapshot
                time.sleep(wait)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - counters must never take the server down
                logger.exception("dynsplit-sglang: writing the counters failed")

    def _publish(self, snapshot) -> None:
        stats, device_counts = snapshot
        if device_counts is not None:
            stats["tokens_attended"], stats["max_tokens_attended"] = device_counts.tolist()
        with self._write_lock:
            self._write(stats)
            self._last_write = time.monotonic()

    @staticmethod
    def _make_prometheus():
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge

        counters = {k: PCounter(f"sglang:dynsplit_{k}", doc) for k, doc in COUNTERS.items()}
        ratio = Gauge("sglang:dynsplit_compression_ratio",
                      "Dense K/V tokens per attended K/V token, since start",
                      multiprocess_mode="mostrecent")
        gauges = {k: Gauge(f"sglang:dynsplit_{k}", doc, multiprocess_mode="mostrecent")
                  for k, doc in GAUGES.items()}
        return counters, ratio, gauges

    def _write(self, stats: Counter) -> None:
        data = summary(stats)
        if self.path:
            d = os.path.dirname(self.path) or "."
            with tempfile.NamedTemporaryFile("w", dir=d, delete=False) as f:
                json.dump(data, f)
            os.replace(f.name, self.path)
        if self._prom is not None:
            counters, ratio, gauges = self._prom
            for k, g in gauges.items():
                if k in stats:
                    g.set(stats[k])
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
