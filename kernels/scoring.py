"""Block scoring: each block's estimated largest q·k, max-reduced over each KV group.

Twin: ``dynsplit_sglang.core.selection.score_blocks`` (same arguments, same result).

Grid (B, Hkv, block tiles): one program loads the center and radius summaries of BLOCK_NB
blocks of one KV head once ([BLOCK_NB, D] each, gathered through summary_index) and loops over
the G query heads of the group, keeping the running max of q·center plus the radius along q
(Σ_d |q_d|·r_d, Quest's bound, or sqrt(Σ_d q_d²·r_d²), the gauss score; per request, from L2):
summaries are read once per KV head, never per query head. Entries with summary_index < 0 score
-inf.

The estimate is evaluated element-wise in fp32 (no tl.dot): a few products per channel, and the
kernel is bound by the summary reads (2·D elements per block and KV head against 4·G·D flops). Tiles: BLOCK_NB = 4096 / D blocks (64 at D = 64, 32 at D = 128), i.e. two
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
    Q, Center, Radius, Index, L2, Out,
    NB,
    stride_qb, stride_qh,
    stride_cm, stride_ch, stride_rm, stride_rh,
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
    c = tl.load(Center + row[:, None] * stride_cm + h * stride_ch + offs_d[None, :], mask=m2,
                other=0.0).to(tl.float32)
    r = tl.load(Radius + row[:, None] * stride_rm + h * stride_rh + offs_d[None, :], mask=m2,
                other=0.0).to(tl.float32)
    use_l2 = tl.load(L2 + b) != 0
    best = tl.full([BLOCK_NB], float("-inf"), tl.float32)
    for g in range(G):
        q = tl.load(Q + b * stride_qb + (h * G + g) * stride_qh + offs_d, mask=mask_d,
                    other=0.0).to(tl.float32)
        along = tl.sum(q[None, :] * c, axis=1)
        rad_l1 = tl.sum(tl.abs(q)[None, :] * r, axis=1)
        rad_l2 = tl.sqrt(tl.sum((q * q)[None, :] * (r * r), axis=1))
        best = tl.maximum(best, along + tl.where(use_l2, rad_l2, rad_l1))
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
    center: torch.Tensor,
    radius: torch.Tensor,
    summary_index: torch.Tensor,
    l2=False,
    *,
    block_nb: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of core.selection.score_blocks: float32 [B, Hkv, NB], -inf where no block.
    l2: one bool for the batch or a bool/int tensor [B] on q's device (graph-capturable)."""
    b, hq, d = q.shape
    hkv = center.shape[1]
    nb = summary_index.shape[1]
    if hq % hkv:
        raise ValueError(f"score_blocks: {hq} query heads not a multiple of {hkv} KV heads")
    for name, t in (("q", q), ("center", center), ("radius", radius),
                    ("summary_index", summary_index)):
        check_last_dim_contiguous(name, t)
    if out is None:
        out = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    if b * nb == 0:
        return out
    if isinstance(l2, torch.Tensor):
        rows_l2 = l2.to(device=q.device, dtype=torch.int32).expand(b).contiguous()
    else:
        rows_l2 = torch.full((b,), int(bool(l2)), dtype=torch.int32, device=q.device)
    block_d = next_pow2(d)
    block_nb = min(block_nb or default_block_nb(d), max(16, next_pow2(nb)))
    _score_kernel[(b, hkv, triton.cdiv(nb, block_nb))](
        q, center, radius, summary_index, rows_l2, out,
        nb,
        q.stride(0), q.stride(1),
        center.stride(0), center.stride(1), radius.stride(0), radius.stride(1),
        summary_index.stride(0), out.stride(0), out.stride(1),
        G=hq // hkv, D=d, BLOCK_D=block_d, BLOCK_NB=block_nb,
        num_warps=4, num_stages=1,
    )
    return out
