"""Sparse decode attention over per-(request, KV head) slot lists: split-KV flash-decoding.

Twin: ``dynsplit_sglang.core.attention.sparse_decode_attention`` (same arguments, same result).

Stage 1, grid (B, Hkv, splits): one program takes one KV head of one request and one contiguous
chunk of its slot list, and serves *all G query heads of the group at once*: the G query rows
are padded to BLOCK_G = max(16, next_pow2(G)) and both products are ``tl.dot`` calls
([BLOCK_G, D] x [D, BLOCK_N] and [BLOCK_G, BLOCK_N] x [BLOCK_N, Dv]). Each K/V row is gathered
from the pool once per KV head (never repeated per query head), straight through the slot list
(no gathered copy). 16 is the smallest M of an MMA tile on sm_80/sm_90; the padded rows cost
tensor-core FLOPs only, which decode (memory-bound) has to spare. The alternative, a broadcast
multiply + sum, needs a [G, BLOCK_N, D] register tile and is only better for G = 1, where the
padded dot still saturates bandwidth, so one code path serves every ratio. Online softmax in
fp32 with exp2 (scale·log2 e folded into the logits); the split writes its normalised partial
output and its log-sum-exp.

Stage 2, grid (B, Hq): merges the splits with their LSEs (weights exp(lse_s - max)), writes the
output in q's dtype and, if asked, the natural-log LSE. A head whose list has no valid slot
gets zeros and LSE -inf, like the twin.

Tile choices (sm_80 / sm_90, fp16/bf16 KV):
* BLOCK_N = 64 keys per iteration for D <= 128 (a 16 KiB K tile + 16 KiB V tile in bf16),
  32 for larger heads so the tiles stay in registers/shared memory without spills.
* num_warps = 4: a 16 x 64 score tile and a 16 x 128 fp32 accumulator is 2 K elements per
  warp-group; more warps would only split an already small MMA.
* num_stages = 2: double-buffers the gathered K/V loads (cp.async on sm_80, the same pipeliner
  on sm_90; indirect addresses rule out TMA). Deeper pipelines buy nothing for a 2-load loop and
  cost shared memory that limits CTAs per SM.
* fp32 inputs use an IEEE fp32 dot (the twin is exact fp32; TF32 would lose accuracy).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_last_dim_contiguous, dot_in_fp32, interpreting, next_pow2, sm_count

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MAX_SPLITS = 32  # fixed upper bound: workspace shapes stay static (CUDA graphs)
WAVES = 2  # aim for ~2 programs per SM (latency hiding; see docs/kernels.md)


@triton.jit
def _split_kernel(
    Q, K, V, Slots, Counts, MidO, MidLse,
    qk_scale_log2,
    N, tokens_per_split,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_sb, stride_sh, stride_sn,
    stride_cb, stride_ch,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_COUNTS: tl.constexpr, DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    b64 = b.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_g = offs_g < G
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    heads = h * G + offs_g

    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(K.dtype.element_ty)

    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    if HAS_COUNTS:
        # Entries past the count are padding: stop early instead of loading masked tiles.
        end = tl.minimum(end, tl.load(Counts + b64 * stride_cb + h * stride_ch).to(tl.int32))

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    slot_row = Slots + b64 * stride_sb + h * stride_sh
    k_head = K + h * stride_kh
    v_head = V + h * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        slot = tl.load(slot_row + offs_n * stride_sn, mask=offs_n < end, other=-1)
        valid = slot >= 0
        row = tl.where(valid, slot, 0).to(tl.int64)
        # K loaded transposed ([D, BLOCK_N]) so the dot needs no in-register transpose.
        k = tl.load(k_head + row[None, :] * stride_kt + offs_d[:, None],
                    mask=valid[None, :] & mask_d[:, None], other=0.0)
        if DOT_F32:
            qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = tl.where(valid[None, :], qk * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: no NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + row[:, None] * stride_vt + offs_dv[None, :],
                    mask=valid[:, None] & mask_dv[None, :], other=0.0)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptr = MidO + b64 * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_dv[None, :]
    tl.store(o_ptr, out, mask=mask_g[:, None] & mask_dv[None, :])
    tl.store(MidLse + b64 * stride_lb + heads * stride_lh + s, lse, mask=mask_g)


@triton.jit
def _merge_kernel(
    MidO, MidLse, Out, Lse,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    stride_lseb, stride_lseh,
    SPLITS: tl.constexpr, DV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, STORE_LSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_s = offs_s < SPLITS
    mask_dv = offs_dv < DV
    lse = tl.load(MidLse + b * stride_lb + hq * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_use)  # 0 for empty splits
    den = tl.sum(w, axis=0)
    o = tl.load(MidO + b * stride_ob + hq * stride_oh + offs_s[:, None] * stride_os
                + offs_dv[None, :], mask=mask_s[:, None] & mask_dv[None, :], other=0.0)
    num = tl.sum(w[:, None] * o, axis=0)
    out = tl.where(den > 0.0, num / tl.where(den > 0.0, den, 1.0), 0.0)
    tl.store(Out + b * stride_outb + hq * stride_outh + offs_dv,
             out.to(Out.dtype.element_ty), mask=mask_dv)
    if STORE_LSE:
        tl.store(Lse + b * stride_lseb + hq * stride_lseh,
                 tl.where(den > 0.0, m_use + tl.log(tl.where(den > 0.0, den, 1.0)),
                          float("-inf")))


def default_block_n(head_dim: int, interpret: bool | None = None) -> int:
    """Keys per iteration: 64 (32 above head_dim 128) on a GPU; 128 under the interpreter,
    whose cost is per loop iteration (tests also run the GPU tiles explicitly)."""
    if (interpreting() if interpret is None else interpret):
        return 128
    return 64 if head_dim <= 128 else 32


def num_kv_splits(batch: int, kv_heads: int, n_slots: int, device: torch.device,
                  block_n: int = 64, max_splits: int = MAX_SPLITS) -> int:
    """Flash-decoding split count, from host-known shapes only (no device read).

    Enough (request x KV head x split) programs for WAVES programs per SM, but never splits
    shorter than two BLOCK_N tiles (below that the merge traffic — G x Dv fp32 per split —
    stops being small next to the K/V a split reads) and never more than max_splits (fixed, so
    the workspace has a static shape).
    """
    want = math.ceil(WAVES * sm_count(device) / max(batch * kv_heads, 1))
    longest = math.ceil(max(n_slots, 1) / (2 * block_n))
    return max(1, min(want, longest, max_splits))


def workspace(batch: int, q_heads: int, splits: int, head_dim_v: int, device) -> tuple:
    """Split outputs [B, Hq, splits, Dv] and LSEs [B, Hq, splits], fp32."""
    return (torch.empty(batch, q_heads, splits, head_dim_v, dtype=torch.float32, device=device),
            torch.empty(batch, q_heads, splits, dtype=torch.float32, device=device))


def sparse_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_slots: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    counts: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    mid: tuple | None = None,
    out: torch.Tensor | None = None,
):
    """Triton twin of core.attention.sparse_decode_attention.

    Extra keyword arguments (all optional, none changes the result):
    counts [B, Hkv]: entries of kv_slots past counts[b, h] are padding (lets a program stop
    early); num_splits / block_n: override the heuristics; mid: preallocated workspace from
    :func:`workspace` (its split dimension sets num_splits); out: preallocated [B, Hq, Dv].
    """
    b, hq, d = q.shape
    hkv, dv = k_buffer.shape[1], v_buffer.shape[2]
    n = kv_slots.shape[2]
    if b == 0:
        empty = torch.empty(0, hq, dv, dtype=q.dtype, device=q.device)
        return (empty, torch.empty(0, hq, device=q.device)) if return_lse else empty
    if hq % hkv:
        raise ValueError(f"sparse_decode_attention: {hq} query heads not a multiple of {hkv} KV heads")
    if kv_slots.shape[:2] != (b, hkv):
        raise ValueError(f"sparse_decode_attention: kv_slots {tuple(kv_slots.shape)} != ({b}, {hkv}, N)")
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        check_last_dim_contiguous(name, t)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_n = block_n or default_block_n(max(d, dv))
    if mid is not None:
        num_splits = mid[1].shape[2]
    elif num_splits is None:
        num_splits = num_kv_splits(b, hkv, n, q.device, block_n)
    # Chunk per split: a whole number of tiles, so only the last tile of a split is partial.
    per_split = max(math.ceil(math.ceil(max(n, 1) / num_splits) / block_n), 1) * block_n
    mid_o, mid_lse = mid if mid is not None else workspace(b, hq, num_splits, dv, q.device)
    out = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device) if return_lse else mid_lse

    cnt = counts if counts is not None else kv_slots  # dummy pointer when unused
    cstride = (counts.stride(0), counts.stride(1)) if counts is not None else (0, 0)
    _split_kernel[(b, hkv, num_splits)](
        q, k_buffer, v_buffer, kv_slots, cnt, mid_o, mid_lse,
        scale * LOG2E, n, per_split,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        kv_slots.stride(0), kv_slots.stride(1), kv_slots.stride(2),
        cstride[0], cstride[1],
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        G=g, D=d, DV=dv,
        BLOCK_G=max(16, next_pow2(g)), BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(dv),
        BLOCK_N=block_n, HAS_COUNTS=counts is not None,
        DOT_F32=dot_in_fp32(q.dtype, k_buffer.dtype, v_buffer.dtype),
        num_warps=4, num_stages=2,
    )
    _merge_kernel[(b, hq)](
        mid_o, mid_lse, out, lse,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1) if lse.dim() > 1 else 0,
        SPLITS=num_splits, DV=dv, BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_DV=next_pow2(dv),
        STORE_LSE=return_lse,
        # One [splits, Dv] fp32 tile per program: tiny, one warp-group is plenty.
        num_warps=4 if dv >= 128 else 2, num_stages=1,
    )
    return (out, lse) if return_lse else out
