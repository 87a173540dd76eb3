import json

import pytest

from dynsplit_sglang.core import ConfigError, DynSplitConfig

BAD = [
    ("strategy", "quest", "strategy"),
    ("block_size", 1, "block_size"),
    ("block_size", 16.0, "block_size"),
    ("tolerance", 16, "tolerance"),
    ("tolerance", -1, "tolerance"),
    ("alpha", float("nan"), "alpha"),
    ("alpha", -0.5, "alpha"),
    ("future_window", 0, "future_window"),
    ("sink", -1, "sink"),
    ("recent", 0, "recent"),
    ("candidates", "words", "candidates"),
    ("dense_layers", -2, "dense_layers"),
    ("score_layers", True, "score_layers"),
    ("budget", 10, "budget"),  # below sink + recent
]


@pytest.mark.parametrize("field,value,named", BAD)
def test_invalid_values_name_the_field(field, value, named):
    with pytest.raises(ConfigError, match=named):
        DynSplitConfig(**{field: value})


def test_budget_given_twice_or_out_of_range():
    with pytest.raises(ConfigError, match="exactly one"):
        DynSplitConfig(budget=256, budget_fraction=0.25)
    assert DynSplitConfig(budget=None, budget_fraction=None).budget == 1024
    with pytest.raises(ConfigError, match="budget_fraction"):
        DynSplitConfig(budget=None, budget_fraction=1.5)


def test_budget_below_sink_plus_recent_message():
    with pytest.raises(ConfigError, match=r"sink \+ recent = 68"):
        DynSplitConfig(budget=67)
    assert DynSplitConfig(budget=68).token_budget(10_000) == 68


def test_fraction_budget_resolves_per_context_and_floors_at_sink_plus_recent():
    cfg = DynSplitConfig(budget_fraction=0.125)
    assert cfg.token_budget(8192) == 1024
    assert cfg.token_budget(100) == cfg.sink + cfg.recent


def test_json_round_trip_and_unknown_field():
    cfg = DynSplitConfig(strategy="fixed", budget=512, tolerance=0)
    assert DynSplitConfig.from_json(json.dumps(cfg.to_dict())) == cfg
    assert DynSplitConfig.from_dict({"budget_fraction": 0.25}).budget is None
    with pytest.raises(ConfigError, match="unknown field"):
        DynSplitConfig.from_dict({"bugdet": 3})
    with pytest.raises(ConfigError, match="JSON"):
        DynSplitConfig.from_json("{budget: 3")


def test_scored_layers_evenly_spaced():
    cfg = DynSplitConfig(score_layers=4)
    assert cfg.scored_layers(30) == [3, 11, 18, 26]
    assert cfg.scored_layers(3) == [0, 1, 2]
    assert DynSplitConfig(score_layers=0).scored_layers(5) == [0, 1, 2, 3, 4]


def test_streaming_spends_budget_on_recent():
    cfg = DynSplitConfig(strategy="streaming", budget=256)
    assert cfg.recent_for(256) == 256 - cfg.sink
    assert DynSplitConfig(budget=256).recent_for(256) == 64


def test_every_field_is_classified_for_block_reuse():
    """A new field must be put in SPLIT_FIELDS, SUMMARY_FIELDS or READ_FIELDS: forgetting a
    split setting would let a request adopt blocks split another way, silently."""
    import dataclasses

    from dynsplit_sglang.core.config import READ_FIELDS, SPLIT_FIELDS, SUMMARY_FIELDS

    groups = [set(SPLIT_FIELDS), set(SUMMARY_FIELDS), set(READ_FIELDS)]
    every = {f.name for f in dataclasses.fields(DynSplitConfig)}
    assert set().union(*groups) == every
    assert sum(map(len, groups)) == len(every)  # no field in two groups


_OTHER = {"strategy": "fixed", "block_size": 20, "tolerance": 2, "alpha": 0.5,
          "future_window": 8, "sink": 8, "candidates": "all", "score_layers": 2,
          "score": "bound", "spread": 2.0, "budget": 2048, "recent": 32, "dense_layers": 3,
          "refine": 1, "min_sparse_len": 100}


@pytest.mark.parametrize("field", sorted(_OTHER))
def test_block_identity_follows_the_split_and_summary_fields_only(field):
    from dynsplit_sglang.core.config import READ_FIELDS

    base = DynSplitConfig()
    other = base.replace(**{field: _OTHER[field]})
    same = field in READ_FIELDS or (field == "spread" and base.score == "bound")
    assert (other.block_identity() == base.block_identity()) == same
    assert other.block_identity(decode=True)[0] == "decode"
