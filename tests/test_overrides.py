"""Per-request overrides: one validation for custom_params and the rid alias (no server)."""

import pytest

from dynsplit_sglang import overrides
from dynsplit_sglang.core import ConfigError, DynSplitConfig
from dynsplit_sglang.runtime.requests import RequestCompression, of

BASE = DynSplitConfig(budget=64, recent=16, block_size=8, tolerance=2)


@pytest.mark.parametrize("given,names", [
    ({"budget": "abc"}, "custom_params.dynsplit.budget='abc' is invalid; expected an integer"),
    ({"nonsense": 1}, "custom_params.dynsplit.'nonsense' cannot be set per request"),
    ({"sink": 2}, "custom_params.dynsplit.'sink' cannot be set per request (set per server only)"),
    ({"budget_fraction": -1}, "custom_params.dynsplit.budget_fraction=-1 is invalid"),
    ({"budget_fraction": float("nan")}, "custom_params.dynsplit.budget_fraction=nan"),
    ({"budget": True}, "custom_params.dynsplit.budget=True is invalid"),
    ({"budget": 64.0}, "custom_params.dynsplit.budget=64.0 is invalid"),
    ({"block_size": 4}, "custom_params.dynsplit.block_size=4 is invalid; expected blocks no "
                        "finer than the server's 6 tokens"),
    ({"tolerance": 9}, "custom_params.dynsplit.tolerance=9 is invalid"),
    ({"strategy": "quest"}, "custom_params.dynsplit.strategy='quest' is invalid"),
    ({"score": "max"}, "custom_params.dynsplit.score='max' is invalid; expected one of "
                       "('gauss', 'bound')"),
    ({"spread": 0}, "custom_params.dynsplit.spread=0 is invalid; expected a finite number in "
                    "(0, 16]"),
    ({"spread": "wide"}, "custom_params.dynsplit.spread='wide' is invalid"),
    ({"refine": 0.9}, "custom_params.dynsplit.refine=0.9 is invalid; expected a number in [1, 64]"),
    ({"refine": float("inf")}, "custom_params.dynsplit.refine=inf is invalid"),
    ({"refine": True}, "custom_params.dynsplit.refine=True is invalid"),
    ({"candidates": ["punct"]}, "custom_params.dynsplit.candidates must be a number or a string, "
                                "got list"),
    ({"strategy": {"a": 1}}, "custom_params.dynsplit.strategy must be a number or a string"),
    ({"strategy": "none", "budget": -1}, "custom_params.dynsplit.budget=-1 is invalid"),
    ({"strategy": "none", "refine": True}, "custom_params.dynsplit.refine=True is invalid"),
    ({"evict_keep": 64}, "custom_params.dynsplit.evict_keep=64 does nothing on this server"),
    ({"evict_hold": 2}, "custom_params.dynsplit.evict_hold=2 does nothing on this server"),
    ({"recent": 61}, "custom_params.dynsplit.recent=61 is invalid with the server's budget (64)"),
    ({"budget": 100, "budget_fraction": 0.5}, "custom_params.dynsplit: give at most one of"),
    ({"budget": None}, "custom_params.dynsplit.budget is null; give a value or leave it out"),
    ({"budget": 10**12}, "custom_params.dynsplit.budget=1000000000000 is above the model's "
                         "context length (8192 tokens)"),
    ("fixed", "custom_params.dynsplit must be a JSON object"),
    ({f"k{i}": 1 for i in range(40)}, "custom_params.dynsplit: 40 keys"),
])
def test_invalid_overrides_name_the_field(given, names):
    with pytest.raises(ConfigError) as e:
        overrides.check(given, BASE, context_len=8192)
    assert str(e.value).startswith(names), str(e.value)


@pytest.mark.parametrize("field,bad,good", [
    ("refine", True, 1), ("budget", 300.0, 300), ("block_size", 20.0, 20), ("recent", True, 1),
    ("budget", True, 64),
])
def test_a_refused_value_stays_refused_after_an_equal_valid_one(field, bad, good):
    # Validated configs are cached; True == 1 == 1.0 must not share an entry.
    for value in (bad, good, bad):
        if value is good:
            assert getattr(overrides.check({field: value}, BASE), field) == good
        else:
            with pytest.raises(ConfigError, match=f"{field}={bad!r} is invalid"):
                overrides.check({field: value}, BASE)


def test_eviction_overrides_and_their_strategy_on_an_eviction_server():
    evicting = BASE.replace(evict=True)
    assert overrides.check({"evict_keep": 32, "evict_hold": 2}, evicting).evict_keep == 32
    with pytest.raises(ConfigError) as e:
        overrides.check({"evict_hold": True}, evicting)
    assert str(e.value).startswith("custom_params.dynsplit.evict_hold=True is invalid")
    with pytest.raises(ConfigError) as e:
        overrides.check({"strategy": "streaming"}, evicting)
    msg = str(e.value)
    assert msg.startswith("custom_params.dynsplit.strategy='streaming' is invalid where eviction "
                          "is on") and "strategy with blocks" in msg and ".evict" not in msg


