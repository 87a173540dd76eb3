"""Mixed-strategy load (issue 14): concurrent requests on one shared prefix, each with its own
override, while clients disconnect mid-stream, time out and abort. No crash, no leak, and the
requests that complete are correct and report their own compression."""

import json
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from .client import flush, healthy, post, text, wait_idle

pytestmark = pytest.mark.server

PREFIX = text(350, 41)
MAX_NEW = 16
OVERRIDES = [{"strategy": "dynsplit"}, {"strategy": "fixed"}, {"strategy": "delimiter"},
             {"strategy": "streaming"}, {"strategy": "none"}, {"budget_fraction": 0.5},
             {"budget": 32, "recent": 8}, {"block_size": 16, "tolerance": 4}]


def _body(i, stream=False):
    return {"text": PREFIX + " " + text(10 + i, 100 + i), "stream": stream,
            "rid": f"load-{i}-{uuid.uuid4().hex}",
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"dynsplit": OVERRIDES[i % len(OVERRIDES)]}}}


def _request(server, body, timeout=600):
    req = urllib.request.Request(server.base_url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def _complete(server, i):
    status, out = post(server, "/generate", _body(i))
    return i, status, out


def _disconnect_mid_stream(server, i):
    with _request(server, _body(i, stream=True)) as r:
        r.readline()  # the first chunk arrived: the request is running
    return i, "disconnected", None


def _time_out(server, i):
    try:
        with _request(server, _body(i), timeout=0.5) as r:
            r.read()
    except OSError:  # socket timeout: the client is gone
        return i, "timed out", None
    return i, "finished first", None


def _abort(server, i):
    body = _body(i)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/generate", body)
        time.sleep(1.0)
        post(server, "/abort_request", {"rid": body["rid"]})
        status, out = pending.result()
    return i, status, out


def test_concurrent_mixed_strategies_with_disconnects_and_aborts(sglang_server):
    flush(sglang_server)
    log_from = sglang_server.log_path.stat().st_size
    kinds = [_complete] * 10 + [_disconnect_mid_stream] * 3 + [_time_out] * 2 + [_abort] * 3
    with ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(lambda a: a[1](sglang_server, a[0]), enumerate(kinds)))
    assert len(results) == 18
    for i, status, out in results:
        if kinds[i] is _complete:
            assert status == 200, out
            mine = out["meta_info"]["dynsplit"]
            assert out["meta_info"]["completion_tokens"] == MAX_NEW
            assert mine["source"] == "custom_params" and mine["decode_steps"] == MAX_NEW - 1
            want = OVERRIDES[i % len(OVERRIDES)]
            assert mine["strategy"] == want.get("strategy", "dynsplit")
            assert mine["budget"] == want.get("budget", None if "budget_fraction" in want
                                              or want.get("strategy") == "none" else 64)
            if want.get("strategy") == "none":
                assert mine["tokens_attended"] == mine["tokens_dense"]
            else:
                assert mine["tokens_attended"] < mine["tokens_dense"]
        elif kinds[i] is _abort:  # aborted while running, or already done: both are answers
            assert status == 200 or 400 <= status < 500, out
    load = wait_idle(sglang_server, timeout=120)
    assert load["num_used_tokens"] == 0 and load["num_running_reqs"] == 0, load
    assert healthy(sglang_server)
    # The server still answers correctly: the same request alone gives the same text.
    i = kinds.index(_complete)
    flush(sglang_server)
    assert post(sglang_server, "/generate", _body(i))[1]["text"] == results[i][2]["text"]
    with open(sglang_server.log_path, errors="replace") as f:
        f.seek(log_from)
        log = f.read()
    assert "Traceback" not in log and "memory leak" not in log
