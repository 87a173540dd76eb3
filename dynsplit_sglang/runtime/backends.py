"""SGLang's own attention backends with DynSplit-KV compressed decode.

Prefill (every extend, one token over a cached prompt included) stays the backend's dense
attention, so the first answer token comes from it; its queries also vote on delimiter
importance.
Decode of every compressed layer attends to sink + selected blocks + recent window through the
kernels' plan/run wrapper (Triton kernels on CUDA tensors, the core's torch twins on CPU ones).
Written against SGLang 0.5.23's backend interface (``init_forward_metadata``, ``forward_extend``,
``forward_decode``, and for decode graphs ``init_cuda_graph_state`` /
``init_forward_metadata_out_graph``; 0.5.23 removed the older
``init_forward_metadata_capture/replay_cuda_graph``); the backends it extends are those of
``settings.SUPPORTED_BACKENDS``. Graphs with compression are refused at start-up until verified
on a GPU (graph_support.py).
"""

from __future__ import annotations

import functools
import importlib

from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..settings import SUPPORTED_BACKENDS, Settings
from .batch import account_forward, build_compressor, graph_view_of, host_field, view_of
from .graphs import GraphDecode


class _DynSplitMixin:
    """Put in front of an SGLang backend class; the backend keeps its dense paths."""

    def __init__(self, model_runner, settings: Settings):
        super().__init__(model_runner)
        self.compressor = build_compressor(model_runner, settings)
        self.last_layer = self.compressor.num_layers - 1
        self._pool = model_runner.token_to_kv_pool
        self._rows = model_runner.req_to_token_pool
        self._graph: GraphDecode | None = None  # set when SGLang prepares decode graphs
        self._eager = False

    def init_forward_metadata(self, forward_batch):
        if self._graph is not None:
            self._graph.active = False
        self._eager = True  # a parent's eager path may go through our _out_graph: not a graph
        try:
            super().init_forward_metadata(forward_batch)
        finally:
            self._eager = False
        view = view_of(forward_batch, self._rows, self.compressor.cfg)
        if view is not None:
            self.compressor.begin_forward(view)

    # -- SGLang 0.5.23's decode graphs (decode_cuda_graph_runner.py) ------------------------------

    def init_cuda_graph_state(self, max_bs, max_num_tokens, *args, **kwargs):
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        self._graph = GraphDecode(self.compressor, max_bs)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
        """Before capture (in_capture) and before every replay, outside the graph."""
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if self._eager or self._graph is None or not forward_batch.forward_mode.is_decode():
            return
        if in_capture:
            self._graph.capture(forward_batch.batch_size)
        else:
            self._graph.replay(graph_view_of(forward_batch, self._rows), forward_batch.batch_size)

    def graph_fits(self, forward_batch) -> bool:
        """Whether a decode batch fits the captured shapes; SGLang runs it eagerly otherwise."""
        if self._graph is None:
            return True
        ok = self._graph.fits(host_field(forward_batch, "req_pool_indices").tolist(),
                              host_field(forward_batch, "seq_lens").tolist())
        if not ok:
            self.compressor.stats["graph_eager_steps"] += 1
        return ok

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        # Dense, also for one token over a cached prompt: the first answer token always comes
        # from the prefill, so a request answers alike cached or not (docs/design.md).
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        if forward_batch.forward_mode.is_extend() and not layer.is_cross_attention:
            q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            k_buf = self._pool.get_key_buffer(layer.layer_id)
            self.compressor.extend_layer(layer.layer_id, q_, k_buf, layer.scaling)
            if layer.layer_id == self.last_layer:
                self.compressor.end_extend()
                account_forward(self.compressor, forward_batch)
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        out = self._forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        if layer.layer_id == self.last_layer:
            account_forward(self.compressor, forward_batch)
        return out

    def _forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        graph = self._graph is not None and self._graph.active
        comp = self.compressor
        sparse = (layer.layer_id >= comp.first_compressed if graph
                  else comp.is_sparse_layer(layer.layer_id))
        if layer.is_cross_attention or not sparse:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kw)
        return self._compressed(q, k, v, layer, forward_batch, save_kv_cache, graph)

    def _compressed(self, q, k, v, layer, forward_batch, save_kv_cache, graph=False):
        """One new token per request: write its K/V, attend through the compressor (or, inside
        a captured decode graph, through its persistent plan)."""
        if save_kv_cache and k is not None and v is not None:
            self._pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        attend = self._graph.decode_layer if graph else self.compressor.decode_layer
        out = attend(
            layer.layer_id,
            q_,
            self._pool.get_key_buffer(layer.layer_id),
            self._pool.get_value_buffer(layer.layer_id),
            layer.scaling,
        )
        return out.reshape(q_.shape[0], layer.tp_q_head_num * layer.v_head_dim)


@functools.lru_cache(maxsize=None)
def backend_class(name: str) -> type:
    """SGLang's attention backend `name` (a key of SUPPORTED_BACKENDS) with compressed decode."""
    module, _, cls = SUPPORTED_BACKENDS[name].rpartition(".")
    base = getattr(importlib.import_module(module), cls)
    return type(f"DynSplit{base.__name__}", (_DynSplitMixin, base), {"__module__": __name__})

