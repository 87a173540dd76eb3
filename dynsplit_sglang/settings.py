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
from typing import Any, Mapping

from .core import ConfigError, DynSplitConfig
from .core.config import (
    CANDIDATE_MODES, EVICT_FIELDS, EVICT_SCOPES, EVICT_TIERS, SCORES, describe, short,
)
from .core.strategies import STRATEGIES, load_env
from .flag_help import FIELD_HELP
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
_CHOICES = {"candidates": CANDIDATE_MODES, "score": SCORES, "evict_scope": EVICT_SCOPES,
            "evict_tier": EVICT_TIERS}


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
    """The flag of a DynSplitConfig field (or of kv_compression / dynsplit_config)."""
    dest = field if field in ("kv_compression", "dynsplit_config") else "dynsplit_" + field
    return "--" + dest.replace("_", "-")


def flag_message(e: ConfigError) -> str:
    """The error as a command-line user reads it: the flag, not the config field."""
    if e.field is None:
        return str(e)
    return f"{flag(e.field)} {short(e.value)} is invalid; expected {e.expected}"


_UNSET = object()


@dataclass(frozen=True)
class Source:
    """Where a setting was given, and how a message names it there: a flag, a key of a JSON
    object (``where``: --dynsplit-config, SGLANG_DYNSPLIT) or a key of a --config YAML file
    (``where``: the file)."""

    kind: str = "flag"  # "flag", "json" or "yaml"
    where: str = ""

    def name(self, field: str, value: Any = _UNSET) -> str:
        field = field if len(field) <= 40 else short(field, 40)  # a JSON key can be anything
        if self.kind == "json":
            return f"{self.where} key {field}" + ("" if value is _UNSET else f"={short(value)}")
        if self.kind == "yaml":
            shown = "" if value is _UNSET else f": {short(value)}"
            return f"{flag(field)[2:]}{shown} (in {self.where})"
        return flag(field) + ("" if value is _UNSET or isinstance(value, bool)
                              else f" {short(value)}")


FLAG = Source()


@dataclass(frozen=True)
class Settings:
    method: str = "none"
    config: DynSplitConfig = DynSplitConfig()
    # field -> the Source that gave it, for messages (None: every field named as its flag)
    sources: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def name(self, field: str, value: Any = _UNSET) -> str:
        """How the user gave ``field``: its flag, YAML key or JSON key."""
        return (self.sources or {}).get(field, FLAG).name(field, value)

    def to_json(self) -> str:
        return json.dumps({"kv_compression": self.method, **self.config.to_dict()})

    def describe(self) -> dict:
        """What /server_info shows."""
        return {"kv_compression": self.method, **(self.config.to_dict() if self.enabled else {})}

    @classmethod
    def from_mapping(cls, data: dict[str, Any], sources: Any = None) -> "Settings":
        """``sources``: the Source of every key, or one Source for all (messages name them)."""
        data = dict(data)
        if isinstance(sources, Source):
            sources = dict.fromkeys(data, sources)
        sources = dict(sources or {})
        s = cls(sources=sources)
        method = data.pop("kv_compression", "none")
        if method not in methods():
            raise ConfigError(f"{s.name('kv_compression', method)} is invalid; expected one of "
                              f"{methods()}")
        if method != "none":
            data.setdefault("strategy", method)
            if data["strategy"] != method:
                raise ConfigError(f"{s.name('kv_compression', method)} conflicts with "
                                  f"{s.name('strategy', data['strategy'])}; give the strategy once")
        else:
            data.pop("strategy", None)
        fields = {f.name for f in dataclasses.fields(DynSplitConfig)}
        for key in data:
            if key not in fields:
                raise ConfigError(f"{s.name(str(key))} is not a DynSplit setting; valid: "
                                  f"{sorted(fields)}")
        _check_eviction_given(data, s)
        try:
            config = DynSplitConfig.from_dict(data)
        except ConfigError as e:
            if e.field == "budget" and isinstance(e.value, tuple):
                raise ConfigError(f"give exactly one of {s.name('budget')} (tokens) or "
                                  f"{s.name('budget_fraction')} (of the context)") from None
            raise ConfigError(describe(e, s.name, data, "the default")) from None
        return cls(method, config, sources)

    @classmethod
    def from_json(cls, raw: str, source: str = ENV) -> "Settings":
        return cls.from_mapping(json_object(raw, source), Source("json", source))

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
    return dataclasses.replace(Settings.from_json(raw, f"ServerArgs.{ATTR}"), sources=None)


