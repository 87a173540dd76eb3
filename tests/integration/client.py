"""Small HTTP helpers for the server tests."""

import json
import time
import random

from dynsplit_sglang.launcher import post_json
from dynsplit_sglang.runtime.report import Reporter

WORDS = ("the model reads a long document , then answers ; every block ends at a delimiter . "
         "semantic splitting keeps related tokens together ! code ( x ) differs from prose ? "
         "\n").split(" ")


def text(n_words, seed):
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(n_words))


def generate(server, prompts, rids=None, max_new=12):
    payload = {"text": prompts, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                    "ignore_eos": True}}
    if rids is not None:
        payload["rid"] = rids
    out = post_json(server.base_url + "/generate", payload)
    return [o["text"] for o in out], [o["meta_info"] for o in out]


def stats(server, settle_s: float = 2.5 * Reporter.MIN_INTERVAL_S, timeout: float = 3.0) -> dict:
    """The server's DynSplit counters. A writer thread publishes them after the forwards, at
    most once per Reporter.MIN_INTERVAL_S (runtime/report.py), so a response can arrive before
    its last forward's counters: read until two reads `settle_s` apart agree (longer than the
    writer's interval, with room for a loaded 2-core host)."""
    def read():
        try:
            return json.loads(server.stats_path.read_text())
        except (OSError, ValueError):  # not written yet, or replaced between open and read
            return {}

    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = read()
        if now == last and now:
            return now
        last = now
    return last


def flush(server, timeout=60):
    """Empty the radix cache. SGLang 0.5.23 answers 400 while its scheduler still holds a
    request, which it does for one loop iteration after the response of a finished one has gone
    out (``is_fully_idle``: running batch, last batch); so a 400 is retried until it is idle."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(server.base_url + "/flush_cache",
                                                          method="POST"), timeout=60).read()
            return
        except urllib.error.HTTPError as e:
            if e.code != 400 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def post(server, path, body, timeout=300):
    """(status, decoded JSON or text) of a POST; ``body`` is sent as JSON unless it is bytes."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.base_url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def get_json(server, path, timeout=60):
    import urllib.request

    with urllib.request.urlopen(server.base_url + path, timeout=timeout) as r:
        return json.loads(r.read())


def wait_idle(server, timeout=60.0) -> dict:
    """Poll /v1/loads until no request runs or waits; return the last load of DP rank 0."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        load = get_json(server, "/v1/loads")["loads"][0]
        if (load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0
                and load["num_used_tokens"] == 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.5)


def healthy(server) -> bool:
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/health", timeout=30) as r:
        return r.status == 200
