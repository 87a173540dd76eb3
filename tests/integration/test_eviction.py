"""--dynsplit-evict through a real SGLang server (SmolLM2-135M, CPU): freed KV slots go back to
a deliberately small pool (about 4.4k slots: a budget of 5200, less the block store's share)
and are reused, without stale reads, and a compressed prefix is served from the radix cache to
a later request.

Prompts are given as token ids, 5 x 512 tokens each (the chunked-prefill size): every prefill
chunk then belongs to one request whether the requests run together or one at a time, so the
chunks, the eviction decisions taken after each of them, and thereby the outputs, are the same.
"""

import json
import random
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynsplit_sglang import models
from dynsplit_sglang.core import DynSplitConfig
from dynsplit_sglang.launcher import post_json
from dynsplit_sglang.patches.server_args import eviction_args
from dynsplit_sglang.settings import strip_and_parse

from .client import flush as _flush
from .client import stats
from .conftest import default_model_server

pytestmark = pytest.mark.server

POOL = 4096  # at least this many slots...
BUDGET = 5200  # ...out of the KV budget of this many once the block store has its share
CHUNK = 512
PROMPT_LEN = 5 * CHUNK  # 2560: two of them (plus a decode slot each) exceed the pool
MAX_NEW = 8
FRACTION = 0.25
EVICT_ARGS = [
    "--kv-compression", "dynsplit", "--dynsplit-evict", "--dynsplit-budget-fraction", str(FRACTION),
    "--chunked-prefill-size", str(CHUNK), "--max-total-tokens", str(BUDGET),
    "--max-running-requests", "4",
]  # fmt: skip
BAD_LOG_LINES = ("memory leak", "Retract", "use-after-free", "double free", "hit an exception")

_SUBJECTS = ["The engineer", "A farmer", "The committee", "My neighbour", "The old train",
             "A small robot", "The river pilot", "Our teacher", "The baker", "A young fox",
             "The mayor", "Every student", "The night guard", "A tired musician"]
_VERBS = ["repaired", "painted", "counted", "described", "moved", "measured", "ignored",
          "praised", "carried", "hid", "found", "sold", "borrowed", "photographed"]
_OBJECTS = ["the bridge", "seven wooden boxes", "a blue kite", "the northern gate",
            "an ancient map", "the broken clock", "twelve letters", "the red tractor",
            "a jar of honey", "the library roof", "three silver keys", "the village well"]
_TAILS = ["before noon", "after the storm", "on a quiet Tuesday", "with great care",
          "for {n} days", "in {y}", "near the harbour", "while it rained",
          "without asking anyone", "at exactly {h} o'clock"]
QUESTIONS = ["\nQuestion: Who repaired the bridge, and when?\nAnswer:",
             "\nQuestion: What was found near the harbour?\nAnswer:",
             "\nQuestion: Summarise the report in one sentence.\nAnswer:"]


def _story(title: str, seed: int, n_sentences: int = 420) -> str:
    rnd = random.Random(seed)
    out = [f"{title} report:"]
    for _ in range(n_sentences):
        tail = rnd.choice(_TAILS).format(n=rnd.randrange(2, 90), y=rnd.randrange(1800, 2024),
                                         h=rnd.randrange(1, 12))
        out.append(f"{rnd.choice(_SUBJECTS)} {rnd.choice(_VERBS)} {rnd.choice(_OBJECTS)} {tail}.")
    return " ".join(out)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.ensure(models.DEFAULT_MODEL))


def _prompt(tok, title, seed, question) -> list[int]:
    q = tok.encode(question, add_special_tokens=False)
    body = tok.encode(_story(title, seed), add_special_tokens=False)
    assert len(body) >= PROMPT_LEN - len(q)
    return body[: PROMPT_LEN - len(q)] + q


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ps = [_prompt(tokenizer, t, i, QUESTIONS[i]) for i, t in enumerate(["Alpha", "Charlie",
                                                                         "Delta"])]
    assert len({p[0] for p in ps}) == 3  # no shared prefix, not even one token
    assert all(len(p) == PROMPT_LEN for p in ps)
    return ps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with default_model_server(EVICT_ARGS, tmp_path_factory.mktemp("evict")) as handle:
        yield handle


def _stats(server) -> dict:
    return stats(server)


