"""Every hook dynsplit-sglang puts into SGLang 0.5.23 (installed as ``dynsplit_sglang.patches``).

One module per SGLang surface; each names the SGLang symbol and version it touches:
``server_args`` (the CLI flags and ``--config`` files), ``engine`` (``sgl.Engine`` keyword
arguments; the settings of every launch), ``admission`` (per-request overrides and prompts
checked when SGLang admits a request: HTTP 400), ``report`` (per-request overrides to the
backend, per-request counters to ``meta_info``, settings to ``/server_info``), ``attention``
(the compressed-decode backend), ``eviction`` (the radix cache that counts freed slots),
``native_extend`` (torch_native's extend attention without its
redundant full-length query, which made radix-cache hits cost a full prefill). ``cpu_host/``
holds the start-up workarounds that let SGLang run on a CPU-only host; they run from a ``.pth``
file, not from here, because SGLang's plugin loader runs too late for them.

SGLang logs and swallows a hook that fails to apply, so ``apply_all`` checks that each one really
did; when KV compression was asked for, a missing hook stops the process with a message instead
of serving uncompressed (at start-up when the command line asks for it, else ``require_all``
where the settings are attached and where the compressed backend is built).
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

_applied: list[str] = []
_missing: list[str] = []
_done = False


def _requested() -> bool:
    from dynsplit_sglang.settings import ENV

    return bool(os.environ.get(ENV)) or any(a.startswith("--kv-compression") for a in sys.argv)


def apply_all() -> list[str]:
    """Register every SGLang hook once per process; return the names of the hooks applied."""
    global _done
    if not _done:
        _done = True
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from . import admission, attention, engine, eviction, native_extend, report, server_args

        targets = server_args.register(HookRegistry, HookType)
        targets += engine.register(HookRegistry, HookType)
        targets += admission.register(HookRegistry, HookType)
        targets += report.register(HookRegistry, HookType)
        HookRegistry.apply_hooks()  # idempotent: load_plugins() applies again, skipping these
        names = attention.register()
        extend = native_extend.register()
        names += extend
        names += eviction.register()
        missing = [t for t in targets if t not in HookRegistry._patched]
        missing += [n for n in attention.WRAPPED if n not in attention.applied()]
        missing += [n for n in extend if not native_extend.applied()]
        missing += [] if eviction.applied() else [eviction.TARGET]
        _missing.extend(missing)
        if missing:
            if _requested():
                raise SystemExit(_missing_message())
            logger.error(_missing_message())
        _applied.extend(t for t in targets + names if t not in missing)
    return list(_applied)


def _missing_message() -> str:
    return f"dynsplit-sglang: hooks did not apply: {_missing} (is this SGLang 0.5.23?)"


def require_all() -> None:
    """Compression is on for this process: every hook must be in place."""
    if _missing:
        raise SystemExit(_missing_message())
