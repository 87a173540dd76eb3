"""The server-level switch: ``--kv-compression`` and the DynSplit flags, parsed, validated and
carried to every SGLang process.

SGLang 0.5.23's ServerArgs is a sealed msgspec record built at import time, so a plugin cannot add
fields; the settings ride on it as the bookkeeping attribute ``ServerArgs._dynsplit`` (JSON), which
SGLang pickles with the record to every scheduler. ``Settings.of(server_args)`` is the one way any
process reads them. The environment variable ``SGLANG_DYNSPLIT`` is only an input, read where
ServerArgs are made (``patches/server_args.py``, ``patches/engine.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .core import ConfigError, DynSplitConfig
from .core.config import CANDIDATE_MODES, EVICT_SCOPES, SCORES
from .core.strategies import STRATEGIES, load_env
from .graph_support import cuda_graph_problem

ENV = "SGLANG_DYNSPLIT"
ATTR = "_dynsplit"  # the ServerArgs attribute the settings travel on
load_env()  # strategies kept outside the package travel to every process like the settings
# The one list of SGLang 0.5.23 attention backends compressed decode runs on: name (as in
# --attention-backend) -> the SGLang class it extends (runtime/backends.py, patches/attention.py).
SUPPORTED_BACKENDS = {
    "torch_native": "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend",
    "triton": "sglang.srt.layers.attention.triton_backend.TritonAttnBackend",
}
_TYPES = {"budget": int, "budget_fraction": float, "alpha": float}
_CHOICES = {"candidates": CANDIDATE_MODES, "score": SCORES, "evict_scope": EVICT_SCOPES}
FIELD_HELP = {
    "budget": "K/V tokens attended per decode step, per KV head of each compressed layer, sink "
              "and recent window included: an integer >= sink + recent and at most the model's "
              "context length. Requests no longer than it run dense. Default {default} unless "
              "--dynsplit-budget-fraction is given.",
    "budget_fraction": "The budget as the fraction of the context KEPT (attended) at each "
                       "decode step, in (0, 1]: 0.125 attends 1/8 of the tokens (never fewer "
                       "than sink + recent). Replaces --dynsplit-budget.",
    "block_size": "C: the target block length in tokens; blocks end at a delimiter between "
                  "C - Δ and C + Δ tokens. Integer in [2, 4096]. Default {default}.",
    "tolerance": "Δ: how far, in tokens, a block's length may stray from C. Integer in "
                 "[0, C - 1]. Default {default}.",
    "alpha": "α: weight of the distant-context penalty in a delimiter's importance score "
             "(0 = only the attention its block keeps). Number in [0, 100]. Default {default}.",
    "future_window": "|F|: the queries after a candidate delimiter that vote on it, in tokens. "
                     "Integer in [1, 256]. Default {default}.",
    "sink": "Tokens at the start of the context that are always attended (attention sink). "
            "Integer in [0, 1024]. Default {default}.",
    "recent": "Most recent tokens that are always attended. Integer in [1, 65536]. "
              "Default {default}.",
    "candidates": "Which tokens may end a block: punct (punctuation, newlines), sentence "
                  "(. ! ? newline only) or all. "
                  "Default {default}.",
    "dense_layers": "The first N layers decode densely (uncompressed). Integer in [0, 1024]. "
                    "Default {default}.",
    "score_layers": "Layers (evenly spaced) whose attention votes on block boundaries; 0 = all "
                    "layers. Default {default}.",
    "score": "How a block is scored against the query from its summary, without reading its "
             "keys: gauss (the block's mean key plus --dynsplit-spread expected-maximum "
             "deviations of its keys along the query) or bound (Quest's upper bound from the "
             "keys' channel-wise min/max box). Default {default}.",
    "spread": "gauss score only: how many expected-maximum deviations above a block's mean key "
              "its score reaches; higher favours blocks whose keys vary more. Number in "
              "(0, 16]. Default {default}.",
    "refine": "Two-stage block selection: the block score picks candidate blocks for this "
              "many times the budget, then their keys are read and their exact max q·k picks "
              "the budget among them (1 = the score alone; 2 reads one extra budget of keys "
              "per step). Number in [1, 64]. Default {default}.",
    "min_sparse_len": "Decode attends densely while a request's context is shorter than this "
                      "many tokens, where a compressed step would cost more time than the keys "
                      "it skips (0 = compress whenever the context exceeds the budget). Integer "
                      "in [0, 16777216]. Default {default}.",
    "evict": "Free the KV slots of each request's least important blocks, keeping sink, "
             "recent window and top blocks within the budget (memory, not only attention). "
             "Needs --disable-overlap-schedule (added when omitted).",
    "evict_scope": "When --dynsplit-evict decides: prompt (once the request's whole prompt, "
                   "question included, is in: blocks of its own part, past any prefix shared "
                   "in the radix tree, ranked by the attention of the prompt's last "
                   "--dynsplit-evict-window queries) or chunk (after every prefill chunk, "
                   "among its new tokens, by key distinctiveness: query-agnostic, a lower "
                   "peak). Default {default}.",
    "evict_window": "--dynsplit-evict-scope prompt: how many of the prompt's last queries "
                    "rank the blocks (SnapKV's observation window). Integer in [1, 4096]. "
                    "Default {default}.",
    "evict_keep": "--dynsplit-evict-scope prompt: the first N positions of every prompt are "
                  "never evicted, as a prefix shared in the radix tree is not (per request: "
                  "a client marks what other requests will share, e.g. an agent's system and "
                  "tool prompt, before anyone has matched it). Integer in [0, 16777216]. "
                  "Default {default}.",
    "evict_hold": "--dynsplit-evict-scope prompt: 0 keeps the whole prompt until it is in (the "
                  "peak of a request is its prompt); h >= 1 bounds the peak: after every "
                  "prefill chunk the request's own part keeps at most h times its budget at the "
                  "length so far (blocks ranked by key distinctiveness), and the prompt's "
                  "end decides the rest with the question. Peak per request: about h x budget "
                  "+ one chunk. 0 or a number in [1, 64]. Default {default}.",
    "evict_pool": "--dynsplit-evict-scope prompt: the window's attention is max-pooled over "
                  "this many neighbouring positions before blocks are ranked. Odd integer in "
                  "[1, 255]. Default {default}.",
}


def methods() -> tuple[str, ...]:
    """--kv-compression's values: none, or a registered strategy (core.strategies)."""
    return ("none", *STRATEGIES)


