"""Every hook dynsplit-sglang puts into SGLang 0.5.23 (installed as ``dynsplit_sglang.patches``).

One module per SGLang surface; each names the SGLang symbol and version it touches:
``server_args`` (the CLI flags and ``--config`` files), ``engine`` (``sgl.Engine`` keyword
arguments; the settings of every launch), ``admission`` (per-request overrides and prompts
checked when SGLang admits a request: HTTP 400), ``report`` (per-request overrides to the
backend, per-request counters to ``meta_info``, settings to ``/server_info``), ``attention``
(the compressed-decode backend), ``eviction`` (the radix cache that counts freed slots),
``memory`` (the block store's bytes reserved from the KV budget before the pool is sized),
``graphs`` (decode batches that do not fit the compressed decode graph run eagerly),
``native_extend`` (torch_native's extend attention without its redundant full-length query,
which made radix-cache hits cost a full prefill). ``cpu_host/``
holds the start-up workarounds that let SGLang run on a CPU-only host; they run from a ``.pth``
file, not from here, because SGLang's plugin loader runs too late for them.

SGLang logs and swallows a hook that fails to apply, so ``apply_all`` checks that each one really
did; when KV compression was asked for, a missing hook (or an SGLang outside the range
pyproject.toml declares) stops the process with a message instead of serving uncompressed (at start-up when the command line asks for it, else ``require_all``
where the settings are attached and where the compressed backend is built).
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

_applied: list[str] = []
_problems: list[str] = []  # why this process cannot compress (hooks missing, another SGLang)
_done = False


def _requested() -> bool:
    from dynsplit_sglang.settings import ENV

    return bool(os.environ.get(ENV)) or any(a.startswith("--kv-compression") for a in sys.argv)


def sglang_version_problem() -> str | None:
    """Why this SGLang is outside the range pyproject.toml declares, or None."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        wanted = [Requirement(r) for r in requires("dynsplit-sglang") or []]
        have = version("sglang")
    except PackageNotFoundError:
        return None  # not installed as a distribution (a source checkout on sys.path)
    spec = next((r.specifier for r in wanted if r.name == "sglang"), None)
    if spec is None or spec.contains(have, prereleases=True):
        return None
    return f"dynsplit-sglang supports sglang{spec}, this is sglang {have}"


def apply_all() -> list[str]:
    """Register every SGLang hook once per process; return the names of the hooks applied."""
    global _done
    if not _done:
        _done = True
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from . import (admission, attention, engine, eviction, graphs, memory, native_extend,
                       report, server_args)

        targets = server_args.register(HookRegistry, HookType)
        targets += engine.register(HookRegistry, HookType)
        targets += admission.register(HookRegistry, HookType)
        targets += report.register(HookRegistry, HookType)
        targets += memory.register(HookRegistry, HookType)
        targets += graphs.register(HookRegistry, HookType)
        HookRegistry.apply_hooks()  # idempotent: load_plugins() applies again, skipping these
        names = attention.register()
        extend = native_extend.register()
        names += extend
        names += eviction.register()
        missing = [t for t in targets if t not in HookRegistry._patched]
        missing += [n for n in attention.WRAPPED if n not in attention.applied()]
        missing += [n for n in extend if not native_extend.applied()]
        missing += [] if eviction.applied() else [eviction.TARGET]
        if missing:
            _problems.append(f"hooks did not apply: {missing} (is this SGLang 0.5.23?)")
        _problems.extend(p for p in [sglang_version_problem()] if p)
        if _problems:
            if _requested():
                raise SystemExit(_problem_message())
            logger.error(_problem_message())
        _applied.extend(t for t in targets + names if t not in missing)
    return list(_applied)


def _problem_message() -> str:
    return "dynsplit-sglang: " + "; ".join(_problems)


def require_all() -> None:
    """Compression is on for this process: every hook must be in place, under the SGLang
    version pyproject.toml declares."""
    if _problems:
        raise SystemExit(_problem_message())
