"""The server-level switch: ``--kv-compression`` and the DynSplit flags, parsed, validated and
carried to every SGLang process.

SGLang 0.5.23's ServerArgs is a sealed msgspec record built at import time, so a plugin cannot add
fields; the settings travel instead as JSON in the environment variable ``SGLANG_DYNSPLIT`` that
spawned schedulers inherit (and that Engine users may set themselves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .core import ConfigError, DynSplitConfig
from .graph_support import cuda_graph_problem

ENV = "SGLANG_DYNSPLIT"
METHODS = ("none", "dynsplit", "fixed", "delimiter", "streaming")
SUPPORTED_BACKENDS = ("torch_native", "triton")
_TYPES = {"budget": int, "budget_fraction": float, "alpha": float}
_BOOL_HELP = {"evict": "Free the KV slots of each request's least important blocks once its "
                       "prompt is split, keeping sink, recent window and top blocks within the "
                       "budget (memory, not only attention). Needs --disable-overlap-schedule."}


def _flag(field: str) -> str:
    return "--dynsplit-" + field.replace("_", "-")


@dataclass(frozen=True)
class Settings:
    method: str = "none"
    config: DynSplitConfig = DynSplitConfig()

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_json(self) -> str:
        return json.dumps({"kv_compression": self.method, **self.config.to_dict()})

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "Settings":
        data = dict(data)
        method = data.pop("kv_compression", "none")
        if method not in METHODS:
            raise ConfigError(f"--kv-compression={method!r} is invalid; expected one of {METHODS}")
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
    def from_env(cls) -> "Settings":
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV} is not valid JSON ({e})") from None
        return cls.from_mapping(data)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --kv-compression and one --dynsplit-* flag per DynSplitConfig field."""
    group = parser.add_argument_group("KV compression (dynsplit-sglang)")
    group.add_argument("--kv-compression", choices=METHODS, default=None,
                       help="KV-cache compression at decode: DynSplit-KV semantic blocks "
                            "('dynsplit') or a rigid baseline. Default: none.")
    group.add_argument("--dynsplit-config", default=None, metavar="JSON",
                       help="DynSplit parameters as one JSON object (fields as the flags below, "
                            "with underscores); individual flags take precedence.")
    defaults = DynSplitConfig()
    for f in dataclasses.fields(DynSplitConfig):
        if f.name == "strategy":
            continue
        if isinstance(getattr(defaults, f.name), bool):
            group.add_argument(_flag(f.name), action="store_const", const=True, default=None,
                               help=_BOOL_HELP[f.name])
            continue
        typ = _TYPES.get(f.name) or type(getattr(defaults, f.name))
        group.add_argument(_flag(f.name), type=typ, default=None,
                           help=f"DynSplit {f.name} (default {getattr(defaults, f.name)}).")


def strip_and_parse(argv: list[str]) -> tuple[list[str], Settings | None]:
    """Split our flags off argv (SGLang's own parser must not see them); None if none given."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    ns, rest = parser.parse_known_args(argv)
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
        raise ConfigError("--dynsplit-* flags need --kv-compression (dynsplit, fixed, delimiter "
                          "or streaming)")
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
            problems.append(f"--attention-backend {b}: use one of {SUPPORTED_BACKENDS}")
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
