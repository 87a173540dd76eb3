"""Pick the implementation per call: Triton for CUDA tensors, torch for CPU tensors.

``DYNSPLIT_KERNELS`` = ``auto`` (default) | ``triton`` | ``torch`` forces a side, e.g.
``DYNSPLIT_KERNELS=triton TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors (tests).
The torch side is ``kernels.cpu`` (faster CPU formulations, checked against the core's twins in
the tests) ; ``DYNSPLIT_KERNELS=twin`` runs the core twins themselves. Triton is imported only
when a Triton kernel is about to run, so the core and CPU users never pay for it.
"""

from __future__ import annotations

import importlib
import os

import torch

MODES = ("auto", "triton", "torch", "twin")


def backend(t: torch.Tensor) -> str:
    """The side a call on tensor t takes: 'triton', 'torch' or 'twin'."""
    mode = os.environ.get("DYNSPLIT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"DYNSPLIT_KERNELS={mode!r}: expected one of {MODES}")
    if mode == "auto":
        return "triton" if t.is_cuda else "torch"
    return mode


def _triton(module: str):
    return importlib.import_module(f"{__package__}.{module}")


def block_summaries(k_buffer, token_slots, table, out_kmin, out_kmax, out_index, max_block_len,
                    **triton_opts) -> None:
    """Min/max key summaries of every block (see core.mapping.block_summaries)."""
    side = backend(k_buffer)
    if side == "triton":
        return _triton("summaries").block_summaries(
            k_buffer, token_slots, table, out_kmin, out_kmax, out_index, max_block_len,
            **triton_opts)
    from . import cpu
    fn = cpu.block_summaries if side == "torch" else cpu.twins.block_summaries
    return fn(k_buffer, token_slots, table, out_kmin, out_kmax, out_index, max_block_len)


def score_blocks(q, kmin, kmax, summary_index, **triton_opts) -> torch.Tensor:
    """Quest bound per block, max over each KV group (see core.selection.score_blocks)."""
    side = backend(q)
    if side == "triton":
        return _triton("scoring").score_blocks(q, kmin, kmax, summary_index, **triton_opts)
    from . import cpu
    fn = cpu.score_blocks if side == "torch" else cpu.twins.score_blocks
    return fn(q, kmin, kmax, summary_index)


def sparse_decode_attention(q, k_buffer, v_buffer, kv_slots, scale=None, return_lse=False,
                            **triton_opts):
    """Decode attention over per-(request, KV head) slot lists (see
    core.attention.sparse_decode_attention). triton_opts (counts, num_splits, mid, ...) only
    steer the Triton launcher; they never change the result, so the torch side ignores them."""
    side = backend(q)
    if side == "triton":
        return _triton("sparse_decode").sparse_decode_attention(
            q, k_buffer, v_buffer, kv_slots, scale, return_lse, **triton_opts)
    from . import cpu
    fn = cpu.sparse_decode_attention if side == "torch" else cpu.twins.sparse_decode_attention
    return fn(q, k_buffer, v_buffer, kv_slots, scale, return_lse)
