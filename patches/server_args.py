"""``--kv-compression`` and the ``--dynsplit-*`` flags on SGLang 0.5.23's command line.

Hooks (sglang.srt.plugins.hook_registry.HookRegistry, SGLang 0.5.23):
* AFTER  ``sglang.srt.server_args.ServerArgs.add_cli_args``: the flags appear in ``--help`` and
  are accepted by ``launch_server``, ``sglang serve`` and ``--config`` files.
* AROUND ``sglang.srt.server_args.prepare_server_args``: a ``--config`` YAML is merged first
  (SGLang's own ``ConfigArgumentMerger``, as the original does), so its ``kv-compression`` and
  ``dynsplit-*`` keys count like flags; then the flags are split off argv before SGLang parses it
  (its ``from_cli_args`` would silently drop them), validated against the ServerArgs and the
  model, and attached to the ServerArgs (``Settings.attach``). ``SGLANG_DYNSPLIT`` is read as
  input when no flag is given. An invalid value stops the command like an argparse error: one
  line naming the flag, exit status 2.
"""

from __future__ import annotations

import logging
import sys

from dynsplit_sglang.core import ConfigError
from dynsplit_sglang.settings import (Settings, add_arguments, check_model, flag_message,
                                      strip_and_parse, validate_server_args)

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


def merge_config_file(argv: list[str]) -> list[str]:
    """argv with the ``--config`` YAML's keys inserted as flags (SGLang's precedence: command
    line over file over defaults)."""
    if "--config" not in argv:
        return argv
    import argparse

    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)  # ours included (the AFTER hook above)
    return ConfigArgumentMerger(parser).merge_config_with_args(argv)


def model_config_of(server_args):
    """SGLang's ModelConfig for these args, or None where it cannot be read here (the scheduler
    checks again once the model is loaded)."""
    try:
        from sglang.srt.configs.model_config import ModelConfig

        return ModelConfig.from_server_args(server_args)
    except Exception as e:  # e.g. a hub model id on an offline host
        logger.warning("dynsplit-sglang: model config not readable before start (%s); the "
                       "model checks run in the scheduler", e)
        return None


def settle(settings: Settings | None, server_args) -> Settings:
    """Validate the settings for these ServerArgs and attach them (the one channel)."""
    settings = settings or Settings.from_env() or Settings()
    validate_server_args(settings, server_args)
    if settings.enabled:
        model_config = model_config_of(server_args)
        if model_config is not None:
            check_model(settings, model_config)
        from . import require_all

        require_all()
        logger.info("dynsplit-sglang: --kv-compression %s %s", settings.method,
                    settings.config.to_dict())
    settings.attach(server_args)
    return settings


def _around_prepare_server_args(original, argv, *args, **kwargs):
    try:
        argv = merge_config_file(list(argv))
        rest, settings = strip_and_parse(argv)
        rest += eviction_args(settings, rest)
        server_args = original(rest, *args, **kwargs)
        settle(settings, server_args)
    except ConfigError as e:
        # A usage error, as argparse reports its own: one line, exit status 2, no traceback.
        print(f"error: {flag_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    return server_args


def register(registry, hook_type) -> list[str]:
    registry.register(TARGETS[0], _after_add_cli_args, hook_type.AFTER)
    registry.register(TARGETS[1], _around_prepare_server_args, hook_type.AROUND)
    return list(TARGETS)
