"""Flags, environment and per-request overrides (no server)."""

import argparse
import json

import pytest

from dynsplit_sglang.core import ConfigError, DynSplitConfig
from dynsplit_sglang.core.strategies import STRATEGIES
from dynsplit_sglang.overrides import parse_request_id, request_id
from dynsplit_sglang.settings import Settings, add_arguments, strip_and_parse, validate_server_args


def test_flags_are_split_off_and_parsed():
    rest, s = strip_and_parse(["--model-path", "m", "--kv-compression", "dynsplit",
                               "--dynsplit-budget", "512", "--dynsplit-alpha", "0.5", "--port", "1"])
    assert rest == ["--model-path", "m", "--port", "1"]
    assert s.method == "dynsplit" and s.config.budget == 512 and s.config.alpha == 0.5


def test_block_score_flags():
    _, s = strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-score", "bound",
                            "--dynsplit-spread", "2.5"])
    assert s.config.score == "bound" and s.config.spread == 2.5
    assert s.config.summary_spread is None  # bound: the min/max box


def test_refine_flag():
    _, s = strip_and_parse(["--kv-compression", "fixed", "--dynsplit-refine", "1.5"])
    assert s.config.refine == 1.5
    _, s = strip_and_parse(["--kv-compression", "dynsplit"])
    assert s.config.refine == 2.0  # two-stage selection is the default


def test_json_config_and_flag_precedence():
    _, s = strip_and_parse(["--kv-compression", "fixed", "--dynsplit-config",
                            json.dumps({"budget_fraction": 0.25, "recent": 32}),
                            "--dynsplit-recent", "16"])
    assert s.config.strategy == "fixed" and s.config.budget_fraction == 0.25
    assert s.config.recent == 16 and s.config.budget is None


def test_no_flags_means_no_settings():
    assert strip_and_parse(["--model-path", "m"]) == (["--model-path", "m"], None)


@pytest.mark.parametrize("argv,match", [
    (["--kv-compression", "dynsplit", "--dynsplit-budget", "10"], "budget"),
    (["--kv-compression", "dynsplit", "--dynsplit-tolerance", "99"], "tolerance"),
    (["--kv-compression", "dynsplit", "--dynsplit-candidates", "words"], "candidates"),
    (["--dynsplit-budget", "512"], "need --kv-compression"),
    (["--kv-compression", "dynsplit", "--dynsplit-config", "{bad"], "not valid JSON"),
    (["--kv-compression", "fixed", "--dynsplit-config", '{"strategy": "dynsplit"}'], "conflicts"),
])
def test_invalid_flags_are_clear_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        strip_and_parse(argv)


def test_unknown_method_is_a_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match="--kv-compression: invalid choice: 'quest'"):
        strip_and_parse(["--kv-compression", "quest"])


def test_help_lists_every_flag_with_its_unit_meaning_and_choices():
    p = argparse.ArgumentParser()
    add_arguments(p)
    text = " ".join(p.format_help().split())  # argparse wraps lines
    for flag in ("--kv-compression", "--dynsplit-budget", "--dynsplit-block-size",
                 "--dynsplit-tolerance", "--dynsplit-alpha", "--dynsplit-sink",
                 "--dynsplit-recent", "--dynsplit-dense-layers", "--dynsplit-config",
                 "--dynsplit-evict", "--dynsplit-score-layers", "--dynsplit-future-window",
                 "--dynsplit-score", "--dynsplit-spread"):
        assert flag in text
    methods = "{" + ",".join(("none", *STRATEGIES)) + "}"  # tests may register more
    for words in (methods, "{punct,all,sentence}", "{gauss,bound}", "dynsplit: DynSplit-KV",
                  "streaming: sink + recent window only", "none: dense attention",
                  "mean key plus --dynsplit-spread expected-maximum deviations",
                  "Quest's upper bound", "Number in (0, 16]. Default 1.5.",
                  "C: the target block length in tokens", "Δ: how far, in tokens",
                  "α: weight of the distant-context penalty", "fraction of the context KEPT",
                  "K/V tokens attended per decode step, per KV head", "Default 16",
                  "at most the model's context length"):
        assert words in text, words


