"""DynSplit compression through a real SGLang server (tiny model, CPU, every layer compressed).

The session server runs ``--kv-compression dynsplit`` with a 64-token budget; requests switch
strategy or budget through their rid (``dynsplit_sglang.overrides.request_id``).
"""

import pytest

from dynsplit_sglang.overrides import request_id

from .client import flush, generate, stats, text

pytestmark = pytest.mark.server

def test_budget_covering_the_context_is_token_identical_to_dense(sglang_server):
    prompts = [text(n, i) for i, n in enumerate([5, 9, 14, 20, 26, 31, 12, 3])]  # all < budget
    covered, _ = generate(sglang_server, prompts, [request_id() for _ in prompts])
    dense, _ = generate(sglang_server, prompts, [request_id(strategy="none") for _ in prompts])
    assert covered == dense
    long_prompt = text(220, 99)  # longer than the server's budget: cover it per request
    a, _ = generate(sglang_server, [long_prompt], [request_id(budget=4096)], max_new=16)
    b, _ = generate(sglang_server, [long_prompt], [request_id(strategy="none")], max_new=16)
    assert a == b


def test_attended_tokens_never_exceed_the_budget(sglang_server):
    before = stats(sglang_server)
    outs, meta = generate(sglang_server, [text(300, 7)], max_new=16)
    after = stats(sglang_server)
    steps = after["sparse_layer_steps"] - before.get("sparse_layer_steps", 0)
    attended = after["tokens_attended"] - before.get("tokens_attended", 0)
    dense = after["tokens_dense"] - before.get("tokens_dense", 0)
    assert steps >= 15 * 2  # 15+ sparse decode steps x 2 compressed layers
    assert after["max_tokens_attended"] <= 64
    assert attended <= 64 * 2 * steps  # 2 KV heads
    assert dense / attended > 3  # a ~300-token context read through a 64-token budget
    assert len(outs[0]) > 0


def test_shared_prefix_is_built_once_and_outputs_match_running_alone(sglang_server):
    flush(sglang_server)
    prefix = text(1500, 11)
    prompts = [prefix + " " + text(12, 100 + i) for i in range(16)]
    first, _ = generate(sglang_server, prompts[:1])
    s0 = stats(sglang_server)
    shared_out = list(first)
    for p in prompts[1:]:
        o, meta = generate(sglang_server, [p])
        assert meta[0]["cached_tokens"] > 1000  # the radix tree served the prefix
        shared_out += o
    s1 = stats(sglang_server)
    built = s1["blocks_built"] - s0["blocks_built"]
    reused = s1["blocks_reused"] - s0.get("blocks_reused", 0)
    prefix_blocks = s0["blocks_built"] - 0  # upper bound for what request 0 built
    assert reused >= 15 * 100  # ~1.8k prefix tokens in blocks of 6-10
    assert built <= 15 * 12  # each request builds only its own tail's blocks
    assert built < prefix_blocks
    for p, expect in zip(prompts, shared_out):
        flush(sglang_server)
        alone, _ = generate(sglang_server, [p])
        assert alone[0] == expect


def test_mixed_strategies_and_lengths_in_one_batch(sglang_server):
    prompts = [text(n, 200 + n) for n in (40, 180, 260, 90, 300, 15)]
    strategies = ("dynsplit", "fixed", "delimiter", "streaming", "dynsplit", "fixed")
    batched, _ = generate(sglang_server, prompts, [request_id(strategy=s) for s in strategies])
    for p, s, expect in zip(prompts, strategies, batched):
        flush(sglang_server)
        alone, _ = generate(sglang_server, [p], [request_id(strategy=s)])
        assert alone[0] == expect, (s, len(p))
    assert stats(sglang_server)["max_tokens_attended"] <= 64


def test_counters_reach_prometheus_metrics(sglang_server):
    import urllib.request

    generate(sglang_server, [text(150, 77)], max_new=6)
    s = stats(sglang_server)  # settled: the writer has published the last forward, file and
    # Prometheus in the same write (at most Reporter.MIN_INTERVAL_S after the forward)
    body = urllib.request.urlopen(sglang_server.base_url + "/metrics", timeout=60).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
              if line.startswith("sglang:dynsplit_")}
    assert values["sglang:dynsplit_blocks_built_total"] == s["blocks_built"]
    assert values["sglang:dynsplit_tokens_attended_total"] == s["tokens_attended"]
    assert values["sglang:dynsplit_compression_ratio"] > 1.0


def test_agent_frontend_example_reuses_the_shared_prefix(sglang_server, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "agent_frontend.py"
    spec = importlib.util.spec_from_file_location("agent_frontend", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before = stats(sglang_server)
    result = example.run(sglang_server.base_url)
    after = stats(sglang_server)
    assert all(c > 0 for c in result["cached"])  # every second turn hit the radix cache
    assert after["blocks_reused"] - before.get("blocks_reused", 0) > 50
    # Each session's own override reached the server through the frontend, and came back.
    used = [(c["source"], c["strategy"], c["budget"], c["budget_fraction"])
            for c in result["compression"]]
    assert used == [("server", "dynsplit", 64, None), ("custom_params", "dynsplit", None, 0.5),
                    ("custom_params", "fixed", 256, None)]
    # The dynsplit sessions adopt the shared prefix's blocks; the fixed one splits it its own
    # way (its blocks of that prefix are private to each request, see docs/design.md).
    assert [c["blocks_reused"] > 50 for c in result["compression"]] == [True, True, False]
    assert "DynSplit counters" in capsys.readouterr().out
