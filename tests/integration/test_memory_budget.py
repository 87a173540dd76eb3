"""The block store is part of SGLang's KV budget: a compressed server's pool plus its store take
no more memory than the same flags give a dense server's pool (tiny model, real servers: the
session's compressed server, and a dense one in the slow run)."""

import json
import urllib.request

import pytest

from dynsplit_sglang.runtime.store import StoreGeometry
from dynsplit_sglang.settings import strip_and_parse

from .client import generate, stats
from .conftest import COMPRESSION_ARGS, MEMORY_ARGS, start_server

pytestmark = pytest.mark.server


# The session server's memory flags, with room enough that --max-total-tokens (8192) bounds
# both pools.
FLAGS = MEMORY_ARGS
# What those flags give a dense server's pool here: the launcher's --max-total-tokens bound
# (checked against a real dense server by the slow test below).
DENSE_TOKENS = 8192


@pytest.fixture(scope="module")
def dense_server(tiny_model, tmp_path_factory):
    with start_server(tiny_model, FLAGS, tmp_path_factory.mktemp("dense")) as handle:
        yield handle


@pytest.fixture(scope="module")
def compressed_server(sglang_server, sglang_server_args):
    """The session server (its static pool and store are what this module checks)."""
    assert sglang_server_args == FLAGS + COMPRESSION_ARGS
    return sglang_server


def _info(server) -> dict:
    with urllib.request.urlopen(server.base_url + "/get_server_info", timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_a_dense_server_gets_the_pool_assumed(dense_server):
    # bounded by --max-total-tokens, not by what the host had free
    assert _info(dense_server)["max_total_num_tokens"] == DENSE_TOKENS


def test_pool_and_store_fit_what_dense_gets(compressed_server, tiny_model):
    server = compressed_server
    generate(server, ["a first request writes the counters ."], max_new=2)
    cfg = json.loads((tiny_model / "config.json").read_text())
    cell = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # fp32
    dense = DENSE_TOKENS
    info = _info(server)
    tokens = info["max_total_num_tokens"]
    s = stats(server)
    # The hook saw SGLang's own dense answer for these flags, and the pool it allocated.
    assert s["dense_max_total_num_tokens"] == dense
    assert s["max_total_num_tokens"] == tokens < dense
    assert s["kv_cell_bytes"] == cell
    # What the store really holds (its tensors' bytes) is what was reserved for it...
    assert s["store_bytes"] == s["store_bytes_reserved"] > 0
    # ...and pool + store stay within the dense pool's bytes; one more token would not.
    assert tokens * cell + s["store_bytes"] <= dense * cell
    _, settings = strip_and_parse(COMPRESSION_ARGS)
    rows = info["max_running_requests"] + 1
    assert s["store_rows_reserved"] == rows

    def store(t):
        return StoreGeometry.for_pool(settings.config, cfg["num_hidden_layers"],
                                      cfg["num_key_value_heads"], cfg["head_dim"], 4, t + 1,
                                      rows, s["store_max_context"]).nbytes

    assert store(tokens) == s["store_bytes"]
    assert (tokens + 1) * cell + store(tokens + 1) > dense * cell