def test_flag_errors_name_the_flag_not_the_config_field():
    from dynsplit_sglang.settings import flag_message

    for argv, want in [
        (["--dynsplit-budget", "-1"], "--dynsplit-budget -1 is invalid; expected an integer >= "),
        (["--dynsplit-tolerance", "16"], "--dynsplit-tolerance 16 is invalid; expected an integer "
                                         "in [0, block_size-1]"),
        (["--dynsplit-budget-fraction", "1.5"], "--dynsplit-budget-fraction 1.5 is invalid"),
        (["--dynsplit-candidates", "words"], "argument --dynsplit-candidates: invalid choice"),
        (["--dynsplit-budget", "x"], "argument --dynsplit-budget: invalid int value: 'x'"),
        (["--dynsplit-score", "max"], "argument --dynsplit-score: invalid choice: 'max'"),
        (["--dynsplit-spread", "0"], "--dynsplit-spread 0.0 is invalid; expected a finite number "
                                     "in (0, 16]"),
        (["--dynsplit-refine", "0.5"], "--dynsplit-refine 0.5 is invalid; expected a number in "
                                       "[1, 64] (1 = the block score alone)"),
        (["--dynsplit-refine", "x"], "argument --dynsplit-refine: invalid float value: 'x'"),
    ]:
        with pytest.raises(ConfigError) as e:
            strip_and_parse(["--kv-compression", "dynsplit", *argv])
        msg = flag_message(e.value)
        assert msg.startswith(want) and "\n" not in msg and "budget=" not in msg, msg


def test_settings_travel_on_the_server_args_and_env_is_only_an_input(monkeypatch):
    import pickle
    from types import SimpleNamespace as SA  # ServerArgs pickles its underscore attributes too

    sa = SA()
    assert Settings.of(sa) == Settings() and not Settings.settled(sa)
    s = Settings.from_mapping({"kv_compression": "fixed", "budget": 300})
    s.attach(sa)
    monkeypatch.setenv("SGLANG_DYNSPLIT", '{"kv_compression": "streaming"}')
    assert Settings.of(pickle.loads(pickle.dumps(sa))) == s  # the env var is not read here
    off = SA()
    Settings().attach(off)  # settled as off: no later input turns it on
    assert Settings.settled(off) and not Settings.of(off).enabled


def test_env_input_round_trip(monkeypatch):
    s = Settings.from_mapping({"kv_compression": "delimiter", "budget": 300})
    monkeypatch.setenv("SGLANG_DYNSPLIT", s.to_json())
    assert Settings.from_env() == s
    monkeypatch.delenv("SGLANG_DYNSPLIT")
    assert Settings.from_env() is None
    monkeypatch.setenv("SGLANG_DYNSPLIT", "{oops")
    with pytest.raises(ConfigError, match="SGLANG_DYNSPLIT"):
        Settings.from_env()


class _SA:
    attention_backend = "torch_native"
    decode_attention_backend = None
    speculative_algorithm = None
    disaggregation_mode = "null"
    enable_hierarchical_cache = False
    page_size = 1
    enable_mixed_chunk = False
    pp_size = 1


@pytest.mark.parametrize("field,value,match", [
    ("attention_backend", "flashinfer", "--attention-backend flashinfer"),
    ("speculative_algorithm", "EAGLE", "speculative"),
    ("disaggregation_mode", "prefill", "disaggregation"),
    ("enable_hierarchical_cache", True, "hierarchical"),
    ("page_size", 16, "page-size"),
    ("enable_mixed_chunk", True, "mixed-chunk"),
    ("pp_size", 2, "pp-size"),
])
def test_unsupported_combinations(field, value, match):
    sa = _SA()
    setattr(sa, field, value)
    s = Settings.from_mapping({"kv_compression": "dynsplit"})
    with pytest.raises(ConfigError, match=match):
        validate_server_args(s, sa)
    validate_server_args(Settings(), sa)  # compression off: anything goes
    validate_server_args(s, _SA())