def _check_eviction_given(data: dict, s: Settings) -> None:
    """An eviction setting where nothing evicts is refused: it would silently do nothing. A
    flag or YAML key counts as soon as it is given; a JSON key (which may be a dumped
    configuration, ``Settings.to_json``) once it differs from the default."""
    if data.get("evict"):
        return
    defaults = DynSplitConfig()
    for key in EVICT_FIELDS:
        source = (s.sources or {}).get(key)
        given = source is not None and source.kind != "json"
        if key in data and (given or data[key] != getattr(defaults, key)):
            raise ConfigError(f"{s.name(key, data[key])} applies only with eviction on "
                              "(--dynsplit-evict); remove it or turn eviction on")


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


def flag_parser() -> argparse.ArgumentParser:
    """Our flags alone, errors raised (not printed)."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_arguments(parser)
    return parser


def as_fields(given: dict) -> dict:
    """argparse dests -> DynSplitConfig fields (kv_compression and dynsplit_config kept)."""
    return {k if k in ("kv_compression", "dynsplit_config") else k[len("dynsplit_"):]: v
            for k, v in given.items()}


def json_object(raw: Any, where: str) -> dict:
    """``raw`` (JSON text, or a mapping already: YAML's, the Engine's) as a dict."""
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e})") from None
    except TypeError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object")
    return data


def strip_and_parse(argv: list[str], file_given: dict | None = None,
                    file: str = "") -> tuple[list[str], Settings | None]:
    """Split our flags off argv (SGLang's own parser must not see them); None if none given.

    ``file_given``: the settings of the --config YAML ``file`` (patches/server_args.py). Precedence,
    highest first: flags, the command line's --dynsplit-config, the file's keys, the file's
    dynsplit-config (SGLang's: command line over file); a budget given at a higher level
    replaces a budget_fraction below it, and the other way round."""
    try:
        ns, rest = flag_parser().parse_known_args(argv)
    except argparse.ArgumentError as e:  # names the flag: "argument --dynsplit-...: ..."
        raise ConfigError(str(e)) from None
    flags = as_fields({k: v for k, v in vars(ns).items() if v is not None})
    in_file = dict(file_given or {})
    layers = []  # (fields, their Source), lowest precedence first
    cli_json, file_json = flags.pop("dynsplit_config", None), in_file.pop("dynsplit_config", None)
    if file_json is not None and cli_json is None:
        where = f"dynsplit-config (in {file})"
        layers.append((json_object(file_json, where), Source("json", where)))
    layers.append((in_file, Source("yaml", file)))
    if cli_json is not None:
        layers.append((json_object(cli_json, "--dynsplit-config"),
                       Source("json", "--dynsplit-config")))
    layers.append((flags, FLAG))
    data: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for values, source in layers:
        if {"budget", "budget_fraction"} & values.keys():
            data.pop("budget", None)
            data.pop("budget_fraction", None)
        data.update(values)
        sources.update(dict.fromkeys(values, source))
    if not data:
        return list(argv), None
    if data.get("kv_compression", "none") == "none":
        other = next((k for k in data if k != "kv_compression"), None)
        if other is not None:
            raise ConfigError(f"{sources[other].name(other)}: DynSplit settings need "
                              f"--kv-compression (one of {tuple(STRATEGIES)})")
    return rest, Settings.from_mapping(data, sources)


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
        raise ConfigError(f"{settings.name('budget', cfg.budget)} is above the model's context "
                          f"length ({ctx} tokens): no request could ever be compressed; use at "
                          f"most {ctx} or a budget fraction")
    if cfg.sink + cfg.recent >= ctx:
        sent = [settings.name(f, getattr(cfg, f)) for f in ("sink", "recent")
                if f in (settings.sources or {"sink": 0, "recent": 0})]
        raise ConfigError(f"sink + recent = {cfg.sink + cfg.recent} tokens ({', '.join(sent)}) "
                          f"cover the model's whole context ({ctx} tokens): nothing would be "
                          "compressed")
