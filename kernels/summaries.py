"""Block summaries: each block's center and radius (core.mapping), written in the K dtype.

Twin: ``dynsplit_sglang.core.mapping.block_summaries`` (same arguments, same result).

Grid (B·NB, channel tiles): one program reads the ≤ max_block_len key rows of one block, gathered
from the pool through the request's token→slot map, over BLOCK_C channels of the flattened
(KV head, head dim) row, and writes both reductions to out_*[out_index[b, j]]. Padding entries
(len 0) and out_index < 0 store nothing (masked stores, no early exit). A pool row is
Hkv·D contiguous elements, so a channel tile spanning several heads stays coalesced.

Tiles: BLOCK_T = 32 tokens per iteration (C + Δ = 20 by default: one iteration), BLOCK_C = 256
channels (a 32 x 256 fp32 pair of running tiles = 64 registers per thread at 4 warps), one
iteration per block for the default geometry, so num_stages = 1 (nothing to pipeline). The
running min, max, sum and sum of squares are fp32; the kernel then writes the box (SPREAD < 0:
(min+max)/2, (max-min)/2) or the gauss summary (mean, SPREAD·sqrt(2 ln n)·std), cast to the K
dtype. The variance is E[k²] - mean² (clamped at 0): a block holds at most C + Δ keys, so the
cancellation is far below the K dtype's own rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_last_dim_contiguous, interpreting, next_pow2


@triton.jit
def _summaries_kernel(
    K, TokenSlots, Starts, Lens, OutIndex, OutCenter, OutRadius,
    NB, T, C, max_len, SPREAD,
    stride_kt, stride_kh,
    stride_tb, stride_sb, stride_lb, stride_ib,
    stride_mm, stride_mh, stride_xm, stride_xh,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NB).to(tl.int64)
    j = pid % NB
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    head = offs_c // D
    chan = offs_c % D
    start = tl.load(Starts + b * stride_sb + j)
    length = tl.load(Lens + b * stride_lb + j)
    dst = tl.load(OutIndex + b * stride_ib + j)
    # Nothing to write: read nothing. Longer than max_block_len: only its first max_block_len
    # keys count, as in the twin (a table that honours its bound never hits this).
    length = tl.where(dst >= 0, tl.minimum(length, max_len), 0)

    lo = tl.full([BLOCK_C], float("inf"), tl.float32)
    hi = tl.full([BLOCK_C], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_C], tl.float32)
    total_sq = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, length, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        inside = (offs_t < length) & (start + offs_t < T)
        slot = tl.load(TokenSlots + b * stride_tb + start + offs_t, mask=inside, other=0)
        k = tl.load(K + slot.to(tl.int64)[:, None] * stride_kt + head[None, :] * stride_kh
                    + chan[None, :], mask=inside[:, None] & mask_c[None, :], other=0.0)
        k = k.to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(inside[:, None], k, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(inside[:, None], k, float("-inf")), axis=0))
        total += tl.sum(k, axis=0)  # masked loads are 0
        total_sq += tl.sum(k * k, axis=0)

    n = tl.maximum(length, 1).to(tl.float32)
    mean = total / n
    std = tl.sqrt(tl.maximum(total_sq / n - mean * mean, 0.0))
    z = tl.sqrt(2.0 * tl.log(tl.maximum(n, 2.0)))
    box = SPREAD < 0
    center = tl.where(box, (lo + hi) * 0.5, mean)
    radius = tl.where(box, (hi - lo) * 0.5, SPREAD * z * std)
    keep = mask_c & (length > 0)
    row = tl.maximum(dst, 0).to(tl.int64)
    tl.store(OutCenter + row * stride_mm + head * stride_mh + chan,
             center.to(OutCenter.dtype.element_ty), mask=keep)
    tl.store(OutRadius + row * stride_xm + head * stride_xh + chan,
             radius.to(OutRadius.dtype.element_ty), mask=keep)


def default_tiles(max_block_len: int, channels: int, interpret: bool | None = None):
    """(BLOCK_T, BLOCK_C): 32 x 256 on a GPU. The interpreter pays per program and per
    iteration, so there it takes whole blocks and rows (tests also run the GPU tiles)."""
    big = interpreting() if interpret is None else interpret
    return (min(next_pow2(max(max_block_len, 1)), 64 if big else 32),
            min(next_pow2(channels), 1024 if big else 256))


def block_summaries(
    k_buffer: torch.Tensor,
    token_slots: torch.Tensor,
    table,
    out_center: torch.Tensor,
    out_radius: torch.Tensor,
    out_index: torch.Tensor,
    max_block_len: int,
    spread: float | None = None,
    *,
    block_t: int | None = None,
    block_c: int | None = None,
) -> None:
    """Triton twin of core.mapping.block_summaries (no host sync: padding is masked in-kernel).

    The loop runs to each block's own length (capped at max_block_len, as in the twin).
    """
    b, nb = table.starts.shape
    _, hkv, d = k_buffer.shape
    if b * nb == 0:
        return
    for name, t in (("k_buffer", k_buffer), ("out_center", out_center),
                    ("out_radius", out_radius)):
        check_last_dim_contiguous(name, t)
    for name, t in (("token_slots", token_slots), ("starts", table.starts),
                    ("lens", table.lens), ("out_index", out_index)):
        check_last_dim_contiguous(name, t)
    c = hkv * d
    dt, dc = default_tiles(max_block_len, c)
    block_t, block_c = block_t or dt, block_c or dc
    _summaries_kernel[(b * nb, triton.cdiv(c, block_c))](
        k_buffer, token_slots, table.starts, table.lens, out_index, out_center, out_radius,
        nb, token_slots.shape[1], c, max_block_len, -1.0 if spread is None else float(spread),
        k_buffer.stride(0), k_buffer.stride(1),
        token_slots.stride(0), table.starts.stride(0), table.lens.stride(0), out_index.stride(0),
        out_center.stride(0), out_center.stride(1), out_radius.stride(0), out_radius.stride(1),
        D=d, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=4, num_stages=1,
    )
