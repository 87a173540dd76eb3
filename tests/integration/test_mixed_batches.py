"""Dense, dense-by-length and compressed requests decoded in one batch (issue 14, crash 1).

A ``strategy=none`` request's budget became the capacity of the whole batch's selection tensors,
so the first decode step it shared with a longer compressed request tried to allocate
[B, Hkv, 2**31] positions and killed the server with every request in flight.
"""

import uuid

import pytest

from dynsplit_sglang.overrides import request_id

from .client import generate, healthy, post, stats, text

pytestmark = pytest.mark.server


def test_dense_and_compressed_requests_share_decode_batches(sglang_server):
    before = stats(sglang_server)
    prompts = [text(220, 1), text(300, 2), text(12, 3), text(260, 4), text(30, 5)]
    # dense (rid alias), compressed, dense by length, a budget of the whole context window
    # (8192 tokens, far above the prompt), dense (custom_params)
    rids = [request_id(strategy="none"), request_id(), request_id(), request_id(budget=8192),
            f"plain-{uuid.uuid4().hex}"]
    sp = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, out = post(sglang_server, "/generate", {
        "text": prompts, "rid": rids, "sampling_params": [sp] * 4 + [
            {**sp, "custom_params": {"dynsplit": {"strategy": "none"}}}]})
    assert status == 200, out
    meta = [o["meta_info"] for o in out]
    assert [m["completion_tokens"] for m in meta] == [8] * 5
    assert [m["dynsplit"]["strategy"] for m in meta] == ["none", "dynsplit", "dynsplit",
                                                         "dynsplit", "none"]
    assert all(o["text"] for o in out)
    after = stats(sglang_server)
    # The batch decoded through the sparse path (the 300-word request is over its budget).
    assert after["sparse_steps"] - before.get("sparse_steps", 0) >= 7
    assert healthy(sglang_server)
    again, _ = generate(sglang_server, [text(40, 6)], max_new=4)
    assert again[0]
