"""``sgl.Engine(kv_compression=..., dynsplit_config=...)``.

Hook: BEFORE ``sglang.srt.entrypoints.engine.Engine.__init__`` (SGLang 0.5.23) pops the two
keyword arguments (ServerArgs would reject them) and exports ``SGLANG_DYNSPLIT`` for the
scheduler it spawns. The hook must be in place before ``Engine(...)`` is called:
``import dynsplit_sglang; dynsplit_sglang.activate()`` does that (or set ``SGLANG_DYNSPLIT``).
"""

from __future__ import annotations

import json
import os

from dynsplit_sglang.settings import ENV, Settings

TARGETS = ("sglang.srt.entrypoints.engine.Engine.__init__",)


def _before_engine_init(*args, **kwargs):
    method = kwargs.pop("kv_compression", None)
    extra = kwargs.pop("dynsplit_config", None)
    if method is None and extra is None:
        return args, kwargs
    data = json.loads(extra) if isinstance(extra, str) else dict(extra or {})
    data["kv_compression"] = method or data.get("strategy", "dynsplit")
    settings = Settings.from_mapping(data)
    if settings.enabled and settings.config.evict:
        from .eviction import NAME

        kwargs.setdefault("radix_cache_backend", NAME)
        kwargs.setdefault("disable_overlap_schedule", True)
    if settings.enabled:
        os.environ[ENV] = settings.to_json()
    else:
        os.environ.pop(ENV, None)
    return args, kwargs


def register(registry, hook_type) -> list[str]:
    registry.register(TARGETS[0], _before_engine_init, hook_type.BEFORE)
    return list(TARGETS)
