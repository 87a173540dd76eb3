"""Start, wait for and stop a ``python -m sglang.launch_server`` subprocess (stdlib only).

Used by ``examples/multiturn_demo.py`` and the test fixtures, so the CPU launch flags live in
one place: ``CPU_SERVER_ARGS``. Extra flags (later ``--kv-compression dynsplit``) are appended
per call.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# torch_native: the attention backend SGLang runs on CPU without sgl_kernel/flashinfer.
# No CUDA graphs on CPU; warm-up is skipped because /health is polled anyway.
# A small KV pool keeps RSS low on a 2-core/24 GiB host; enable-cache-report puts
# cached_tokens into the OpenAI usage block. sleep-on-idle: an idle scheduler otherwise spins a
# whole core, which on 2 cores halves whatever else runs (a test session keeps servers alive).
CPU_SERVER_ARGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--disable-cuda-graph",
    "--skip-server-warmup",
    "--dtype", "float32",
    "--max-total-tokens", "8192",
    "--mem-fraction-static", "0.2",
    "--max-running-requests", "8",
    "--enable-cache-report",
    "--sleep-on-idle",
]  # fmt: skip


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


LAUNCH_SERVER = (sys.executable, "-m", "sglang.launch_server")
# SGLang's recommended entry point (the console script next to this interpreter).
SGLANG_SERVE = (os.path.join(os.path.dirname(sys.executable), "sglang"), "serve")


def server_command(model_path, port: int, host: str = "127.0.0.1", extra_args=(),
                   entry=LAUNCH_SERVER, base_args=None) -> list[str]:
    """base_args: the flags before extra_args (default CPU_SERVER_ARGS; a GPU run passes its
    own, e.g. benchmarks/gpu/serve_check.py)."""
    return [
        *entry,
        "--model-path", str(model_path),
        "--host", host, "--port", str(port),
        *(CPU_SERVER_ARGS if base_args is None else base_args), *extra_args,
    ]  # fmt: skip


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    command: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-n:]) if text else "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        stop_server(self.proc, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# uvicorn's message when the port is taken: free_port() only finds a port free at that moment,
# and another process (a live server's own ports are chosen at random too) may bind it before
# the new server does.
PORT_TAKEN = "address already in use"


def start_server(
    model_path,
    extra_args=(),
    log_path=None,
    port: int | None = None,
    host: str = "127.0.0.1",
    health_timeout: float = 300.0,
    env: dict | None = None,
    entry=LAUNCH_SERVER,
    base_args=None,
    attempts: int = 3,
) -> ServerHandle:
    """Launch a server in its own process group and wait until /health answers 200.

    ``env`` is the server's complete environment (default: this process's); ``entry`` the
    command before the flags (``SGLANG_SERVE`` for ``sglang serve``). Without a ``port``, one
    is picked, and picked again (up to ``attempts`` starts) when the server finds it taken.
    """
    tries = 1 if port is not None else max(1, attempts)
    for attempt in range(1, tries + 1):
        handle = _launch(model_path, extra_args, log_path, port or free_port(host), host, env,
                         entry, base_args)
        try:
            wait_healthy(handle, health_timeout)
        except RuntimeError:  # it exited: again on another port if that one was taken
            handle.stop()
            if attempt < tries and PORT_TAKEN in handle.log_text():
                continue
            raise
        except BaseException:
            handle.stop()
            raise
        return handle


def _launch(model_path, extra_args, log_path, port, host, env, entry, base_args) -> ServerHandle:
    model_path = Path(model_path).resolve() if Path(model_path).exists() else model_path
    if log_path is None:
        from dynsplit_sglang.models import cache_dir

        log_path = cache_dir() / "logs" / f"sglang-server-{port}.log"
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(model_path, port, host, extra_args, entry, base_args)
    with open(log_path, "wb") as log:
        # A neutral cwd: from the repo root `import kernels` would find our kernels/ folder.
        # start_new_session: one killpg reaches the scheduler and detokenizer too.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            env=dict(os.environ) if env is None else env,
            start_new_session=True,
        )
    return ServerHandle(proc, f"http://{host}:{port}", log_path, cmd)


def wait_healthy(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(
                f"SGLang server exited with code {handle.proc.returncode} before becoming "
                f"healthy; log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            with urllib.request.urlopen(handle.base_url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(
        f"SGLang server at {handle.base_url} not healthy after {timeout:.0f} s "
        f"(startup takes 40-90 s on 2 CPU cores); log {handle.log_path}:\n{handle.log_tail()}"
    )


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group, wait, SIGKILL what is left, and reap the main pid."""
    pgid = proc.pid  # start_new_session made the main pid the group id
    try:
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # The scheduler/detokenizer may outlive the main process by a moment.
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:  # also when interrupted (Ctrl-C, SIGTERM turned into SystemExit): no orphans
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def post_json(url: str, payload: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