def test_request_overrides_round_trip_and_validate():
    base = DynSplitConfig(budget=1024)
    rid = request_id(strategy="fixed", budget_fraction=0.125, unique="x1")
    assert rid == "dynsplit:budget_fraction=0.125,strategy=fixed:x1"
    cfg = parse_request_id(rid, base)
    assert cfg.strategy == "fixed" and cfg.budget_fraction == 0.125 and cfg.budget is None
    assert parse_request_id("plain-rid", base) is None
    assert parse_request_id(request_id(strategy="none"), base).token_budget(10**6) >= 10**6
    with pytest.raises(ConfigError, match="per request"):
        request_id(dense_layers=0)
    with pytest.raises(ConfigError, match="budget"):
        request_id(budget=0)  # the client checks what does not depend on the server ...
    with pytest.raises(ConfigError, match="budget=3 is invalid"):
        parse_request_id(request_id(budget=3), base)  # ... the server the rest (sink + recent)
    with pytest.raises(ConfigError, match="per request"):
        parse_request_id("dynsplit:sink=2:x", base)
    # Finer blocks than the server's would overflow its block tables (silent dense fallback).
    with pytest.raises(ConfigError, match="finer than the server's 12"):
        parse_request_id(request_id(block_size=8, unique="x2"), base)
    fine = DynSplitConfig(block_size=8, tolerance=4)
    assert parse_request_id(request_id(block_size=8, unique="x3"), fine).block_size == 8
    assert parse_request_id(request_id(block_size=32, unique="x4"), base).block_size == 32


def test_flags_override_dynsplit_config_keys_and_the_config_file():
    _, s = strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-config",
                            '{"budget_fraction": 0.1}', "--dynsplit-budget", "512"])
    assert s.config.budget == 512 and s.config.budget_fraction is None
    _, s = strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-config",
                            '{"budget": 512}', "--dynsplit-budget-fraction", "0.25"])
    assert s.config.budget is None and s.config.budget_fraction == 0.25
    _, s = strip_and_parse(["--dynsplit-budget", "512"],
                           {"kv_compression": "dynsplit", "budget_fraction": 0.1}, "f.yaml")
    assert s.config.budget == 512 and s.config.budget_fraction is None
    with pytest.raises(ConfigError, match=r"give exactly one of --dynsplit-config key budget "):
        strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-config",
                         '{"budget": 512, "budget_fraction": 0.5}'])


@pytest.mark.parametrize("argv,message", [
    (["--dynsplit-sink", "1024", "--dynsplit-recent", "65536"],
     "--dynsplit-sink 1024 and --dynsplit-recent 65536 are invalid with the default budget"),
    (["--dynsplit-block-size", "4"], "--dynsplit-block-size 4 is invalid with the default "
                                     "tolerance (4)"),
    (["--dynsplit-evict-hold", "2"], "--dynsplit-evict-hold 2.0 applies only with eviction on"),
    (["--dynsplit-evict-scope", "prompt"], "--dynsplit-evict-scope 'prompt' applies only with"),
    (["--dynsplit-config", '{"evict_keep": 8}'], "--dynsplit-config key evict_keep=8 applies"),
])
def test_flag_errors_name_only_what_was_given(argv, message):
    with pytest.raises(ConfigError) as e:
        strip_and_parse(["--kv-compression", "dynsplit", *argv])
    assert str(e.value).startswith(message) and "--dynsplit-budget" not in str(e.value)


def test_env_errors_name_the_variable_and_its_key(monkeypatch):
    monkeypatch.setenv("SGLANG_DYNSPLIT", '{"kv_compression": "dynsplit", "sink": 1024, '
                                          '"recent": 65536}')
    with pytest.raises(ConfigError, match="^SGLANG_DYNSPLIT key sink=1024 and SGLANG_DYNSPLIT "
                                          "key recent=65536 are invalid"):
        Settings.from_env()
    # a dumped configuration (every field, eviction off) is still an input
    monkeypatch.setenv("SGLANG_DYNSPLIT", Settings.from_mapping({"kv_compression": "fixed"})
                       .to_json())
    assert Settings.from_env().method == "fixed"
