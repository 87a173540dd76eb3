"""--dynsplit-evict-tier host through a real SGLang server (SmolLM2-135M, CPU): what the first
turn evicts goes to the cold tier, a next turn that extends the conversation through the radix
tree brings it back before its prompt is attended, the tree and the pool stay consistent (SGLang
checks free + evictable == total at idle and kills the server otherwise), and a flush or the
tree dropping a node leaves the tier with nothing unreachable.

Same prompts as test_eviction.py (token ids, 5 x 512 tokens, the chunked-prefill size).
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynsplit_sglang.launcher import post_json

from .client import flush as _flush
from .client import stats
from .conftest import default_model_server
from .test_eviction import (
    BUDGET, CHUNK, EVICT_ARGS, PROMPT_LEN, QUESTIONS, _assert_healthy, _post, _prompt, _story,
    tokenizer,
)

pytestmark = pytest.mark.server
__all__ = ["tokenizer"]  # the module fixture, shared

TIER_ARGS = [*EVICT_ARGS, "--dynsplit-evict-tier", "host", "--dynsplit-evict-tier-mb", "256"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with default_model_server(TIER_ARGS, tmp_path_factory.mktemp("tier")) as handle:
        yield handle


def _gen(server, ids, max_new=8, logprob=False):
    out = post_json(server.base_url + "/generate", {
        "input_ids": ids, "return_logprob": logprob,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True},
    })
    return out


def _settled(server, key, want, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (s := stats(server)).get(key, 0) < want:
        assert time.monotonic() < deadline, (key, want, s)
    return s


@pytest.fixture(scope="module")
def conversation(server, tokenizer):
    """Turn 1 (a 2560-token report and a question), then turn 2: turn 1's prompt and another
    question, one request that matches turn 1's prompt in the tree. (Not turn 1's answer: its
    K/V were computed by decode steps that read only what eviction kept, so no cold prefill
    could reproduce them; the prompt's K/V come from the same prefill chunks either way.)"""
    _flush(server)
    t1 = _prompt(tokenizer, "Kilo", 21, QUESTIONS[0])
    o1 = _gen(server, t1)
    q2 = tokenizer.encode(QUESTIONS[1], add_special_tokens=False)
    t2 = t1 + q2
    s1 = _settled(server, "tier_tokens_moved_out", 1)
    o2 = _gen(server, t2, max_new=1, logprob=True)
    s2 = _settled(server, "tier_tokens_recalled", 1)
    return t1, o1, t2, o2, s1, s2


def test_the_first_turn_moves_what_it_evicts_to_the_tier(server, conversation):
    _, o1, _, _, s1, _ = conversation
    m = o1["meta_info"]["dynsplit"]
    assert m["tier_tokens_moved_out"] == s1["slots_evicted"] > PROMPT_LEN // 2
    assert m["tier_tokens_recalled"] == 0
    assert s1["tier_bytes_held"] > 0 and s1.get("tier_tokens_dropped", 0) == 0


def test_a_next_turn_brings_every_evicted_block_back_and_answers_as_a_cold_prompt(
        server, conversation):
    """Turn 2 recalls all that turn 1 moved out (the tier is large enough), so its dense prefill
    reads the whole conversation: its first token and its log-probability are those of the same
    ids prefilled cold, after a flush (which also empties the tier)."""
    t1, o1, t2, o2, s1, s2 = conversation
    m2 = o2["meta_info"]
    assert m2["cached_tokens"] >= len(t1)  # a radix hit on turn 1
    assert m2["dynsplit"]["tier_tokens_recalled"] == o1["meta_info"]["dynsplit"][
        "tier_tokens_moved_out"]
    assert m2["dynsplit"]["tier_tokens_moved_out"] > 0  # and its prompt's end decided again
    assert m2["dynsplit"]["tier_recall_ms"] > 0 and o1["meta_info"]["dynsplit"][
        "tier_recall_ms"] == 0
    _flush(server)
    s3 = _settled(server, "tier_tokens_flushed", 1)
    assert s3["tier_bytes_held"] == 0
    cold = _gen(server, t2, max_new=1, logprob=True)
    assert cold["meta_info"]["dynsplit"]["tier_tokens_recalled"] == 0
    assert cold["output_ids"] == o2["output_ids"]
    lp_turn, lp_cold = (x["meta_info"]["output_token_logprobs"][0][0] for x in (o2, cold))
    assert abs(lp_turn - lp_cold) < 1e-4, (lp_turn, lp_cold)
    _assert_healthy(server)


