"""Same greedy request, same answer (issue 40): cold, wholly cached in the radix tree, and inside
a mixed batch, for every strategy. The first answer token always comes from the prefill's dense
attention (docs/design.md, "The first answer token"); before, a wholly cached prompt recomputed
its last token with compressed attention, so the same request could answer differently once it
was cached, or when a batch mixed it with new prompts."""

import pytest

from dynsplit_sglang.core.strategies import STRATEGIES

from .client import flush, post, text

pytestmark = pytest.mark.server

METHODS = (*STRATEGIES, "none")


def _body(prompts, methods, max_new):
    return {"text": prompts,
            "sampling_params": [{"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True,
                                 "custom_params": {"dynsplit": {"strategy": m}}}
                                for m in methods]}


def _serve(server, prompts, methods, max_new):
    status, out = post(server, "/generate", _body(prompts, methods, max_new))
    assert status == 200, out
    return [o["text"] for o in out], [o["meta_info"] for o in out]


def _cold_cached_batched(server, prompt, method, others, max_new):
    """The answers of one request sent alone cold, alone cached, cold inside a batch of other new
    prompts, and cached inside such a batch; with its cached-token counts."""
    flush(server)
    (cold,), (m0,) = _serve(server, [prompt], [method], max_new)
    (cached,), (m1,) = _serve(server, [prompt], [method], max_new)
    flush(server)
    mix = list(STRATEGIES)[: len(others)]
    batch_cold, m2 = _serve(server, [*others, prompt], [*mix, method], max_new)
    batch_cached, m3 = _serve(server, [prompt, *[o + " ." for o in others]], [method, *mix],
                              max_new)
    assert m0["cached_tokens"] == 0 and m1["cached_tokens"] == len_of(m1) - 1, (m0, m1)
    assert m3[0]["cached_tokens"] == len_of(m3[0]) - 1  # wholly cached, beside new prompts
    return {"cold": cold, "cached": cached, "batch cold": batch_cold[-1],
            "batch cached": batch_cached[0]}, m1


def len_of(meta) -> int:
    return meta["prompt_tokens"]


@pytest.mark.parametrize("method", METHODS)
def test_tiny_model_answers_alike_cold_cached_and_batched(sglang_server, method):
    prompt = text(170, 4000)  # longer than the server's 64-token budget: compressed decode
    others = [text(120, 4001), text(140, 4002)]
    answers, meta = _cold_cached_batched(sglang_server, prompt, method, others, max_new=10)
    assert len(set(answers.values())) == 1, answers
    if method != "none":  # decode really was compressed: the first token is all that is dense
        mine = meta["dynsplit"]
        assert mine["sparse_steps"] == mine["decode_steps"] == 9, mine
        assert mine["tokens_attended"] < mine["tokens_dense"]


@pytest.mark.parametrize("method", METHODS)
def test_pretrained_model_answers_alike_cold_cached_and_batched(default_server, method):
    # SmolLM2 at the default server's 512-token budget: a 900-token prompt decodes compressed.
    prompt = ("Remember the code word: AMBER-7312. " + text(650, 4100)
              + " What is the code word? The code word is")
    others = [text(600, 4101)]
    answers, meta = _cold_cached_batched(default_server, prompt, method, others, max_new=6)
    assert len(set(answers.values())) == 1, answers
    if method != "none":
        assert meta["dynsplit"]["sparse_steps"] == 5, meta["dynsplit"]
