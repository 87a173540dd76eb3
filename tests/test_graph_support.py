"""Compression with SGLang's CUDA graphs is refused at start-up until proven on a GPU (no server).

The arguments are SGLang 0.5.23's own ServerArgs, parsed by ``prepare_server_args`` and resolved
by ``resolve_once`` as the launcher does, on this CPU host.
"""

import pytest

from dynsplit_sglang import graph_support
from dynsplit_sglang.core import ConfigError
from dynsplit_sglang.launcher import CPU_SERVER_ARGS
from dynsplit_sglang.settings import ENV, Settings, validate_server_args

ON = Settings.from_mapping({"kv_compression": "dynsplit"})


@pytest.fixture(scope="module")
def server_args():
    """argv -> (unresolved, resolved) ServerArgs of the tiny model on this host."""
    from sglang.srt.server_args import prepare_server_args

    from dynsplit_sglang import models

    path = str(models.ensure(models.TINY_MODEL))

    def build(*flags):
        # Compression off while SGLang parses: the plugin's own prepare_server_args hook (if an
        # earlier test loaded it) would otherwise validate with settings left in the environment.
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv(ENV, raising=False)
            raw = prepare_server_args(["--model-path", path, "--device", "cpu", *flags])
            resolved = prepare_server_args(["--model-path", path, "--device", "cpu", *flags])
            resolved.resolve_once()
        return raw, resolved

    return build


def test_graphs_on_with_compression_is_refused_naming_the_flag(server_args):
    # triton keeps SGLang's decode graph on (its default backend is "full").
    for sa in server_args("--attention-backend", "triton"):
        assert "decode" in graph_support.graph_phases_on(sa)
        with pytest.raises(ConfigError) as err:
            validate_server_args(ON, sa)
        msg = str(err.value)
        assert "--disable-cuda-graph" in msg and "\n" not in msg
        validate_server_args(Settings(), sa)  # compression off: SGLang's business


@pytest.mark.parametrize("flags", [
    ("--attention-backend", "triton", "--disable-cuda-graph"),
    ("--attention-backend", "triton", "--disable-decode-cuda-graph",
     "--disable-prefill-cuda-graph"),
    ("--attention-backend", "torch_native"),  # SGLang turns graphs off for torch_native
])
def test_graphs_off_start(server_args, flags):
    for sa in server_args(*flags):
        assert graph_support.graph_phases_on(sa) == []
        validate_server_args(ON, sa)


def test_cpu_launcher_passes_disable_cuda_graph(server_args):
    assert "--disable-cuda-graph" in CPU_SERVER_ARGS
    for sa in server_args(*CPU_SERVER_ARGS):
        assert graph_support.graph_phases_on(sa) == []
        validate_server_args(ON, sa)


def test_refusal_lifts_only_for_verified_phases_or_the_check_override(server_args, monkeypatch):
    raw, resolved = server_args("--attention-backend", "triton")
    monkeypatch.setattr(graph_support, "VERIFIED_PHASES", frozenset({"decode"}))
    validate_server_args(ON, resolved)  # resolved on this host: decode only
    with pytest.raises(ConfigError, match="prefill"):
        validate_server_args(ON, raw)  # unresolved: prefill may be captured on a GPU
    monkeypatch.setattr(graph_support, "VERIFIED_PHASES", frozenset())
    monkeypatch.setenv(graph_support.UNVERIFIED_ENV, "1")
    validate_server_args(ON, raw)
    monkeypatch.setenv(graph_support.UNVERIFIED_ENV, "0")
    with pytest.raises(ConfigError, match="--disable-cuda-graph"):
        validate_server_args(ON, raw)


def test_nothing_is_verified_yet():
    # Flipped by whoever runs benchmarks/gpu/check.sh on a GPU and it passes (see CHANGELOG.md).
    assert graph_support.VERIFIED_PHASES == frozenset()


def test_sglang_switches_around_graphs_that_the_plan_cannot_follow(server_args, monkeypatch):
    raw, resolved = server_args("--attention-backend", "triton")
    monkeypatch.setattr(graph_support, "VERIFIED_PHASES", frozenset({"decode", "prefill"}))
    validate_server_args(ON, resolved)
    monkeypatch.setenv("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "1")
    with pytest.raises(ConfigError, match="SGLANG_ENABLE_METADATA_GLUE_GRAPH=1"):
        validate_server_args(ON, resolved)
    off, _ = server_args("--attention-backend", "triton", "--disable-cuda-graph")
    validate_server_args(ON, off)  # no graphs: nothing to capture
