"""Pure-Python stand-in for ``sgl_kernel`` on a CPU host (dynsplit-sglang CPU shim).

SGLang 0.5.23 imports ``sgl_kernel`` ops at module level on its CPU path; serving Llama/Qwen2
never calls them, they only have to import. Any attribute resolves to a stub that raises
``NotImplementedError`` naming the symbol when called. Two ops SGLang's CPU path can really
reach get plain torch versions:

* ``assign_req_to_token_pool_cpu`` (``sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func``)
* ``copy_all_layer_kv_cache_cpu`` (``sglang.kernels.ops.kvcache.cache_move.copy_all_layer_kv_cache_func``)

``SGL_KERNEL_SHIM_VERBOSE=1`` logs the first use of each op. Only put on ``sys.path`` (by
``dynsplit_sglang.patches.cpu_host.boot``) when no real ``sgl_kernel`` is installed.
"""

import logging
import os

IS_DYNSPLIT_SHIM = True

_logger = logging.getLogger("dynsplit_sglang.sgl_kernel_shim")
_verbose = os.environ.get("SGL_KERNEL_SHIM_VERBOSE") == "1"
_seen: set[str] = set()
_stubs: dict[str, object] = {}


def _note_use(qualname: str) -> None:
    if _verbose and qualname not in _seen:
        _seen.add(qualname)
        _logger.warning("sgl_kernel CPU shim: first call of %s (pid %d)", qualname, os.getpid())


def _stub(module: str, name: str):
    qualname = f"{module}.{name}"
    if qualname not in _stubs:

        def stub(*args, **kwargs):
            _note_use(qualname)
            raise NotImplementedError(
                f"{qualname} is not implemented in dynsplit-sglang's CPU shim "
                "(patches/cpu_host/shim); install a real sgl_kernel build for this op"
            )

        stub.__name__ = stub.__qualname__ = name
        stub.__module__ = module
        _stubs[qualname] = stub
    return _stubs[qualname]


def make_module_getattr(module: str):
    """Module-level ``__getattr__`` for the shim and its submodules."""

    def __getattr__(name: str):
        # Dunder lookups (__all__, __version__, __wrapped__, ...) are introspection, not ops.
        if name.startswith("__"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return _stub(module, name)

    return __getattr__


__getattr__ = make_module_getattr(__name__)


def assign_req_to_token_pool_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
):
    """req_to_token[req, start:end] = the next (end - start) entries of out_cache_loc, per request."""
    _note_use(f"{__name__}.assign_req_to_token_pool_cpu")
    offset = 0
    for req, start, end in zip(
        req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()
    ):
        n = end - start
        req_to_token[req, start:end] = out_cache_loc[offset : offset + n]
        offset += n


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every buffer (raw pointer, row stride in bytes): rows[tgt_loc] = rows[src_loc]."""
    import ctypes

    import torch

    _note_use(f"{__name__}.copy_all_layer_kv_cache_cpu")
    if src_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64)
    tgt = tgt_loc.to(torch.int64)
    n_rows = int(torch.maximum(src.max(), tgt.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (n_rows * stride)).from_address(ptr)
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(n_rows, stride)
        rows[tgt] = rows[src]  # the gather on the right is a copy, so overlapping locs are safe