def test_with_hold_a_next_turn_ranks_the_tier_without_raising_its_peak(server, tokenizer):
    """Per request evict_hold 1: turn 2 does not bring everything back; its window ranks the
    pool's and the tier's blocks together and only the tier's winners come back, into slots
    its losers freed, so its peak stays its kept part plus its new tokens."""
    _flush(server)
    hold = {"custom_params": {"dynsplit": {"evict_hold": 1}}}
    t1 = _prompt(tokenizer, "Romeo", 41, QUESTIONS[0])
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, **hold}
    o1 = post_json(server.base_url + "/generate", {"input_ids": t1, "sampling_params": params})
    t2 = t1 + tokenizer.encode(QUESTIONS[1], add_special_tokens=False)
    o2 = post_json(server.base_url + "/generate", {"input_ids": t2, "sampling_params": params})
    m1, m2 = o1["meta_info"]["dynsplit"], o2["meta_info"]["dynsplit"]
    assert o2["meta_info"]["cached_tokens"] >= len(t1)
    assert 0 < m2["tier_tokens_recalled"] < m1["tier_tokens_moved_out"]
    assert m2["prefill_peak_slots"] <= len(t1) - m1["tier_tokens_moved_out"] + (len(t2) - len(t1))
    assert m2["prefill_peak_slots"] < len(t2) // 2
    time.sleep(2.0)
    _assert_healthy(server)


def test_nodes_leaving_the_tree_leave_the_tier(server, tokenizer):
    """Other prompts push the conversation's nodes out of the tree (the pool holds about two
    prompts): their blocks can never be matched again, and the tier lets them go."""
    _flush(server)
    first = _prompt(tokenizer, "Lima", 22, QUESTIONS[0])
    _gen(server, first)
    held = _settled(server, "tier_tokens_moved_out", 1)["tier_bytes_held"]
    assert held > 0
    for i, name in enumerate(["Mike", "November", "Oscar"]):
        _gen(server, _prompt(tokenizer, name, 23 + i, QUESTIONS[2]))
    s = _settled(server, "tier_tokens_unreachable", 1)
    # (what is left: the tier's cap, 256 MiB, or what the tree still reaches)
    assert s["tier_tokens_unreachable"] > 0
    _assert_healthy(server)


def test_an_abort_after_a_recall_leaves_tree_pool_and_tier_whole(server, tokenizer):
    """Turn 2 recalls, decides again, and is aborted while it decodes: the tree keeps the
    recalled slots it was revised with (no leak at idle), and turn 3 matches that state."""
    _flush(server)
    t1 = _prompt(tokenizer, "Quebec", 31, QUESTIONS[0])
    _gen(server, t1)
    q = [tokenizer.encode(x, add_special_tokens=False) for x in QUESTIONS[1:]]
    recalled = stats(server).get("tier_tokens_recalled", 0)
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(_post, server, "/generate", {
            "rid": "abort-after-recall", "input_ids": t1 + q[0],
            "sampling_params": {"max_new_tokens": 4000, "temperature": 0, "ignore_eos": True}})
        _settled(server, "tier_tokens_recalled", recalled + 1, timeout=300)
        time.sleep(0.5)  # decoding now
        _post(server, "/abort_request", {"rid": "abort-after-recall"})
        second.result()
    time.sleep(2.0)  # idle: SGLang checks free + evictable == total (and dies on a leak)
    _assert_healthy(server)
    third = _gen(server, t1 + q[1])
    assert third["meta_info"]["cached_tokens"] >= len(t1)
    assert third["meta_info"]["dynsplit"]["tier_tokens_recalled"] > 0  # what turn 2 dropped
    time.sleep(2.0)
    _assert_healthy(server)


def test_at_idle_the_pool_is_whole_and_a_flush_empties_the_tier(server, tokenizer):
    long = tokenizer.encode(_story("Papa", 30, 700), add_special_tokens=False)[: 3500]
    assert len(long) > BUDGET // 2 + CHUNK
    _gen(server, long)
    time.sleep(2.0)
    _assert_healthy(server)
    _flush(server)
    time.sleep(1.0)
    assert stats(server)["tier_bytes_held"] == 0
    _assert_healthy(server)
