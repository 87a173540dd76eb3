"""Per-request overrides of the DynSplit parameters, carried in the request id.

SGLang 0.5.23 hands every request's ``rid`` down to the attention backend (``ForwardBatch.rids``)
whatever the entry point (``/generate``, the OpenAI endpoints, the frontend language), so an id of
the form ``dynsplit:<field>=<value>,...:<unique part>`` lets one radix-cached server serve several
strategies and budgets side by side (the accuracy suite pays each prompt's prefill once)::

    rid = request_id(strategy="fixed", budget_fraction=0.125)
    requests.post(url + "/generate", json={"text": ..., "rid": rid, ...})
"""

from __future__ import annotations

import dataclasses
import uuid
from functools import lru_cache

from .core import ConfigError, DynSplitConfig

PREFIX = "dynsplit:"
# Server-wide by construction: the compressed layers, the vote width and the sink size the
# block store and the decode plan of the whole batch.
_FIELDS = {f.name for f in dataclasses.fields(DynSplitConfig)} - {
    "dense_layers", "future_window", "sink", "score_layers", "evict"}


def request_id(unique: str | None = None, **overrides) -> str:
    """A request id carrying these overrides (validated here, so a bad one fails at the client)."""
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ConfigError(f"request override: field(s) {unknown} cannot be set per request; "
                          f"settable: {sorted(_FIELDS)}")
    _apply(DynSplitConfig(), dict(overrides))  # validates
    body = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{PREFIX}{body}:{unique or uuid.uuid4().hex}"


def _value(name: str, text: str):
    default = getattr(DynSplitConfig(), name)
    if name in ("budget", "budget_fraction") and text == "None":
        return None
    if name == "budget_fraction" or isinstance(default, float):
        return float(text)
    if isinstance(default, int) or name == "budget":
        return int(text)
    return text


@lru_cache(maxsize=4096)
def parse_request_id(rid: str | None, base: DynSplitConfig) -> DynSplitConfig | None:
    """The request's configuration, or None when its id carries no override."""
    if not rid or not rid.startswith(PREFIX):
        return None
    body = rid[len(PREFIX):].split(":", 1)[0]
    changes = {}
    for item in filter(None, body.split(",")):
        name, _, text = item.partition("=")
        if name not in _FIELDS:
            raise ConfigError(f"request override: field {name!r} cannot be set per request "
                              f"(rid {rid!r})")
        try:
            changes[name] = _value(name, text)
        except ValueError:
            raise ConfigError(f"request override: {name}={text!r} is not a valid value") from None
    return _check_geometry(_apply(base, changes), base)


def _apply(base: DynSplitConfig, changes: dict) -> DynSplitConfig:
    if changes.get("strategy") == "none":  # the whole context, whatever its length
        changes.update(strategy=base.strategy, budget=None, budget_fraction=1.0)
    return base.replace(**changes)


def _check_geometry(cfg: DynSplitConfig, base: DynSplitConfig) -> DynSplitConfig:
    # The server sizes its per-request block tables for its own shortest block; a finer request
    # would overflow them and silently attend densely, so it is refused instead.
    if _min_block(cfg) < _min_block(base):
        raise ConfigError(
            f"request override: block_size={cfg.block_size}, tolerance={cfg.tolerance} allows "
            f"{_min_block(cfg)}-token blocks, finer than the server's {_min_block(base)} "
            "(its block tables are sized for those); start the server with "
            "--dynsplit-block-size/--dynsplit-tolerance for finer blocks")
    return cfg


def _min_block(cfg: DynSplitConfig) -> int:
    return max(1, cfg.block_size - cfg.tolerance)
