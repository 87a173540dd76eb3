"""``--kv-compression`` and the ``--dynsplit-*`` flags on SGLang 0.5.23's command line.

Hooks (sglang.srt.plugins.hook_registry.HookRegistry, SGLang 0.5.23):
* AFTER  ``sglang.srt.server_args.ServerArgs.add_cli_args``: the flags appear in ``--help`` and
  are accepted by ``launch_server``, ``sglang serve`` and ``--config`` files.
* AROUND ``sglang.srt.server_args.prepare_server_args``: the flags are split off argv before
  SGLang parses it (its ``from_cli_args`` would silently drop them), validated against the
  resolved ServerArgs, and exported as ``SGLANG_DYNSPLIT`` for the spawned schedulers.
"""

from __future__ import annotations

import logging
import os

from dynsplit_sglang.settings import ENV, Settings, add_arguments, strip_and_parse, validate_server_args

logger = logging.getLogger(__name__)

TARGETS = (
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.prepare_server_args",
)


def _after_add_cli_args(result, parser, *args, **kwargs):
    if not any(a.option_strings == ["--kv-compression"] for a in parser._actions):
        add_arguments(parser)
    return result


def eviction_args(settings: Settings, argv: list[str]) -> list[str]:
    """SGLang flags --dynsplit-evict implies (added unless given): the slot-counting radix cache,
    and no overlap scheduling (eviction frees slots inside the forward)."""
    if not (settings and settings.enabled and settings.config.evict):
        return []
    from .eviction import NAME

    extra = []
    if "--radix-cache-backend" not in argv:
        extra += ["--radix-cache-backend", NAME]
    if "--disable-overlap-schedule" not in argv:
        extra.append("--disable-overlap-schedule")
    return extra


def _around_prepare_server_args(original, argv, *args, **kwargs):
    rest, settings = strip_and_parse(list(argv))
    rest += eviction_args(settings, rest)
    server_args = original(rest, *args, **kwargs)
    settings = settings or Settings.from_env()
    validate_server_args(settings, server_args)
    if settings.enabled:
        os.environ[ENV] = settings.to_json()
        server_args._dynsplit = settings.to_json()  # bookkeeping, pickled to the schedulers
        logger.info("dynsplit-sglang: --kv-compression %s %s", settings.method,
                    settings.config.to_dict())
    else:
        os.environ.pop(ENV, None)
    return server_args


def register(registry, hook_type) -> list[str]:
    registry.register(TARGETS[0], _after_add_cli_args, hook_type.AFTER)
    registry.register(TARGETS[1], _around_prepare_server_args, hook_type.AROUND)
    return list(TARGETS)
