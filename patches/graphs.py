"""Decode batches that do not fit the compressed decode graph's shapes run eagerly (SGLang 0.5.23).

Hook (sglang.srt.plugins.hook_registry.HookRegistry, AFTER):
``sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph``.
ModelRunner replays a captured decode graph only when this says yes; the DynSplit backend adds its
own condition (``graph_fits``: every request's budget within the graph's capacity, its blocks no
longer than C + Δ, no eviction), so a request the graph cannot serve is never squeezed into it.
Graphs with compression are refused at start-up until verified on a GPU (graph_support.py); this
hook is part of what that verification covers.
"""

from __future__ import annotations

TARGET = ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner."
          "can_run_graph")


def _after_can_run_graph(result, runner, forward_batch, *args, **kwargs):
    fits = getattr(getattr(runner, "attn_backend", None), "graph_fits", None)
    if result and fits is not None:
        return bool(fits(forward_batch))
    return result


def register(registry, hook_type) -> list[str]:
    registry.register(TARGET, _after_can_run_graph, hook_type.AFTER)
    return [TARGET]