def method_help() -> str:
    """--kv-compression's help: each registered strategy's one-line description."""
    named = "; ".join(f"{name}: {s.description or 'a registered strategy'}"
                      for name, s in STRATEGIES.items())
    return (f"KV-cache compression at decode. {named}; none: dense attention (the default). "
            "Prefill is always dense.")


def flag(field: str) -> str:
    return "--dynsplit-" + field.replace("_", "-")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def flag_message(e: ConfigError) -> str:
    """The error as a command-line user reads it: the flag, not the config field."""
    if e.field is None:
        return str(e)
    if e.field == "budget" and isinstance(e.value, tuple):
        return ("give exactly one of --dynsplit-budget (tokens) or --dynsplit-budget-fraction "
                "(of the context)")
    return f"{flag(e.field)} {_short(e.value)} is invalid; expected {e.expected}"


@dataclass(frozen=True)
class Settings:
    method: str = "none"
    config: DynSplitConfig = DynSplitConfig()

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_json(self) -> str:
        return json.dumps({"kv_compression": self.method, **self.config.to_dict()})

    def describe(self) -> dict:
        """What /server_info shows."""
        return {"kv_compression": self.method, **(self.config.to_dict() if self.enabled else {})}

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "Settings":
        data = dict(data)
        method = data.pop("kv_compression", "none")
        if method not in methods():
            raise ConfigError(f"--kv-compression={method!r} is invalid; expected one of "
                              f"{methods()}")
        if method != "none":
            data.setdefault("strategy", method)
            if data["strategy"] != method:
                raise ConfigError(
                    f"--kv-compression={method} conflicts with strategy={data['strategy']!r} in "
                    "--dynsplit-config; give the strategy once"
                )
        else:
            data.pop("strategy", None)
        return cls(method, DynSplitConfig.from_dict(data))

    @classmethod
    def from_json(cls, raw: str, source: str = ENV) -> "Settings":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a JSON object")
        return cls.from_mapping(data)

    @classmethod
    def from_env(cls) -> "Settings | None":
        """The input given as SGLANG_DYNSPLIT (None when unset)."""
        raw = os.environ.get(ENV)
        return cls.from_json(raw) if raw else None

    @classmethod
    def of(cls, server_args: Any) -> "Settings":
        """The settings that travel with these ServerArgs (compression off when none do)."""
        raw = getattr(server_args, ATTR, None)
        return _parsed(raw) if raw else cls()

    def attach(self, server_args: Any) -> None:
        """Put these settings on the ServerArgs that SGLang hands to every scheduler ("" when
        compression is off: settled, so no later input can turn it on)."""
        setattr(server_args, ATTR, self.to_json() if self.enabled else "")

    @staticmethod
    def settled(server_args: Any) -> bool:
        return getattr(server_args, ATTR, None) is not None