def _generate(server, input_ids: list[list[int]]):
    out = post_json(server.base_url + "/generate", {
        "input_ids": input_ids,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
    })
    return [o["text"] for o in out], [o["meta_info"] for o in out]


def _assert_healthy(server):
    assert server.proc.poll() is None, f"server exited:\n{server.log_tail()}"
    with urllib.request.urlopen(server.base_url + "/health", timeout=30) as r:
        assert r.status == 200
    log = server.log_path.read_text(errors="replace")
    bad = [line for line in log.splitlines() if any(b in line for b in BAD_LOG_LINES)]
    assert not bad, "\n".join(bad[:20])


@pytest.fixture(scope="module")
def concurrent(server, prompts):
    """The three prompts sent together (one /generate batch) to the fresh server."""
    before = _stats(server)
    texts, meta = _generate(server, prompts)
    return before, _stats(server), texts, meta


def _pool(server) -> int:
    log = server.log_path.read_text(errors="replace")
    return int(re.search(r"max_total_num_tokens=(\d+)", log)[1])


@pytest.fixture(scope="module")
def replay(server, prompts, concurrent):
    """The same prompts one at a time, on an empty radix cache."""
    _flush(server)
    before = _stats(server)
    runs = [_generate(server, [p]) for p in prompts]
    return before, _stats(server), [t[0] for t, _ in runs], [m[0] for _, m in runs]


def test_the_flag_brings_the_slot_counting_radix_cache(server):
    log = server.log_path.read_text(errors="replace")
    assert "'radix_cache_backend': 'dynsplit-evict'" in log
    assert "'disable_overlap_schedule': True" in log
    # The block store is carved out of the pool's budget (patches/memory.py): fewer tokens.
    tokens = _pool(server)
    assert f"KV budget of {BUDGET} dense tokens" in log and f"holds {tokens} tokens" in log
    assert POOL <= tokens < BUDGET


