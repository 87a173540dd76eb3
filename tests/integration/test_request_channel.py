"""Per-request overrides through SGLang's request fields, checked at admission, reported in the
response (issue 14: a bad override returned 200, ran with the server's settings and logged its
error, whole rid included, on every decode step; an empty prompt killed the scheduler)."""

import pytest

from dynsplit_sglang.overrides import request_id

from .client import get_json, healthy, post, stats, text

pytestmark = pytest.mark.server

SP = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
LONG = text(300, 51)


def _generate(server, overrides=None, rid=None, prompt=LONG):
    params = SP if overrides is None else {**SP, "custom_params": {"dynsplit": overrides}}
    body = {"text": prompt, "sampling_params": params}
    if rid:
        body["rid"] = rid
    return post(server, "/generate", body)


def test_custom_params_and_the_rid_alias_run_the_same_override(sglang_server):
    status, server_default = _generate(sglang_server)
    assert status == 200
    status, custom = _generate(sglang_server, {"strategy": "fixed", "budget": 160})
    assert status == 200
    status, alias = _generate(sglang_server, rid=request_id(strategy="fixed", budget=160))
    assert status == 200
    d, c, a = (o["meta_info"]["dynsplit"] for o in (server_default, custom, alias))
    assert (d["strategy"], d["budget"], d["source"]) == ("dynsplit", 64, "server")
    assert (c["strategy"], c["budget"], c["source"]) == ("fixed", 160, "custom_params")
    assert (a["strategy"], a["budget"], a["source"]) == ("fixed", 160, "rid")
    assert custom["text"] == alias["text"]
    for r in (d, c):
        assert r["decode_steps"] == r["sparse_steps"] == 7 and r["blocks_built"] > 20
        assert r["tokens_dense"] == c["tokens_dense"]  # same prompt, same steps
    assert d["tokens_attended"] <= 64 * 2 * 2 * 7 < c["tokens_attended"] <= 160 * 2 * 2 * 7
    assert a["tokens_attended"] == c["tokens_attended"]
    status, dense = _generate(sglang_server, {"strategy": "none"})
    n = dense["meta_info"]["dynsplit"]
    assert n["strategy"] == "none" and n["tokens_attended"] == n["tokens_dense"]


def test_an_invalid_override_is_a_400_naming_the_field_and_nothing_runs(sglang_server):
    before = stats(sglang_server)
    log_size = sglang_server.log_path.stat().st_size
    status, out = _generate(sglang_server, {"budget": "abc"})
    assert status == 400
    assert out["error"]["message"].startswith("custom_params.dynsplit.budget='abc' is invalid")
    # A batch with one bad item is refused whole: no item ran (the compressor saw none).
    status, out = post(sglang_server, "/generate", {
        "text": [LONG, LONG], "sampling_params": [SP, {**SP, "custom_params": {
            "dynsplit": {"budget_fraction": -1}}}]})
    assert status == 400 and "custom_params.dynsplit.budget_fraction=-1" in str(out)
    huge = "dynsplit:nonsense=1" + "x" * 100_000 + ":tail"
    status, out = _generate(sglang_server, rid=huge)
    assert status == 400 and "cannot be set per request" in str(out) and len(str(out)) < 500
    assert stats(sglang_server).get("requests") == before.get("requests")
    assert sglang_server.log_path.stat().st_size - log_size < 2000  # one short line each


def test_openai_endpoints_take_the_override_in_the_body(sglang_server):
    import openai

    client = openai.OpenAI(base_url=sglang_server.base_url + "/v1", api_key="none")
    before = stats(sglang_server)
    out = client.completions.create(model="m", prompt=LONG, max_tokens=6, temperature=0,
                                    extra_body={"custom_params": {"dynsplit": {
                                        "strategy": "none"}}})
    assert out.usage.completion_tokens == 6
    after = stats(sglang_server)
    assert after.get("sparse_steps", 0) == before.get("sparse_steps", 0)  # ran dense
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": LONG}], max_tokens=6, temperature=0,
        extra_body={"custom_params": {"dynsplit": {"budget": 96}}})
    assert chat.choices[0].message.content is not None
    assert stats(sglang_server)["sparse_steps"] >= after["sparse_steps"] + 5  # compressed
    with pytest.raises(openai.BadRequestError, match=r"custom_params.dynsplit.tolerance=99"):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_body={"custom_params": {"dynsplit": {"tolerance": 99}}})


def test_server_info_shows_the_settings(sglang_server):
    for path in ("/server_info", "/get_server_info"):
        info = get_json(sglang_server, path)["dynsplit"]
        assert info["kv_compression"] == "dynsplit" and info["budget"] == 64
        assert info["block_size"] == 8 and info["recent"] == 16 and info["dense_layers"] == 0


def test_an_empty_prompt_is_a_400_and_the_scheduler_lives(sglang_server):
    for body in ({"text": ""}, {"text": ["", LONG]}, {"input_ids": []},
                 {"input_ids": [[5, 6], []]}):
        status, out = post(sglang_server, "/generate", {**body, "sampling_params": SP})
        assert status == 400 and "empty" in str(out), (body, out)
    assert healthy(sglang_server)
    assert _generate(sglang_server, prompt="hello")[0] == 200


def test_a_streamed_response_ends_with_the_report(sglang_server):
    import json
    import urllib.request

    body = {"text": LONG, "stream": True, "sampling_params": {
        **SP, "custom_params": {"dynsplit": {"strategy": "delimiter"}}}}
    req = urllib.request.Request(sglang_server.base_url + "/generate",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        chunks = [json.loads(line[5:]) for line in r
                  if line.startswith(b"data:") and line.strip() != b"data: [DONE]"]
    assert len(chunks) >= 2 and "dynsplit" not in chunks[0]["meta_info"]
    last = chunks[-1]["meta_info"]["dynsplit"]
    assert last["strategy"] == "delimiter" and last["decode_steps"] == 7
