"""``sgl.Engine(kv_compression=..., dynsplit_config=...)`` and the settings of every launch.

Hooks (SGLang 0.5.23):
* AROUND ``sglang.srt.entrypoints.engine.Engine.__init__`` pops the two keyword arguments
  (ServerArgs would reject them) and holds them for the launch below. It must be in place before
  ``Engine(...)`` is called: ``import dynsplit_sglang; dynsplit_sglang.activate()`` does that.
* BEFORE ``sglang.srt.entrypoints.engine.Engine._launch_subprocesses``: every launch (Engine,
  ``launch_server``, ``sglang serve``) passes here with the ServerArgs it hands to the schedulers.
  Settings not yet attached by the command line (``patches/server_args.py``) are attached here:
  the Engine's keyword arguments, else the ``SGLANG_DYNSPLIT`` input.
"""

from __future__ import annotations

import contextvars

from dynsplit_sglang.settings import Settings, Source, json_object

TARGETS = ("sglang.srt.entrypoints.engine.Engine.__init__",
           "sglang.srt.entrypoints.engine.Engine._launch_subprocesses")

_pending: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "dynsplit_engine_settings", default=None)


def _settings_from_kwargs(kwargs: dict) -> Settings | None:
    method = kwargs.pop("kv_compression", None)
    extra = kwargs.pop("dynsplit_config", None)
    if method is None and extra is None:
        return None
    where = "Engine(dynsplit_config=...)"
    data = json_object(extra, where) if extra is not None else {}
    sources = dict.fromkeys(data, Source("json", where))  # kv_compression: named as its flag
    data["kv_compression"] = method or data.get("strategy", "dynsplit")
    settings = Settings.from_mapping(data, sources)
    if settings.enabled and settings.config.evict:
        from .eviction import NAME

        kwargs.setdefault("radix_cache_backend", NAME)
        kwargs.setdefault("disable_overlap_schedule", True)
    return settings


def _around_engine_init(original, self, *args, **kwargs):
    token = _pending.set(_settings_from_kwargs(kwargs))
    try:
        return original(self, *args, **kwargs)
    finally:
        _pending.reset(token)


def _before_launch(cls, *args, **kwargs):
    server_args = kwargs["server_args"] if "server_args" in kwargs else args[0]
    if not Settings.settled(server_args):
        from .server_args import settle

        settle(_pending.get(), server_args)
    return None


def register(registry, hook_type) -> list[str]:
    registry.register(TARGETS[0], _around_engine_init, hook_type.AROUND)
    registry.register(TARGETS[1], _before_launch, hook_type.BEFORE)
    return list(TARGETS)