def test_messages_never_echo_long_input():
    with pytest.raises(ConfigError) as e:
        overrides.check({"strategy": "x" * 100_000}, BASE)
    assert len(str(e.value)) < 300 and "(100002 chars)" in str(e.value)
    rid = "dynsplit:" + "budget=abc," * 10_000 + ":x"
    with pytest.raises(ConfigError) as e:
        overrides.parse_request_id(rid, BASE)
    assert len(str(e.value)) < 300


def test_rid_alias_is_validated_like_custom_params():
    same = {"strategy": "fixed", "budget": 128}
    assert overrides.parse_request_id(overrides.request_id(**same), BASE) == \
        overrides.check(same, BASE)
    with pytest.raises(ConfigError, match=r"rid dynsplit:budget='abc' is not a valid value"):
        overrides.parse_request_id("dynsplit:budget=abc:x", BASE)
    with pytest.raises(ConfigError, match="cannot be set per request"):
        overrides.parse_request_id("dynsplit:nonsense=1:x", BASE)
    with pytest.raises(ConfigError, match=r"rid dynsplit:budget=-1 is invalid"):
        overrides.parse_request_id("dynsplit:strategy=none,budget=-1:x", BASE)


def test_block_score_is_a_per_request_choice():
    cfg = overrides.check({"score": "bound"}, BASE)
    assert cfg.score == "bound" and cfg.summary_spread is None
    assert overrides.check({"spread": 3}, BASE).summary_spread == 3.0
    rid = overrides.request_id(score="bound", spread=2.5)
    assert overrides.parse_request_id(rid, BASE) == BASE.replace(score="bound", spread=2.5)
    with pytest.raises(ConfigError, match=r"rid dynsplit:spread='x' is not a valid value"):
        overrides.parse_request_id("dynsplit:spread=x:y", BASE)


def test_refine_is_a_per_request_choice():
    assert overrides.check({"refine": 1}, BASE).refine == 1
    assert overrides.check({"refine": 3.5}, BASE).refine == 3.5
    rid = overrides.request_id(refine=1.5)
    assert overrides.parse_request_id(rid, BASE) == BASE.replace(refine=1.5)


def test_strategy_none_attends_to_the_whole_context_without_a_huge_budget():
    cfg = overrides.check({"strategy": "none"}, BASE)
    assert cfg.budget is None and cfg.budget_fraction == 1.0
    assert cfg.token_budget(100_000) == 100_000


def test_request_objects_resolve_once_and_report():
    req = of({"dynsplit": {"strategy": "none"}}, "plain")
    assert req.source == "custom_params" and req.resolve(BASE).budget_fraction == 1.0
    rep = req.report(BASE)
    assert rep["strategy"] == "none" and rep["budget_fraction"] == 1.0
    assert of(None, overrides.request_id(budget=100)).resolve(BASE).budget == 100
    plain = of({"other": 1}, "plain")
    assert plain.source == "server" and plain.resolve(BASE) is None
    assert plain.report(BASE)["strategy"] == "dynsplit" and plain.report(BASE)["budget"] == 64


def test_an_override_that_bypassed_admission_is_reported_once(caplog):
    req = RequestCompression({"budget": -1}, "custom_params")
    for _ in range(50):  # every decode step asks
        assert req.resolve(BASE) is None
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "budget=-1" in req.report(BASE)["error"]


def test_admission_refuses_overrides_a_server_cannot_honour():
    from types import SimpleNamespace

    from dynsplit_sglang.patches.admission import check_request
    from dynsplit_sglang.settings import Settings

    on = Settings("dynsplit", BASE)
    ok = SimpleNamespace(sampling_params={"custom_params": {"dynsplit": {"budget": 100}}},
                         rid="r1")
    check_request(ok, on, 8192)
    check_request(SimpleNamespace(sampling_params={}, rid="plain"), Settings(), 8192)
    with pytest.raises(ValueError, match="runs without KV compression"):
        check_request(ok, Settings(), 8192)
    both = SimpleNamespace(sampling_params=ok.sampling_params, rid=overrides.request_id(budget=99))
    with pytest.raises(ValueError, match="both set overrides"):
        check_request(both, on, 8192)
    with pytest.raises(ValueError, match=r"rid dynsplit:budget=100000 is above"):
        check_request(SimpleNamespace(sampling_params={}, rid="dynsplit:budget=100000:x"), on,
                      8192)
