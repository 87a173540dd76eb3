"""``--kv-compression`` and the ``--dynsplit-*`` flags on SGLang 0.5.23's command line.

Hooks (sglang.srt.plugins.hook_registry.HookRegistry, SGLang 0.5.23):
* AFTER  ``sglang.srt.server_args.ServerArgs.add_cli_args``: the flags appear in ``--help`` and
  are accepted by ``launch_server``, ``sglang serve`` and ``--config`` files.
* AROUND ``sglang.srt.server_args.prepare_server_args``: a ``--config`` YAML is merged first
  (SGLang's own ``ConfigArgumentMerger``, as the original does, for SGLang's keys; its
  ``kv-compression`` and ``dynsplit-*`` keys are checked here and count like flags, below the
  command line's); then the flags are split off argv before SGLang parses it
  (its ``from_cli_args`` would silently drop them), validated against the ServerArgs and the
  model, and attached to the ServerArgs (``Settings.attach``). ``SGLANG_DYNSPLIT`` is read as
  input when no flag is given. The file is read with ``ConfigArgumentMerger``'s own
  ``_extract_config_file_path``, ``_validate_yaml_file`` and ``_convert_config_to_args``
  (``sglang.srt.utils.server_args_config_parser``, SGLang 0.5.23: private helpers, so our keys
  can be checked apart before SGLang sees the rest). An invalid value stops the command like an
  argparse error: one line naming the flag, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dynsplit_sglang.core import ConfigError
from dynsplit_sglang.settings import (Settings, Source, add_arguments, as_fields, check_model,
                                      flag_message, flag_parser, strip_and_parse,
                                      validate_server_args)

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


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def merge_config_file(argv: list[str]) -> tuple[list[str], dict, str]:
    """argv with the ``--config`` YAML's SGLang keys inserted as flags, as SGLang's
    ``ConfigArgumentMerger.merge_config_with_args`` does (its precedence: command line over file
    over defaults); our keys come back apart, checked (``yaml_settings``), with the file's name.
    A file SGLang could not read is a ConfigError naming it, not a traceback."""
    if "--config" not in argv:
        return argv, {}, ""
    import yaml
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)  # ours included (the AFTER hook above)
    merger = ConfigArgumentMerger(parser)
    try:
        path = merger._extract_config_file_path(argv)
        merger._validate_yaml_file(path)
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--config {_cut(path)} is not valid YAML{at}") from None
    except (ValueError, OSError) as e:
        raise ConfigError(f"--config: {_cut(str(e).splitlines()[0] if str(e) else repr(e))}") \
            from None
    name = _cut(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {name} must be a mapping of key: value at its root, got "
                          f"a {type(data).__name__}")
    ours, theirs = yaml_settings(data, name)
    i = argv.index("--config")
    return merger._convert_config_to_args(theirs) + argv[:i] + argv[i + 2:], ours, name


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
            from .memory import check_before_start

            check_before_start(settings, server_args, model_config)
        from . import require_all

        require_all()
        logger.info("dynsplit-sglang: --kv-compression %s %s", settings.method,
                    settings.config.to_dict())
    settings.attach(server_args)
    return settings


def _around_prepare_server_args(original, argv, *args, **kwargs):
    try:
        argv, in_file, file = merge_config_file(list(argv))
        rest, settings = strip_and_parse(argv, in_file, file)
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


def yaml_settings(config: dict, file: str) -> tuple[dict, dict]:
    """Split a --config file's keys into ours (as fields, each value checked as its flag would
    be; for ``strip_and_parse``) and SGLang's."""
    ours, theirs = {}, {}
    actions = {a.dest: a for a in flag_parser()._actions}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest != "kv_compression" and not dest.startswith("dynsplit_"):
            theirs[key] = value
            continue
        name = Source("yaml", file).name(as_fields({dest: None}).popitem()[0], value)
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"{name} is not a dynsplit-sglang setting; see --help")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} is invalid; expected true or false")
        elif dest == "dynsplit_config":
            if not isinstance(value, (dict, str)):
                raise ConfigError(f"{name} is invalid; expected a mapping of field: value")
        else:
            value = _yaml_value(action, value, name)
        ours[dest] = value
    return as_fields(ours), theirs


def _yaml_value(action: argparse.Action, value: Any, name: str) -> Any:
    typ = action.type or str
    try:
        if isinstance(value, (bool, list, dict)) or value is None:
            raise ValueError  # one value, as its flag takes (YAML true would pass as 1)
        parsed = typ(str(value))
        if action.choices is not None and parsed not in action.choices:
            raise ValueError
    except ValueError:
        expected = (f"one of {tuple(action.choices)}" if action.choices is not None
                    else f"a single {typ.__name__}")
        raise ConfigError(f"{name} is invalid; expected {expected}") from None
    return parsed
