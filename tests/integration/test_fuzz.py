"""A hostile client (issue 14): malformed overrides and bodies get a 4xx or a correct 200, one
at a time and in batches, and the server stays healthy, correct and leak-free."""

import pytest

from dynsplit_sglang.overrides import request_id

from .client import healthy, post, text, wait_idle

pytestmark = pytest.mark.server

SP = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
LONG = text(150, 31)  # longer than the session server's 64-token budget: compressed decode

BAD_OVERRIDES = [
    {"budget": "abc"}, {"budget": -1}, {"budget": 0}, {"budget": 19}, {"budget": 10**12},
    {"budget": 2**63}, {"budget": 1.5}, {"budget": True}, {"budget": None, "budget_fraction": None},
    {"budget_fraction": 0}, {"budget_fraction": -1}, {"budget_fraction": 1.01},
    {"budget_fraction": "half"}, {"budget_fraction": 1e309}, {"budget": 100, "budget_fraction": .5},
    {"nonsense": 1}, {"sink": 2}, {"dense_layers": 0}, {"evict": True}, {"future_window": 4},
    {"score_layers": 1}, {"block_size": 4}, {"block_size": 1}, {"block_size": 10**6},
    {"tolerance": -1}, {"tolerance": 8}, {"alpha": -0.1}, {"alpha": "inf"}, {"alpha": 1000},
    {"recent": 0}, {"recent": 10**9}, {"candidates": "words"}, {"candidates": ["punct"]},
    {"strategy": "quest"}, {"strategy": ""}, {"strategy": None}, {"strategy": {"a": 1}},
    {"score": "max"}, {"score": 1}, {"spread": 0}, {"spread": -1}, {"spread": "nan"},
    {"spread": 17},
    {"x" * 10_000: 1}, {f"k{i}": i for i in range(100)}, "fixed", ["budget", 64], 42,
    # issue 40: "none" checks the other fields too; eviction fields on a server that does not
    # evict would do nothing
    {"strategy": "none", "budget": -1}, {"strategy": "none", "refine": True},
    {"evict_keep": 64}, {"evict_hold": 2},
]
GOOD_OVERRIDES = [{}, None, {"strategy": "none"}, {"strategy": "streaming", "budget": 32},
                  {"budget_fraction": 0.5}, {"block_size": 32, "tolerance": 8},
                  {"score": "bound"}, {"score": "gauss", "spread": 3}]
# A custom_params that is not an object (issue 40) was served, its override silently lost: on a
# server with compression on it is a 400 (admission checks it with the overrides). A dense
# server keeps SGLang's own handling: none of ours could be in it.
NOT_OBJECTS = ["x", [1, 2], 7, ["dynsplit"]]
BAD_RIDS = ["dynsplit:budget=abc:x", "dynsplit:nonsense=1:x", "dynsplit:budget:x",
            "dynsplit:=5:x", "dynsplit:sink=2:x", "dynsplit:" + "budget=abc," * 10_000 + ":x",
            "dynsplit:budget=64," + "recent=16," * 20 + ":x", "dynsplit:strategy=none,budget=-1:x"]
BAD_BODIES = [
    {"text": "", "sampling_params": SP}, {"text": ["", LONG], "sampling_params": SP},
    {"input_ids": [], "sampling_params": SP}, {"input_ids": [-1, 5], "sampling_params": SP},
    {"input_ids": [10**9], "sampling_params": SP},
    {"input_ids": [[1, 2], []], "sampling_params": SP},
    {"input_ids": [1.5, 2], "sampling_params": SP}, {"input_ids": ["a"], "sampling_params": SP},
    {"text": {"a": 1}, "sampling_params": SP}, {"text": LONG, "rid": 5, "sampling_params": SP},
    {"text": LONG, "sampling_params": "fast"},
    {"sampling_params": SP}, {"text": LONG, "sampling_params": {"max_new_tokens": -1}},
    {"text": LONG, "sampling_params": {"temperature": -1}},
    {"text": LONG, "sampling_params": {**SP, "custom_params": {"dynsplit": {"budget": -1}}},
     "rid": request_id(budget=64)},
    {"text": [LONG, LONG], "sampling_params": [SP, {**SP, "custom_params": {"dynsplit": 7}}]},
    {"text": [LONG, LONG], "sampling_params": SP, "rid": ["a", "dynsplit:budget=x:y"]},
    b"{not json", b"[]",
    *({"text": LONG, "sampling_params": {**SP, "custom_params": c}} for c in NOT_OBJECTS),
]


def _body(overrides=None, rid=None, prompt=LONG):
    params = dict(SP) if overrides is None else {**SP, "custom_params": {"dynsplit": overrides}}
    body = {"text": prompt, "sampling_params": params}
    if rid is not None:
        body["rid"] = rid
    return body


def _correct_200(out) -> bool:
    outs = out if isinstance(out, list) else [out]
    return all(isinstance(o["text"], str) and o["meta_info"]["completion_tokens"] == 4
               and "dynsplit" in o["meta_info"] for o in outs)


