"""Block scoring: Quest's upper bound of q·k per block, max-reduced over each KV group.

Twin: ``dynsplit_sglang.core.selection.score_blocks`` (same arguments, same result).

Grid (B, Hkv, block tiles): one program loads the min and max summaries of BLOCK_NB blocks of
one KV head once ([BLOCK_NB, D] each, gathered through summary_index) and loops over the G query
heads of the group, keeping the running max of Σ_d max(q_d·kmax_d, q_d·kmin_d): summaries are
read once per KV head, never per query head. Entries with summary_index < 0 score -inf.

The bound is evaluated element-wise in fp32 (no tl.dot): it is a max of two products per channel,
not a matmul, and the kernel is bound by the summary reads (2·D elements per block and KV head
against 3·G·D flops). Tiles: BLOCK_NB = 4096 / D blocks (64 at D = 64, 32 at D = 128), i.e. two
fp32 tiles of 4 K elements = 64 registers per thread at num_warps = 4; one tile per program, no
loop over memory, so num_stages = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_last_dim_contiguous, interpreting, next_pow2


@triton.jit
def _score_kernel(
    Q, KMin, KMax, Index, Out,
    NB,
    stride_qb, stride_qh,
    stride_mm, stride_mh, stride_xm, stride_xh,
    stride_ib, stride_ob, stride_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_j = tl.program_id(2) * BLOCK_NB + tl.arange(0, BLOCK_NB)
    offs_d = tl.arange(0, BLOCK_D)
    mask_j = offs_j < NB
    mask_d = offs_d < D
    idx = tl.load(Index + b * stride_ib + offs_j, mask=mask_j, other=-1)
    valid = idx >= 0
    row = tl.where(valid, idx, 0).to(tl.int64)
    m2 = valid[:, None] & mask_d[None, :]
    lo = tl.load(KMin + row[:, None] * stride_mm + h * stride_mh + offs_d[None, :], mask=m2,
                 other=0.0).to(tl.float32)
    hi = tl.load(KMax + row[:, None] * stride_xm + h * stride_xh + offs_d[None, :], mask=m2,
                 other=0.0).to(tl.float32)
    best = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    for g in range(G):
        q = tl.load(Q + b * stride_qb + (h * G + g) * stride_qh + offs_d, mask=mask_d,
                    other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * hi, q[None, :] * lo), axis=1)
        best = tl.maximum(best, bound)
    best = tl.where(valid, best, float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_j, best, mask=mask_j)


def default_block_nb(head_dim: int, interpret: bool | None = None) -> int:
    """Blocks per program: 4096 / D on a GPU (two 4 K-element fp32 tiles); 128 under the
    interpreter, whose cost is per program (tests also run the GPU tiles explicitly)."""
    if (interpreting() if interpret is None else interpret):
        return 128
    return max(16, 4096 // next_pow2(head_dim))


def score_blocks(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    summary_index: torch.Tensor,
    *,
    block_nb: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of core.selection.score_blocks: float32 [B, Hkv, NB], -inf where no block."""
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    nb = summary_index.shape[1]
    if hq % hkv:
        raise ValueError(f"score_blocks: {hq} query heads not a multiple of {hkv} KV heads")
    for name, t in (("q", q), ("kmin", kmin), ("kmax", kmax), ("summary_index", summary_index)):
        check_last_dim_contiguous(name, t)
    if out is None:
        out = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    if b * nb == 0:
        return out
    block_d = next_pow2(d)
    block_nb = min(block_nb or default_block_nb(d), max(16, next_pow2(nb)))
    _score_kernel[(b, hkv, triton.cdiv(nb, block_nb))](
        q, kmin, kmax, summary_index, out,
        nb,
        q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1), kmax.stride(0), kmax.stride(1),
        summary_index.stride(0), out.stride(0), out.stride(1),
        G=hq // hkv, D=d, BLOCK_D=block_d, BLOCK_NB=block_nb,
        num_warps=4, num_stages=1,
    )
    return out
