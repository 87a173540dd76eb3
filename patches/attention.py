"""DynSplit compressed decode behind SGLang 0.5.23's own attention backend names.

Registry entry (not a HookRegistry target): ``sglang.srt.layers.attention.attention_registry.
ATTENTION_BACKENDS[name]`` for each name of ``settings.SUPPORTED_BACKENDS`` is wrapped so that,
with compression enabled, the factory returns the DynSplit subclass of that backend. Keeping
SGLang's backend name keeps every name-based branch of its argument resolution (CUDA-graph and
page-size rules) as it is.
"""

from __future__ import annotations

from dynsplit_sglang.settings import SUPPORTED_BACKENDS, Settings, check_model, validate_server_args

REGISTRY = "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS"
WRAPPED = tuple(SUPPORTED_BACKENDS)


def _wrap(name: str, original):
    def factory(runner):
        settings = Settings.of(runner.server_args)  # what travelled with the ServerArgs
        if not settings.enabled:
            return original(runner)
        from dynsplit_sglang.patches import native_extend, require_all

        require_all()
        validate_server_args(settings, runner.server_args)
        check_model(settings, runner.model_config)
        native_extend.MASK_EVICTED = settings.config.evict
        from dynsplit_sglang.runtime.backends import backend_class

        return backend_class(name)(runner, settings)

    factory.__dynsplit_wraps__ = original
    factory.__name__ = f"dynsplit_{name}_factory"
    return factory


def register() -> list[str]:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    for name in WRAPPED:
        current = ATTENTION_BACKENDS[name]
        if not hasattr(current, "__dynsplit_wraps__"):
            ATTENTION_BACKENDS[name] = _wrap(name, current)
    return [f"{REGISTRY}[{n!r}]" for n in WRAPPED]


def applied() -> list[str]:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return [n for n in WRAPPED if hasattr(ATTENTION_BACKENDS.get(n), "__dynsplit_wraps__")]
