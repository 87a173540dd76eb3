"""One real SGLang server per test session (tiny model, CPU, torch_native, float32).

Startup costs 20-60 s on 2 cores, so tests share ``sglang_server``. Its extra launch flags come
from the ``sglang_server_args`` fixture: override that fixture (e.g. in a sub-folder conftest)
to run a folder's tests against a differently configured server, or call ``start_server``
directly for a one-off server.
"""

import contextlib
import os
from pathlib import Path

import pytest

from dynsplit_sglang import launcher, models

# Set by the kernel tests' conftest for the test process; the server must not inherit it
# unless a test asks for it (pass env={"TRITON_INTERPRET": "1"}).
_NOT_INHERITED = ("TRITON_INTERPRET",)


def start_server(model, extra_args=(), log_dir=None, env=None, **kwargs) -> launcher.ServerHandle:
    """Start ``python -m sglang.launch_server`` with the shared CPU flags plus ``extra_args``.

    Returns a handle with ``base_url``, ``log_path``, ``proc`` and ``stop()``.
    """
    server_env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    server_env.update(env or {})
    log_dir = Path(log_dir or models.cache_dir() / "logs")
    log_path = log_dir / f"sglang-{Path(str(model)).name}-{os.getpid()}-{launcher.free_port()}.log"
    return launcher.start_server(model, list(extra_args), log_path, env=server_env, **kwargs)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return models.ensure(models.TINY_MODEL)


# Every layer compressed and a small budget, so the tiny model's short prompts exercise the
# sparse path; requests override strategy and budget through their rid (dynsplit_sglang.overrides).
COMPRESSION_ARGS = [
    "--kv-compression", "dynsplit", "--dynsplit-budget", "64", "--dynsplit-recent", "16",
    "--dynsplit-dense-layers", "0", "--dynsplit-block-size", "8", "--dynsplit-tolerance", "2",
    "--dynsplit-future-window", "8", "--enable-metrics",
]  # fmt: skip


# The default model's server, shared by the tests that need a real pretrained model. No overlap
# scheduling: the DynSplit counters then cover exactly the forwards of the request in flight.
DEFAULT_MODEL_ARGS = ["--kv-compression", "dynsplit", "--dynsplit-budget", "512",
                      "--max-total-tokens", "8192", "--disable-overlap-schedule"]


@contextlib.contextmanager
def default_model_server(args, log_dir: Path):
    """SmolLM2-135M-Instruct (fp32) with these flags; ``.stats_path``: its DynSplit counters."""
    stats = log_dir / "dynsplit-stats.json"
    with start_server(models.ensure(models.DEFAULT_MODEL), args, log_dir,
                      env={"DYNSPLIT_STATS_PATH": str(stats)}) as handle:
        handle.stats_path = stats
        yield handle


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The default model behind one server for the session."""
    with default_model_server(DEFAULT_MODEL_ARGS, tmp_path_factory.mktemp("default")) as handle:
        yield handle


# Room enough that the launcher's --max-total-tokens (8192) bounds the pool, dense or compressed:
# with the CPU flags' 0.2 the pool is what SGLang's profiler finds free, which moves with the
# host's load (tests/integration/test_memory_budget.py checks the pool against this bound).
MEMORY_ARGS = ["--mem-fraction-static", "0.6"]
SESSION_ARGS = [*MEMORY_ARGS, *COMPRESSION_ARGS]


@pytest.fixture(scope="session")
def sglang_server_args() -> list[str]:
    """Extra launch_server flags for the session server."""
    return SESSION_ARGS


@pytest.fixture(scope="session")
def sglang_server(tiny_model, sglang_server_args, tmp_path_factory):
    """The session's server: yields a handle (``.base_url``, ``.log_path``, ``.stats_path``: the
    scheduler's DynSplit counters as JSON); stopped at the end."""
    log_dir = tmp_path_factory.mktemp("sglang")
    stats = log_dir / "dynsplit-stats.json"
    handle = start_server(tiny_model, sglang_server_args, log_dir,
                          env={"DYNSPLIT_STATS_PATH": str(stats)})
    handle.stats_path = stats
    try:
        yield handle
    finally:
        handle.stop()
