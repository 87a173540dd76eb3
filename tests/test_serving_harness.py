"""The serving benchmark's guards against measuring a server that did not run the request:
a probe SGLang aborted (it answers 200) or cut short, and a KV pool smaller than the longest
prompt. A local HTTP stand-in answers the probe, as SGLang's /generate stream does."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[1] / "benchmarks" / "serving"
# Appended, not put first: other benchmarks' tests import their own `run` and `report` by name
# (so run.py, which puts its folder first, is not imported here).
sys.path.append(str(SERVING))

import workload as wl  # noqa: E402


def _stream(chunks):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            for meta in chunks:
                self.wfile.write(b"data: " + json.dumps({"meta_info": meta}).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("chunks,match", [
    ([{"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 0,
       "finish_reason": {"type": "abort", "message": "Input length (16248 tokens) exceeds"}}],
     "aborted the probe: Input length"),
    ([{"prompt_tokens": 9, "completion_tokens": n, "cached_tokens": 0,
       "finish_reason": None} for n in (1, 2)], "asked for 4 tokens and got 2"),
])
def test_a_probe_the_server_did_not_run_as_asked_raises(chunks, match):
    srv = _stream(chunks)
    try:
        with pytest.raises(RuntimeError, match=match):
            wl.decode_probe(f"http://127.0.0.1:{srv.server_port}", [1] * 9, 4)
    finally:
        srv.shutdown()


def test_a_full_probe_is_measured():
    srv = _stream([{"prompt_tokens": 9, "completion_tokens": n, "cached_tokens": 8,
                    "finish_reason": None} for n in range(1, 5)])
    try:
        p = wl.decode_probe(f"http://127.0.0.1:{srv.server_port}", [1] * 9, 4)
    finally:
        srv.shutdown()
    assert p["completion_tokens"] == 4 and p["cached_tokens"] == 8 and p["tpot_ms"] > 0


def test_a_pool_below_the_longest_prompt_is_refused(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("[t] max_total_num_tokens=6175, chunked_prefill_size=4096, ...\n")
    with pytest.raises(SystemExit, match="6175 slots, below the 16384-token prompt"):
        wl.check_pool(log, 16384, "dynsplit@1/8")
    wl.check_pool(log, 6000, "dynsplit@1/8")  # fits: no error
    log.write_text("no pool line\n")
    with pytest.raises(SystemExit, match="None slots"):
        wl.check_pool(log, 10, "none")
