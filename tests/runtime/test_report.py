"""The counters leave the decode path: Reporter.report only hands over a snapshot."""

import json
import threading
import time
from collections import Counter

import torch

from dynsplit_sglang.runtime.report import Reporter


def _read(path):
    return json.loads(path.read_text()) if path.exists() else {}


def test_background_writer_publishes_the_latest_snapshot(tmp_path):
    path = tmp_path / "stats.json"
    r = Reporter(str(path))
    stats = Counter(tokens_dense=800)
    for i in range(50):  # a burst: older snapshots may be dropped, never the last
        stats["requests"] = i
        r.report(stats, torch.tensor([100 + i, 7]))
    deadline = time.monotonic() + 5
    while _read(path).get("requests") != 49 and time.monotonic() < deadline:
        time.sleep(0.01)
    data = _read(path)
    assert data["requests"] == 49 and data["tokens_attended"] == 149
    assert data["max_tokens_attended"] == 7 and data["compression_ratio"] == 800 / 149
    assert r._thread is not None and r._thread is not threading.current_thread()


def test_snapshot_is_a_copy_and_flush_writes_in_the_caller(tmp_path):
    path = tmp_path / "stats.json"
    r = Reporter(str(path), background=False)
    stats = Counter(requests=1)
    r.report(stats)
    stats["requests"] = 2  # after the call: not in the file
    assert _read(path)["requests"] == 1 and r._thread is None
    r = Reporter(str(path))
    r.report(Counter(requests=3))
    r.flush()
    deadline = time.monotonic() + 5
    while _read(path).get("requests") != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _read(path)["requests"] == 3


def test_close_publishes_and_stops_the_writer(tmp_path):
    path = tmp_path / "stats.json"
    r = Reporter(str(path))
    r.report(Counter(requests=5))
    thread = r._thread
    r.close()
    assert not thread.is_alive() and _read(path)["requests"] == 5
    r.report(Counter(requests=6))  # a later report starts a new writer
    r.close()
    assert _read(path)["requests"] == 6


def test_writes_are_spaced_and_the_last_snapshot_lands(tmp_path):
    """At most one write per min_interval_s however often a forward reports; what is reported
    last is published within about that interval."""
    path = tmp_path / "stats.json"
    r = Reporter(str(path), min_interval_s=0.2)
    writes = []
    write = r._write
    r._write = lambda stats: (writes.append(time.monotonic()), write(stats))
    t0 = time.monotonic()
    for i in range(40):  # 40 reports over ~0.4 s: about 3 writes, not 40
        r.report(Counter(requests=i))
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while _read(path).get("requests") != 39 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _read(path)["requests"] == 39
    assert time.monotonic() - t0 < 0.4 + 1.0  # the last one was not held back for long
    assert 1 <= len(writes) <= 4
    gaps = [b - a for a, b in zip(writes, writes[1:])]
    assert all(g >= 0.19 for g in gaps), gaps
    r.close()


def test_read_published_waits_for_the_writer(tmp_path):
    from dynsplit_sglang.runtime.report import read_published

    path = tmp_path / "stats.json"
    assert read_published(path) == {}  # no file yet
    r = Reporter(str(path), min_interval_s=Reporter.MIN_INTERVAL_S)
    r.report(Counter(requests=1))
    r.report(Counter(requests=2))  # within the interval: published after it
    assert read_published(path)["requests"] == 2
    r.close()
