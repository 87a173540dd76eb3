"""The block store's bytes come out of SGLang's KV budget (SGLang 0.5.23).

Hook (sglang.srt.plugins.hook_registry.HookRegistry, AROUND):
``sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget``. SGLang
sizes the token pool there, before the pool is allocated: ``_resolve_memory_pool_config`` hands
it the profiled budget (``_profile_available_bytes``, i.e. what ``--mem-fraction-static`` leaves)
and it returns ``max_total_num_tokens`` after ``--max-total-tokens`` and page alignment. With
compression on, the hook asks the original for the dense answer D, then for the largest token
count T whose K/V plus the block store for a pool of T tokens fit in D tokens' K/V:

    T * cell + StoreGeometry(T + page_size slots, rows, context).nbytes <= D * cell

(``cell``: ``DefaultPoolConfigurator._cell_size``, K/V bytes per token; ``rows``:
``resolve_max_num_reqs(D) + 1``, an upper bound on the request rows the store is sized for, since
fewer tokens never mean more rows). So the store is reserved from the same budget whether the
profiler or ``--max-total-tokens`` bounds it, and ``max_total_num_tokens`` is what the pool
really holds next to its store. The answer is logged and kept in ``PLAN`` for the compressor's
report.
"""

from __future__ import annotations

import logging

from dynsplit_sglang.runtime import hooks

logger = logging.getLogger(__name__)

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget"
# This process's last sizing: dense/compressed tokens, cell and store bytes (the runtime reads
# it through its hooks).
PLAN: dict = hooks.memory_plan


def tokens_with_store(dense_tokens: int, cell: int, page: int, store_bytes) -> int:
    """Largest multiple of `page` T <= dense_tokens with T*cell + store_bytes(T) <= dense_tokens*cell
    (store_bytes is non-decreasing in T)."""
    budget = dense_tokens * cell
    lo, hi = 0, dense_tokens // page
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * page * cell + store_bytes(mid * page) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * page


def _max_context(kvc) -> int:
    """req_to_token's width (``_build_default_req_pool``)."""
    from sglang.srt.mem_cache.allocation_sizing import get_req_to_token_extra_context_len

    return kvc.model_config.context_len + get_req_to_token_extra_context_len()


def _geometry_for(kvc, settings, tokens: int, rows: int):
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    return _geometry(settings, kvc.layer_info.num_effective_layers,
                     kvc.model_config.get_num_kv_heads(par.attn_tp_size, par.attn_dcp_size),
                     kvc.model_config.head_dim, kvc.kv_cache_dtype.itemsize,
                     tokens + kvc.pool_page_size,  # the K buffer has page_size padding rows
                     rows, _max_context(kvc))


def _geometry(settings, layers, kv_heads, head_dim, dtype_size, slots, rows, max_context):
    from dynsplit_sglang.runtime.store import StoreGeometry

    return StoreGeometry.for_pool(settings.config, num_layers=layers, kv_heads=kv_heads,
                                  head_dim=head_dim, dtype_size=dtype_size, num_slots=slots,
                                  max_rows=rows, max_context=max_context)


def _too_small(pool: str, need: int, rows: int):
    from dynsplit_sglang.core import ConfigError

    return ConfigError(f"{pool} cannot hold the block store ({need} B for {rows - 1} request "
                       "rows) next to any token; raise --mem-fraction-static or "
                       "--max-total-tokens, or lower --max-running-requests")


def check_before_start(settings, sa, model_config) -> None:
    """The late check below, run in the launching process before anything starts, where the
    pool's size is known (--max-total-tokens bounds it): a pool too small for the block store
    is then one line naming the flag, not a scheduler's traceback. Mirrors SGLang 0.5.23's
    ``resolve_max_num_reqs`` (the rows) and ``_cell_size`` for MHA (K and V per layer); a pool
    the profiler makes smaller is still caught by the late check."""
    dense = getattr(sa, "max_total_tokens", None)
    if not settings.enabled or not dense or not getattr(model_config, "context_len", None):
        return
    import torch

    dp = max(1, getattr(sa, "attn_dp_size", 1) or 1)
    asked = getattr(sa, "max_running_requests", None)
    estimated = max(min(int(dense / model_config.context_len * 512), 4096), 2048)
    rows = min(max(1, asked // dp) if asked else estimated, dense // 2) + 1
    kv = getattr(sa, "kv_cache_dtype", "auto")
    dtype = model_config.dtype if kv in (None, "auto") else getattr(torch, kv, model_config.dtype)
    layers, size = model_config.num_hidden_layers, dtype.itemsize
    heads = model_config.get_num_kv_heads(max(1, (getattr(sa, "tp_size", 1) or 1) // dp))
    cell = 2 * layers * heads * model_config.head_dim * size

    def store_bytes(tokens: int) -> int:
        # + 4: req_to_token's headroom without speculative decoding (refused with compression)
        return _geometry(settings, layers, heads, model_config.head_dim, size, tokens + 1, rows,
                         model_config.context_len + 4).nbytes

    if tokens_with_store(dense, cell, 1, store_bytes) <= 0:
        raise _too_small(f"--max-total-tokens {dense} ({dense * cell} B of KV with "
                         "--kv-compression)", store_bytes(1), rows)


def _around_config_from_budget(original, self, budget_bytes, *args, **kwargs):
    config = original(self, budget_bytes, *args, **kwargs)
    from dynsplit_sglang.settings import Settings

    settings = Settings.of(self.server_args)  # what travelled with the ServerArgs
    if not settings.enabled or self.is_draft_worker:
        return config
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator

    dense = config.max_total_num_tokens
    cell = create_memory_pool_configurator(self)._cell_size
    rows = self.resolve_max_num_reqs(dense) + 1  # ReqToTokenPool holds size + 1 rows
    page = self.pool_page_size
    tokens = tokens_with_store(dense, cell, page,
                               lambda t: _geometry_for(self, settings, t, rows).nbytes)
    if tokens <= 0:
        raise _too_small(f"--kv-compression: the KV budget of {dense} tokens ({dense * cell} B)",
                         _geometry_for(self, settings, page, rows).nbytes, rows)
    if tokens < dense:
        cap = kwargs.pop("cap_tokens", None)
        kwargs["cap_tokens"] = tokens if cap is None else min(cap, tokens)
        config = original(self, budget_bytes, *args, **kwargs)
    store = _geometry_for(self, settings, config.max_total_num_tokens, rows).nbytes
    PLAN.update(dense_max_total_num_tokens=dense, max_total_num_tokens=config.max_total_num_tokens,
                kv_cell_bytes=cell, store_bytes_reserved=store, store_rows_reserved=rows,
                store_max_context=_max_context(self))
    logger.info("dynsplit-sglang: KV budget of %d dense tokens (%d B each) holds %d tokens and "
                "the block store (%.1f MiB for %d rows)", dense, cell,
                config.max_total_num_tokens, store / 2**20, rows)
    return config


def register(registry, hook_type) -> list[str]:
    registry.register(TARGET, _around_config_from_budget, hook_type.AROUND)
    return [TARGET]