def test_freed_slots_let_more_requests_decode_together(server, concurrent):
    before, after, texts, meta = concurrent
    assert [m["prompt_tokens"] for m in meta] == [PROMPT_LEN] * 3
    assert [m["completion_tokens"] for m in meta] == [MAX_NEW] * 3
    assert all(t.strip() for t in texts)
    assert after["requests"] - before.get("requests", 0) == 3
    evicted = after["slots_evicted"] - before.get("slots_evicted", 0)
    budget = DynSplitConfig(budget_fraction=FRACTION).token_budget(PROMPT_LEN)  # 640
    # Each request keeps about its budget of its 2560 positions (whole blocks, the recent
    # window and the undecided tail of the last chunk excepted) and gives the rest back.
    assert evicted >= 3 * (PROMPT_LEN - budget - CHUNK // 2)
    assert after["blocks_evicted"] > 0
    assert after.get("fallback_rows", 0) == 0
    # Without eviction a decode batch of two would hold 2 x (2560 + 1) > pool slots: only
    # possible because the prompts were compressed in memory.
    assert 2 * (PROMPT_LEN + 1) > _pool(server)
    assert after["max_decode_batch"] == 3
    # Resident at most: one prompt whole until its end (eviction decides over the whole prompt,
    # question included), the others their budget, and the answers' tokens (far below the
    # 3 x 2560 the prompts need uncompressed).
    assert after["peak_slots_in_use"] <= _pool(server)
    assert after["peak_slots_in_use"] <= PROMPT_LEN + 2 * budget + 3 * MAX_NEW
    _assert_healthy(server)


def test_outputs_together_equal_outputs_alone_after_flush(server, concurrent, replay):
    c_before, c_after, together, _ = concurrent
    before, after, alone, meta = replay
    assert [m["cached_tokens"] for m in meta] == [0, 0, 0]  # the flush emptied the tree
    # Same eviction decisions (same chunks), hence the same number of slots freed.
    assert (after["slots_evicted"] - before["slots_evicted"]
            == c_after["slots_evicted"] - c_before.get("slots_evicted", 0))
    # Slots freed by one request and reused by the next (or by the same one's later chunks)
    # are never read through a stale position.
    assert alone == together
    _assert_healthy(server)


def test_compressed_prefix_is_reused_by_a_later_request(server, prompts, replay, tokenizer):
    _, _, alone, _ = replay
    # An unrelated prompt first takes most free slots, those the replay's eviction freed
    # included: a prefix whose tree copy still named them would now read its K/V.
    _generate(server, [_prompt(tokenizer, "Echo", 7, QUESTIONS[1])])
    s0 = _stats(server)
    again, meta = _generate(server, [prompts[2]])  # still in the tree after the replay
    s1 = _stats(server)
    assert meta[0]["cached_tokens"] >= 0.9 * PROMPT_LEN
    assert again == [alone[2]]
    assert s1["slots_evicted"] == s0["slots_evicted"]  # the shared prefix is not evicted again
    assert s1["blocks_reused"] - s0.get("blocks_reused", 0) >= 20

    # The same document with another question: the compressed prefix is shared, only the
    # question is prefilled.
    q = tokenizer.encode(QUESTIONS[0], add_special_tokens=False)
    other = prompts[2][: PROMPT_LEN - len(tokenizer.encode(QUESTIONS[2],
                                                           add_special_tokens=False))] + q
    texts, meta = _generate(server, [other])
    s2 = _stats(server)
    assert meta[0]["cached_tokens"] >= 0.9 * PROMPT_LEN
    assert texts[0].strip()
    assert s2["blocks_reused"] - s1["blocks_reused"] >= 20
    _assert_healthy(server)


def _post(server, path, body, timeout=600):
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def test_aborts_during_prefill_and_after_eviction_leave_the_pool_whole(server, tokenizer):
    """One request aborted while its prompt is still in chunks (nothing evicted yet: the slots
    are the tree's and its own), one after its whole-prompt eviction revised the tree (in
    decode). The server stays up, the idle check passes, and the pool serves again."""
    _flush(server)
    mid = _prompt(tokenizer, "Foxtrot", 8, QUESTIONS[0])
    late = _prompt(tokenizer, "Golf", 9, QUESTIONS[2])
    with ThreadPoolExecutor(2) as pool:
        s0 = _stats(server)
        first = pool.submit(_post, server, "/generate", {
            "rid": "abort-mid-prefill", "input_ids": mid,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        time.sleep(1.0)  # a few of its 5 chunks in: the prompt's end not reached
        _post(server, "/abort_request", {"rid": "abort-mid-prefill"})
        first.result()
        second = pool.submit(_post, server, "/generate", {
            "rid": "abort-in-decode", "input_ids": late,
            "sampling_params": {"max_new_tokens": 4000, "temperature": 0, "ignore_eos": True}})
        deadline = time.monotonic() + 300
        while _stats(server).get("slots_evicted", 0) == s0.get("slots_evicted", 0):
            assert time.monotonic() < deadline, "the second prompt was never evicted"
            time.sleep(0.2)
        time.sleep(0.5)  # decoding now
        _post(server, "/abort_request", {"rid": "abort-in-decode"})
        second.result()
    time.sleep(2.0)  # idle: SGLang checks free + evictable == total (and dies on a leak)
    _assert_healthy(server)
    _flush(server)
    time.sleep(1.0)
    _assert_healthy(server)
    _, meta = _generate(server, [list(range(1000, 1600))])  # and the pool serves again
    assert meta[0]["prompt_tokens"] == 600
    _assert_healthy(server)


def test_a_frontend_conversation_extends_its_compressed_turn(server, tokenizer):
    """SGLang's frontend language, two turns: the first turn's prompt is evicted once it is in;
    the second matches the compressed turn (prompt + answer) in the tree and evicts nothing of
    it again. Two conversations share a marked system prefix (the per-request evict_keep): the
    second matches it whole."""
    import sglang as sgl

    from dynsplit_sglang.frontend import RuntimeEndpoint

    @sgl.function
    def chat(s, system, doc, dynsplit=None):
        s += system + doc + QUESTIONS[0]
        s += sgl.gen("a1", max_tokens=MAX_NEW, temperature=0)
        s += QUESTIONS[1]
        s += sgl.gen("a2", max_tokens=MAX_NEW, temperature=0)

    _flush(server)
    system = tokenizer.decode(tokenizer.encode(_story("System", 11, 60),
                                               add_special_tokens=False)[:600])
    docs = [tokenizer.decode(tokenizer.encode(_story(t, 12 + i), add_special_tokens=False)[:1400])
            for i, t in enumerate(["India", "Juliet"])]
    backend = RuntimeEndpoint(server.base_url)
    keep = len(tokenizer.encode(system, add_special_tokens=False)) - 8
    s0 = _stats(server)
    first = chat.run(system=system, doc=docs[0], dynsplit={"evict_keep": keep}, backend=backend)
    m1, m2 = first.get_meta_info("a1"), first.get_meta_info("a2")
    assert first["a1"].strip() and first["a2"].strip()
    # (the counters are published by a writer thread: on a loaded host they may lag a little)
    deadline = time.monotonic() + 30
    while (s1 := _stats(server)).get("requests", 0) - s0.get("requests", 0) < 2:
        assert time.monotonic() < deadline, s1
    assert s1["slots_evicted"] - s0.get("slots_evicted", 0) > m1["prompt_tokens"] // 2
    # Turn 2 is a radix hit on turn 1 (its prompt and answer, compressed)...
    assert m2["cached_tokens"] >= m1["prompt_tokens"]
    assert m2["dynsplit"]["blocks_reused"] >= 20
    # ...and the second conversation on the marked system prefix, kept whole by the first.
    second = chat.run(system=system, doc=docs[1], dynsplit={"evict_keep": keep}, backend=backend)
    m3 = second.get_meta_info("a1")
    assert second["a1"].strip() and second["a2"].strip()  # (its second turn finished too)
    assert keep <= m3["cached_tokens"] < m1["prompt_tokens"]
    _assert_healthy(server)


def _generate_held(server, ids, hold):
    params = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    if hold:
        params["custom_params"] = {"dynsplit": {"evict_hold": hold}}
    out = post_json(server.base_url + "/generate", {"input_ids": ids, "sampling_params": params})
    return out["text"], out["meta_info"]


def test_holding_the_prompt_bounds_its_peak_and_its_prefix_is_reused(server, tokenizer):
    """evict_hold 1 (per request): every chunk before the prompt's end leaves the row at most
    its budget at that length, so the request peaks at about its budget plus one chunk instead
    of its whole prompt; earlier chunks' positions are freed while the prompt is still being
    prefilled (the tree's copy revised between chunks), and a later request matching that
    prefix reads none of the freed slots."""
    p = _prompt(tokenizer, "Hotel", 13, QUESTIONS[0])
    _flush(server)
    _, whole = _generate_held(server, p, 0)
    _flush(server)
    held_text, held = _generate_held(server, p, 1)
    assert whole["dynsplit"]["prefill_peak_slots"] == PROMPT_LEN
    budget = DynSplitConfig(budget_fraction=FRACTION).token_budget
    peak = held["dynsplit"]["prefill_peak_slots"]
    # Held before the last chunk: its budget at 4 chunks (whole blocks and the undecided tail
    # of the chunk aside), plus the last chunk.
    assert peak <= budget(PROMPT_LEN - CHUNK) + CHUNK + 64, peak
    assert held_text.strip()
    # Another prompt takes the freed slots; the held prompt again is a radix hit on its
    # compressed prefix and answers the same.
    _generate(server, [_prompt(tokenizer, "India", 14, QUESTIONS[1])])
    s0 = _stats(server)
    again, meta = _generate_held(server, p, 1)
    assert meta["cached_tokens"] >= 0.9 * PROMPT_LEN
    assert again == held_text
    assert _stats(server)["slots_evicted"] == s0["slots_evicted"]  # nothing evicted again
    _assert_healthy(server)


def test_no_leak_at_idle(server, replay):
    """SGLang checks free + evictable == total whenever the scheduler goes idle (and kills the
    server on a mismatch); a flush then frees every slot the tree held."""
    time.sleep(2.0)
    _assert_healthy(server)
    _flush(server)
    time.sleep(1.0)
    _assert_healthy(server)
    _, meta = _generate(server, [list(range(1000, 1600))])  # and the emptied pool still serves
    assert meta[0]["prompt_tokens"] == 600
    time.sleep(1.0)
    _assert_healthy(server)


def test_without_the_flag_nothing_changes():
    assert DynSplitConfig().evict is False
    rest, settings = strip_and_parse(["--kv-compression", "dynsplit", "--max-total-tokens", "8"])
    assert settings.config.evict is False
    assert eviction_args(settings, rest) == []  # default radix cache, overlap schedule kept
    rest, settings = strip_and_parse(EVICT_ARGS)
    assert eviction_args(settings, rest) == ["--radix-cache-backend", "dynsplit-evict",
                                             "--disable-overlap-schedule"]
