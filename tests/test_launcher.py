"""The launcher's start-up: a port taken between free_port() and the server's bind is retried on
another port; any other early exit is reported at once. A stand-in server (this file's
``serve`` below, run as the launcher's entry command) keeps these tests fast and SGLang-free."""

import sys
from pathlib import Path

import pytest

from dynsplit_sglang import launcher

STAND_IN = f"""
import http.server, os, sys
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
count = os.environ["STAND_IN_COUNT"]
n = int(open(count).read()) if os.path.exists(count) else 0
open(count, "w").write(str(n + 1))
with open(os.environ["STAND_IN_PORTS"], "a") as f:
    f.write(f"{{port}}\\n")
if n < int(os.environ["STAND_IN_FAILS"]):
    print("ERROR:    [Errno 98] error while attempting to bind on address "
          "('127.0.0.1', %d): " % port + os.environ["STAND_IN_ERROR"], flush=True)
    sys.exit(3)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _start(tmp_path: Path, fails: int, error: str = launcher.PORT_TAKEN, **kw):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    env = {"STAND_IN_COUNT": str(tmp_path / "count"), "STAND_IN_PORTS": str(tmp_path / "ports"),
           "STAND_IN_FAILS": str(fails), "STAND_IN_ERROR": error, "PATH": "/usr/bin:/bin"}
    return launcher.start_server("no-model", log_path=tmp_path / "server.log", env=env,
                                 entry=(sys.executable, str(script)), base_args=[],
                                 health_timeout=30, **kw)


def _ports(tmp_path: Path) -> list[int]:
    return [int(p) for p in (tmp_path / "ports").read_text().split()]


def test_a_taken_port_is_retried_on_another(tmp_path):
    with _start(tmp_path, fails=2) as h:
        assert h.proc.poll() is None
        ports = _ports(tmp_path)
        assert len(ports) == 3  # two starts found their port taken, the third served
        assert h.base_url.endswith(f":{ports[-1]}")
        assert "Errno 98" not in h.log_text()  # the log is the server that runs
    assert h.proc.poll() is not None  # stopped on exit


def test_retries_are_bounded(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 3") as err:
        _start(tmp_path, fails=5, attempts=2)
    assert len(_ports(tmp_path)) == 2
    assert launcher.PORT_TAKEN in str(err.value)  # the log tail says why


def test_other_early_exits_are_not_retried(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 3"):
        _start(tmp_path, fails=5, error="out of memory")
    assert len(_ports(tmp_path)) == 1


def test_a_port_the_caller_chose_is_not_changed(tmp_path):
    port = launcher.free_port()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        _start(tmp_path, fails=1, port=port)
    assert _ports(tmp_path) == [port]

