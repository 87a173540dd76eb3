"""SGLang plugin entry point (group ``sglang.srt.plugins``, see pyproject.toml).

SGLang 0.5.23's ``sglang.srt.plugins.load_plugins`` calls ``register()`` once in every server
process: main (``launch_server``/``Engine``), each scheduler and the detokenizer. It must stay
cheap: no torch, no sglang import here; hooks are registered by ``dynsplit_sglang.patches``.
"""

import logging
import multiprocessing
import os

from dynsplit_sglang import __version__

logger = logging.getLogger(__name__)

_registered_pid: int | None = None


def _process_name() -> str:
    proc = multiprocessing.current_process()
    if multiprocessing.parent_process() is None:
        return "main"
    # SGLang spawns unnamed Process objects; the target (run_scheduler_process, ...) says more.
    target = getattr(getattr(proc, "_target", None), "__name__", "")
    if target.startswith("run_") and target.endswith("_process"):
        return target[len("run_") : -len("_process")]
    return proc.name


def _log_visible(msg: str, *args) -> None:
    """Log at INFO even before SGLang configures logging.

    ``load_plugins`` runs before ``configure_logger`` in all three processes, so a plain
    ``logger.info`` would be dropped (the root logger has no handler yet and sits at WARNING).
    Then a one-off stderr handler in SGLang's format is used.
    """
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info(msg, *args)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info(msg, *args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def register() -> list[str]:
    """Apply dynsplit-sglang's hooks in this process (idempotent); return their names."""
    global _registered_pid
    from dynsplit_sglang import patches

    applied = patches.apply_all()
    if _registered_pid != os.getpid():
        _registered_pid = os.getpid()
        _log_visible(
            "dynsplit-sglang %s plugin loaded (pid=%d, process=%s, hooks=%d)",
            __version__,
            os.getpid(),
            _process_name(),
            len(applied),
        )
    return applied
