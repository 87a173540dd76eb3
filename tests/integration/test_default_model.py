"""The default model (SmolLM2-135M-Instruct, fp32): a budget that covers the context changes
nothing, token for token, single requests and a batch of 8 mixed-length requests."""

import pytest

from dynsplit_sglang.overrides import request_id

from .client import generate, text

pytestmark = pytest.mark.server


def test_covering_budget_is_token_identical_to_dense(default_server):
    prompts = [text(n, 40 + n) for n in (30, 90, 150, 60, 200, 120, 45, 180)]  # < 512 tokens
    covered, _ = generate(default_server, prompts, [request_id() for _ in prompts], max_new=16)
    dense, _ = generate(default_server, prompts, [request_id(strategy="none") for _ in prompts],
                        max_new=16)
    assert covered == dense
    single, _ = generate(default_server, prompts[4:5], [request_id(budget=4096)], max_new=16)
    assert single == dense[4:5]
    long = text(700, 41)  # longer than the server's budget: compressed unless covered
    a, _ = generate(default_server, [long], [request_id(budget=8192)], max_new=16)
    b, _ = generate(default_server, [long], [request_id(strategy="none")], max_new=16)
    assert a == b