def test_malformed_overrides_and_bodies(sglang_server):
    reference = post(sglang_server, "/generate", _body(prompt=text(60, 32)))[1]["text"]
    log_before = sglang_server.log_path.stat().st_size
    cases = ([_body(o) for o in BAD_OVERRIDES] + [_body(rid=r) for r in BAD_RIDS] + BAD_BODIES
             + [_body(o) for o in GOOD_OVERRIDES])
    assert len(cases) >= 50
    served = []
    for i, body in enumerate(cases):
        status, out = post(sglang_server, "/generate", body)
        assert 400 <= status < 500 or (status == 200 and _correct_200(out)), (body, status, out)
        if status == 200:
            served.append(i)
        else:
            assert len(str(out)) < 2000  # never the whole body echoed back
    may = range(len(cases) - len(GOOD_OVERRIDES), len(cases))
    assert set(served) <= set(may), [str(cases[i])[:200] for i in served if i not in may]
    assert set(may[-len(GOOD_OVERRIDES):]) <= set(served)
    for body in (_body({"budget": "abc"}), _body({"strategy": "fixed"}), _body(rid=BAD_RIDS[0])):
        status, out = post(sglang_server, "/v1/completions",
                           {"model": "m", "prompt": body.get("text"), "max_tokens": 4,
                            "custom_params": body["sampling_params"].get("custom_params"),
                            "rid": body.get("rid")})
        assert status in (200, 400), out
    # Healthy, correct and leak-free afterwards; a refused request logs one short line.
    assert healthy(sglang_server)
    assert post(sglang_server, "/generate", _body(prompt=text(60, 32)))[1]["text"] == reference
    assert sglang_server.log_path.stat().st_size - log_before < 400 * len(cases)
    load = wait_idle(sglang_server)
    assert load["num_used_tokens"] == 0 and load["num_running_reqs"] == 0, load


def _refused(server, body) -> str:
    status, out = post(server, "/generate", body)
    assert status == 400, (body, status, out)
    return str(out)


# (field, a value refused for its type, an equal value accepted): validated overrides are cached,
# and True == 1 == 1.0 must never let the refused one in once the accepted one was seen.
EQUAL_BUT_NOT_SAME = [("refine", True, 1), ("budget", 300.0, 300), ("block_size", 20.0, 20),
                      ("recent", True, 1)]


def test_a_refused_override_stays_refused_after_an_equal_valid_one(sglang_server):
    for field, bad, good in EQUAL_BUT_NOT_SAME:
        assert f"custom_params.dynsplit.{field}={bad!r} is invalid" in _refused(
            sglang_server, _body({field: bad}))
        status, out = post(sglang_server, "/generate", _body({field: good}))
        assert status == 200 and _correct_200(out), (field, good, out)
        assert f"custom_params.dynsplit.{field}={bad!r} is invalid" in _refused(
            sglang_server, _body({field: bad}))


def test_refusals_name_the_field_the_client_sent(sglang_server):
    # strategy "none" checks every other field, in both forms
    assert "custom_params.dynsplit.budget=-1 is invalid" in _refused(
        sglang_server, _body({"strategy": "none", "budget": -1}))
    assert "rid dynsplit:budget=-1 is invalid" in _refused(
        sglang_server, _body(rid="dynsplit:strategy=none,budget=-1:x"))
    # eviction settings where nothing evicts
    for field in ("evict_keep", "evict_hold"):
        msg = _refused(sglang_server, _body({field: 2}))
        assert f"custom_params.dynsplit.{field}=2 does nothing on this server" in msg, msg
    # nested values name their field
    for field, value in (("candidates", ["punct"]), ("strategy", {"a": 1})):
        msg = _refused(sglang_server, _body({field: value}))
        assert f"custom_params.dynsplit.{field} must be a number or a string" in msg, msg
    for custom in NOT_OBJECTS:
        msg = _refused(sglang_server, {"text": LONG,
                                       "sampling_params": {**SP, "custom_params": custom}})
        assert "custom_params must be a JSON object" in msg, msg
    assert healthy(sglang_server)


def test_an_eviction_server_names_the_strategy_not_its_own_setting(tiny_model, tmp_path):
    from .conftest import SESSION_ARGS, start_server

    with start_server(tiny_model, [*SESSION_ARGS, "--dynsplit-evict"], tmp_path) as server:
        msg = _refused(server, _body({"strategy": "streaming"}))
        assert "custom_params.dynsplit.strategy='streaming' is invalid" in msg, msg
        assert "strategy with blocks" in msg and "dynsplit.evict" not in msg, msg
        msg = _refused(server, _body(rid="dynsplit:strategy=streaming:x"))
        assert "rid dynsplit:strategy='streaming' is invalid" in msg, msg
        assert _correct_200(post(server, "/generate", _body({"evict_hold": 2}))[1])
        # the cache again, on a field only eviction reads: True, then 1, then True
        assert "evict_hold=True is invalid" in _refused(server, _body({"evict_hold": True}))
        assert _correct_200(post(server, "/generate", _body({"evict_hold": 1}))[1])
        assert "evict_hold=True is invalid" in _refused(server, _body({"evict_hold": True}))
