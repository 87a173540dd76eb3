"""Compression on other server set-ups, each compared with the session server's outputs:
SGLang's triton backend (Triton interpreter, our Triton kernels forced) and a KV pool small
enough to force radix eviction and slot reuse."""

import pytest

from dynsplit_sglang.overrides import request_id

from .conftest import COMPRESSION_ARGS, start_server
from .client import generate, stats, text

pytestmark = pytest.mark.server


def test_triton_backend_in_the_interpreter_matches_torch_native(sglang_server, tiny_model,
                                                                 tmp_path):
    prompts = [text(n, 300 + n) for n in (90, 140)]  # kept small: the interpreter is slow
    rids = [request_id(strategy=s) for s in ("dynsplit", "fixed")]
    env = {"TRITON_INTERPRET": "1", "DYNSPLIT_KERNELS": "triton",
           "DYNSPLIT_STATS_PATH": str(tmp_path / "stats.json")}
    args = COMPRESSION_ARGS + ["--attention-backend", "triton"]
    with start_server(tiny_model, args, tmp_path, env=env) as server:
        server.stats_path = tmp_path / "stats.json"
        got, _ = generate(server, prompts, rids, max_new=8)
        s = stats(server)
    want, _ = generate(sglang_server, prompts, [request_id(strategy=s) for s in
                                                 ("dynsplit", "fixed")], max_new=8)
    assert got == want
    assert s["sparse_layer_steps"] > 0 and s["max_tokens_attended"] <= 64


def test_small_pool_forces_eviction_without_stale_reads(sglang_server, tiny_model, tmp_path):
    prefixes = [text(260, 500 + k) for k in range(4)]
    # Each prefix twice in a row: the second request hits the tree; by the time a prefix comes
    # back, two others have pushed it out of the 700-token pool.
    prompts = [prefixes[(i // 2) % 4] + " " + text(8, 600 + i) for i in range(32)]
    env = {"DYNSPLIT_STATS_PATH": str(tmp_path / "stats.json")}
    small = COMPRESSION_ARGS + ["--max-total-tokens", "700"]
    with start_server(tiny_model, small, tmp_path, env=env) as server:
        server.stats_path = tmp_path / "stats.json"
        got, hits = [], 0
        for p in prompts:
            o, meta = generate(server, [p], max_new=10)
            got += o
            hits += meta[0]["cached_tokens"] > 0
        s = stats(server)
    assert 12 <= hits <= 20
    assert s["blocks_reused"] > 0 and s["requests"] >= 32
    want = []
    for p in prompts:
        want += generate(sglang_server, [p], max_new=10)[0]
    assert got == want
