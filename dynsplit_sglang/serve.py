"""``sglang serve --model-type dynsplit``: SGLang's own LLM server, with this plugin loaded first.

Entry point ``sglang.serve_backends`` (SGLang 0.5.23's extension API for ``sglang serve``,
``sglang.cli.serve_backends``). Why it exists: ``sglang serve --help`` prints SGLang's help
before SGLang loads any plugin (``sglang.cli.serve.serve`` returns from its help branch before
``load_plugins()``), so no plugin flag can appear there; ``sglang serve --model-type dynsplit
--help`` loads the plugins first and lists ``--kv-compression`` and every ``--dynsplit-*`` flag.
Serving needs no ``--model-type``: a plain ``sglang serve`` loads the plugins before it parses the
command line. This backend has no detector, so automatic backend selection is unchanged.
"""

from __future__ import annotations


def backend():
    from sglang.cli.serve_backends import SERVE_BACKEND_API_VERSION, ServeBackend

    return ServeBackend(api_version=SERVE_BACKEND_API_VERSION, run=_run)


def _run(request) -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.cli.serve import _run_llm

    _run_llm(request)
