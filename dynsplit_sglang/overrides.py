"""Per-request overrides of the DynSplit parameters.

The channel is SGLang's own request field ``sampling_params.custom_params["dynsplit"]``, a JSON
object of field: value (``/generate``; the OpenAI endpoints take ``custom_params`` in the body,
``extra_body`` in the OpenAI client)::

    {"text": ..., "sampling_params": {"max_new_tokens": 64,
                                      "custom_params": {"dynsplit": {"strategy": "fixed",
                                                                     "budget_fraction": 0.125}}}}

Alias: a request id of the form ``dynsplit:<field>=<value>,...:<unique part>``
(``request_id(...)``), for clients that can set the rid but not custom_params. Both forms are
validated the same way, once, when SGLang admits the request (``patches/admission.py``): an invalid
override is an HTTP 400 naming the field, and the request does not run. ``strategy="none"`` runs
the request dense (it attends to its whole context).
"""

from __future__ import annotations

import dataclasses
import uuid
from functools import lru_cache
from typing import Any

from .core import ConfigError, DynSplitConfig
from .core.config import EVICT_FIELDS, describe, short

PREFIX = "dynsplit:"
KEY = "dynsplit"  # in sampling_params.custom_params
RID_WHERE = "rid dynsplit:"  # how errors name a rid-form override's fields
# Server-wide by construction: the compressed layers, the vote width and the sink size the
# block store and the decode plan of the whole batch.
SERVER_ONLY = ("dense_layers", "future_window", "sink", "score_layers", "evict", "evict_scope",
               "evict_window", "evict_pool", "evict_tier", "evict_tier_mb")
FIELDS = tuple(sorted({f.name for f in dataclasses.fields(DynSplitConfig)} - set(SERVER_ONLY)))
EVICT_ONLY = tuple(f for f in EVICT_FIELDS if f in FIELDS)
_MAX_ITEMS = 16  # more keys than fields: refused before anything is parsed
# Client-side checks refuse nothing that depends on the server (its geometry, sink, recent).
_FINEST = DynSplitConfig(block_size=2, tolerance=1, sink=0, recent=1)


def _at(where: str, field: Any) -> str:
    return f"{where}{field}" if where.endswith(":") else f"{where}.{field}"


def _short(value: Any) -> str:
    return short(value, 40)


def request_id(unique: str | None = None, **overrides) -> str:
    """A request id carrying these overrides (validated here as far as the client can: the
    server checks them again against its own geometry and context length)."""
    check(overrides, _FINEST, where="request_id")
    body = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{PREFIX}{body}:{unique or uuid.uuid4().hex}"


def from_request_id(rid: Any) -> dict | None:
    """The overrides a request id carries (values as text), or None for an ordinary id."""
    if not isinstance(rid, str) or not rid.startswith(PREFIX):
        return None
    body = rid[len(PREFIX):].split(":", 1)[0]
    items = [i for i in body.split(",") if i]
    if len(items) > _MAX_ITEMS:
        raise ConfigError(f"{RID_WHERE} {len(items)} items; at most {len(FIELDS)} fields")
    out = {}
    for item in items:
        name, _, text = item.partition("=")
        out[name] = text
    return out


def _text_value(name: str, text: str):
    default = getattr(DynSplitConfig(), name)
    if name == "budget_fraction" or isinstance(default, float):
        return float(text)
    if isinstance(default, int) or name == "budget":
        return int(text)
    return text


def check(overrides: Any, base: DynSplitConfig, where: str = "custom_params.dynsplit",
          context_len: int | None = None, from_text: bool = False) -> DynSplitConfig:
    """The request's configuration; ConfigError naming ``where.<field>`` when it is invalid."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a JSON object of field: value, got "
                          f"{type(overrides).__name__}")
    if len(overrides) > _MAX_ITEMS:
        raise ConfigError(f"{where}: {len(overrides)} keys; at most {len(FIELDS)} fields")
    changes = {}
    for name, value in overrides.items():
        if name not in FIELDS:
            why = ("set per server only" if name in SERVER_ONLY else "not a DynSplit field")
            raise ConfigError(f"{_at(where, _short(name))} cannot be set per request ({why}); "
                              f"settable: {list(FIELDS)}", name, value)
        if from_text:
            try:
                value = _text_value(name, value)
            except ValueError:
                raise ConfigError(f"{_at(where, name)}={_short(value)} is not a valid value", name,
                                  value) from None
        if value is None:  # would mean the library default, not the server's setting
            raise ConfigError(f"{_at(where, name)} is null; give a value or leave it out", name)
        if not isinstance(value, (str, int, float)):  # bool is an int
            raise ConfigError(f"{_at(where, name)} must be a number or a string, got "
                              f"{type(value).__name__}", name)
        if name in EVICT_ONLY and not base.evict and base is not _FINEST:  # client: unknown
            raise ConfigError(f"{_at(where, name)}={_short(value)} does nothing on this server: "
                              "it runs without eviction (--dynsplit-evict)", name, value)
        changes[name] = value
    # Each value's type is part of the cache key: True == 1 == 1.0, and a value refused as one
    # type must never hit the entry an equal value of another type made.
    key = tuple((name, type(changes[name]), changes[name]) for name in sorted(changes))
    try:
        cfg = _resolve(key, base)
    except ConfigError as e:
        if e.field == "budget" and isinstance(e.value, tuple):
            raise ConfigError(f"{where}: give at most one of budget (tokens) or budget_fraction "
                              "(of the context)", e.field, e.value) from None
        if e.field == "strategy":
            e.expected += " or 'none' (dense)"
        message = describe(e, lambda f, v: f"{_at(where, f)}={_short(v)}", changes,
                           "the server's")
        raise ConfigError(message if e.field is not None else f"{where}: {e}", e.field,
                          e.value, e.expected) from None
    if context_len is not None and cfg.budget is not None and cfg.budget > context_len:
        raise ConfigError(f"{_at(where, 'budget')}={cfg.budget} is above the model's context "
                          f"length ({context_len} tokens)", "budget", cfg.budget)
    return cfg


@lru_cache(maxsize=4096)
def _resolve(key: tuple, base: DynSplitConfig) -> DynSplitConfig:
    changes = {name: value for name, _, value in key}
    dense = changes.get("strategy") == "none"
    if dense:  # every other field is checked as with any strategy, then the whole context
        changes["strategy"] = base.strategy
    cfg = _check_geometry(base.replace(**changes), base)
    return cfg.replace(budget=None, budget_fraction=1.0) if dense else cfg


def parse_request_id(rid: str | None, base: DynSplitConfig) -> DynSplitConfig | None:
    """The configuration a rid-form request runs with, or None when its id carries none."""
    found = from_request_id(rid)
    return None if found is None else check(found, base, RID_WHERE, from_text=True)


def _check_geometry(cfg: DynSplitConfig, base: DynSplitConfig) -> DynSplitConfig:
    # The server sizes its per-request block tables for its own shortest block; a finer request
    # would overflow them and silently attend densely, so it is refused instead.
    if cfg.min_block_len < base.min_block_len:
        raise ConfigError(
            f"block_size={cfg.block_size}, tolerance={cfg.tolerance} allows "
            f"{cfg.min_block_len}-token blocks, finer than the server's {base.min_block_len} "
            "(its block tables are sized for those); start the server with "
            "--dynsplit-block-size/--dynsplit-tolerance for finer blocks", "block_size",
            cfg.block_size, f"blocks no finer than the server's {base.min_block_len} tokens "
            "(block_size - tolerance)")
    return cfg