@lru_cache(maxsize=8)
def _parsed(raw: str) -> Settings:
    return Settings.from_json(raw, f"ServerArgs.{ATTR}")


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --kv-compression and one --dynsplit-* flag per DynSplitConfig field."""
    group = parser.add_argument_group(
        "KV compression (dynsplit-sglang)",
        "Budgets count K/V tokens per KV head of each compressed layer and decode step.")
    group.add_argument("--kv-compression", choices=methods(), default=None, help=method_help())
    group.add_argument("--dynsplit-config", default=None, metavar="JSON",
                       help="DynSplit parameters as one JSON object (fields as the flags below, "
                            "with underscores, e.g. '{\"budget_fraction\": 0.125}'); individual "
                            "flags take precedence.")
    defaults = DynSplitConfig()
    for f in dataclasses.fields(DynSplitConfig):
        if f.name == "strategy":
            continue
        default = getattr(defaults, f.name)
        text = FIELD_HELP[f.name].format(default=default)
        if isinstance(default, bool):
            # store_true with default None: "not given" stays distinguishable, and SGLang's
            # --config merger accepts store_true flags (not store_const).
            group.add_argument(flag(f.name), action="store_true", default=None, help=text)
            continue
        typ = _TYPES.get(f.name) or type(default)
        group.add_argument(flag(f.name), type=typ, default=None, choices=_CHOICES.get(f.name),
                           help=text)


def strip_and_parse(argv: list[str]) -> tuple[list[str], Settings | None]:
    """Split our flags off argv (SGLang's own parser must not see them); None if none given."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_arguments(parser)
    try:
        ns, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:  # names the flag: "argument --dynsplit-...: ..."
        raise ConfigError(str(e)) from None
    given = {k: v for k, v in vars(ns).items() if v is not None}
    if not given:
        return list(argv), None
    data: dict[str, Any] = {}
    if "dynsplit_config" in given:
        try:
            data = json.loads(given.pop("dynsplit_config"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--dynsplit-config is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError("--dynsplit-config must be a JSON object")
    for key, value in given.items():
        name = key[len("dynsplit_"):] if key.startswith("dynsplit_") else key
        data[name] = value
    if "budget_fraction" in data and "budget" not in data:
        data["budget"] = None
    method = data.get("kv_compression", "none")
    if method == "none" and any(k != "kv_compression" for k in data):
        raise ConfigError(f"--dynsplit-* flags need --kv-compression (one of {tuple(STRATEGIES)})")
    return rest, Settings.from_mapping(data)


# -- compatibility with the rest of the server ------------------------------------------------------


def validate_server_args(settings: Settings, sa: Any) -> None:
    """Reject combinations the implementation does not handle, before anything serves."""
    if not settings.enabled:
        return
    problems = []
    backends = {getattr(sa, "attention_backend", None), getattr(sa, "decode_attention_backend", None)}
    backends.discard(None)
    for b in backends:
        if b not in SUPPORTED_BACKENDS:
            problems.append(f"--attention-backend {b}: use one of {tuple(SUPPORTED_BACKENDS)}")
    checks = [
        (getattr(sa, "speculative_algorithm", None) not in (None, "", "NONE"),
         "speculative decoding (--speculative-algorithm): remove it"),
        (getattr(sa, "disaggregation_mode", "null") not in ("null", None),
         "PD disaggregation (--disaggregation-mode): not supported"),
        (bool(getattr(sa, "enable_hierarchical_cache", False)),
         "--enable-hierarchical-cache: host-offloaded KV is not tracked; remove it"),
        (getattr(sa, "page_size", 1) not in (1, None),
         f"--page-size {getattr(sa, 'page_size', None)}: only --page-size 1 is supported"),
        (bool(getattr(sa, "enable_mixed_chunk", False)),
         "--enable-mixed-chunk: decode inside extend batches would run dense; remove it"),
        (getattr(sa, "pp_size", 1) not in (1, None),
         "--pp-size > 1: pipeline parallelism is not supported"),
        (getattr(sa, "kv_cache_dtype", "auto") not in ("auto", None, "bfloat16", "float16",
                                                        "float32"),
         f"--kv-cache-dtype {getattr(sa, 'kv_cache_dtype', None)}: quantized KV is not "
         "supported; use auto"),
    ]
    if settings.config.evict:
        checks += [
            (getattr(sa, "radix_cache_backend", None) not in (None, "dynsplit-evict"),
             f"--dynsplit-evict with --radix-cache-backend {getattr(sa, 'radix_cache_backend', None)}"
             ": eviction needs the dynsplit-evict radix cache (the default when it is omitted)"),
            (not bool(getattr(sa, "disable_overlap_schedule", False)),
             "--dynsplit-evict without --disable-overlap-schedule: eviction frees KV slots "
             "inside the forward, which must not overlap the scheduler's allocations"),
            (getattr(sa, "attention_backend", "torch_native") != "torch_native"
             or getattr(sa, "prefill_attention_backend", None) not in (None, "torch_native"),
             "--dynsplit-evict with an attention backend other than torch_native: only its "
             "extend attention masks evicted slots so far"),
        ]
    problems += [msg for bad, msg in checks if bad]
    graphs = cuda_graph_problem(sa)  # never a silent dense decode under SGLang's graphs
    if graphs:
        problems.append(graphs)
    if problems:
        raise ConfigError(f"--kv-compression {settings.method} cannot run with: "
                          + "; ".join(problems))


def check_model(settings: Settings, model_config: Any) -> None:
    """Fail before serving for models the block store cannot describe, and for budgets the
    model's context can never reach (SGLang's ``ModelConfig``: attention_arch, context_len)."""
    if not settings.enabled:
        return
    arch = getattr(model_config, "attention_arch", None)
    if arch is not None and getattr(arch, "name", str(arch)) != "MHA":
        raise ConfigError(f"--kv-compression: attention architecture {arch} (MLA/DSA) is not "
                          "supported; use a model with multi-head or grouped-query attention")
    if getattr(model_config, "is_hybrid_swa", False) or getattr(model_config, "is_hybrid", False):
        raise ConfigError("--kv-compression: hybrid (sliding-window or linear) attention models "
                          "are not supported")
    ctx, cfg = getattr(model_config, "context_len", None), settings.config
    if not isinstance(ctx, int):
        return
    if cfg.budget is not None and cfg.budget > ctx:
        raise ConfigError(f"--dynsplit-budget {cfg.budget} is above the model's context length "
                          f"({ctx} tokens): no request could ever be compressed; use at most "
                          f"{ctx} or --dynsplit-budget-fraction")
    if cfg.sink + cfg.recent >= ctx:
        raise ConfigError(f"--dynsplit-sink {cfg.sink} + --dynsplit-recent {cfg.recent} cover the "
                          f"model's whole context ({ctx} tokens): nothing would be compressed")
