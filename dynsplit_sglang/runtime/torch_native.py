"""SGLang's ``torch_native`` attention backend with DynSplit-KV compressed decode.

Prefill stays SGLang's dense attention; its queries also vote on delimiter importance. Decode of
every compressed layer attends to sink + selected blocks + recent window through the kernels'
plan/run wrapper (the torch twins on CPU). Written against SGLang 0.5.23's
``TorchNativeAttnBackend`` (forward_extend / forward_decode / init_forward_metadata).
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..core import ConfigError
from ..settings import Settings
from .batch import build_compressor, view_of

logger = logging.getLogger(__name__)


class DynSplitTorchNativeBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner, settings: Settings):
        super().__init__(model_runner)
        self.compressor = build_compressor(model_runner, settings)
        self.last_layer = self.compressor.num_layers - 1

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        view = view_of(forward_batch, self.req_to_token_pool, self.compressor.cfg)
        if view is not None:
            self.compressor.begin_forward(view)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if forward_batch.forward_mode.is_extend() and not layer.is_cross_attention:
            q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
            k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            self.compressor.extend_layer(layer.layer_id, q_, k_buf, layer.scaling)
            if layer.layer_id == self.last_layer:
                self.compressor.end_extend()
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if layer.is_cross_attention or not self.compressor.is_sparse_layer(layer.layer_id):
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self.compressor.decode_layer(
            layer.layer_id,
            q_,
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            layer.scaling,
        )
        return out.reshape(q_.shape[0], layer.tp_q_head_num * layer.v_head_dim)


def check_model(model_runner) -> None:
    """Fail at start-up for model families the block store cannot describe."""
    cfg = model_runner.model_config
    arch = getattr(cfg, "attention_arch", None)
    if arch is not None and getattr(arch, "name", str(arch)) != "MHA":
        raise ConfigError(f"--kv-compression: attention architecture {arch} (MLA/DSA) is not "
                          "supported; use a model with multi-head or grouped-query attention")
    if getattr(cfg, "is_hybrid_swa", False) or getattr(cfg, "is_hybrid", False):
        raise ConfigError("--kv-compression: hybrid (sliding-window or linear) attention models "
                          "are not supported")
