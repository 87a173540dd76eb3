"""The registry of strategies: the one list that the config, the runtime, the HF reference, the
settings and the tests iterate over.

Adding a strategy to the package: one file in this folder defining a ``Strategy`` subclass, plus
its line in ``BUILT_IN`` below (docs/design.md, "Adding a strategy"). A strategy kept outside the
package (a test's, a user's) calls ``register`` when its module is imported; ``load`` imports
such a module in this process and, through ``DYNSPLIT_STRATEGIES``, in every process started from
it afterwards: an SGLang server's schedulers then accept its name like a built-in one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .base import Strategy
from .delimiter import Delimiter
from .dynsplit import DynSplit
from .fixed import Fixed
from .streaming import Streaming

ENV = "DYNSPLIT_STRATEGIES"  # comma-separated module names or .py paths, loaded by `load_env`

STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Make `strategy` known under its name (once; a second, different one is an error)."""
    name = getattr(strategy, "name", None)
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError(f"strategy {strategy!r}: needs a name other than 'none'")
    known = STRATEGIES.get(name)
    if known is not None and type(known) is not type(strategy):
        raise ValueError(f"strategy {name!r} is already registered ({type(known).__name__})")
    STRATEGIES[name] = strategy
    return strategy


BUILT_IN = (
    DynSplit(),
    Fixed(),
    Delimiter(),
    Streaming(),
)
for _strategy in BUILT_IN:
    register(_strategy)

_loaded: set[str] = set()


def load(*modules: str) -> None:
    """Import these strategy modules (dotted names or paths of .py files) here, and have every
    process started from here later import them too."""
    for spec in modules:
        spec = str(Path(spec).resolve()) if spec.endswith(".py") else spec
        if spec not in _loaded:
            _import(spec)
            _loaded.add(spec)
        listed = [s for s in os.environ.get(ENV, "").split(",") if s]
        if spec not in listed:
            os.environ[ENV] = ",".join(listed + [spec])


def load_env() -> None:
    """Import the strategy modules named in DYNSPLIT_STRATEGIES (a no-op when unset)."""
    load(*[s for s in os.environ.get(ENV, "").split(",") if s])


def _import(spec: str) -> None:
    if not spec.endswith(".py"):
        importlib.import_module(spec)
        return
    name = f"dynsplit_strategy_{Path(spec).stem}"
    found = importlib.util.spec_from_file_location(name, spec)
    if found is None or found.loader is None:
        raise ImportError(f"{ENV}: cannot load {spec}")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    found.loader.exec_module(module)


__all__ = ["BUILT_IN", "ENV", "STRATEGIES", "Strategy", "load", "load_env", "register"]
