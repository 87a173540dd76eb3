"""CPU formulations of scoring and sparse decode: same results as the core twins, fewer bytes.

The core twins are written for clarity; on a CPU their temporaries dominate (the twin scorer
materialises two [B, NB, Hkv, G, D] products, the twin attention gathers K/V element-wise with
two index tensors). These versions do the same maths as BLAS calls on row gathers:

* Scoring: q·center + |q|·radius (L1) or sqrt(q²·radius²) (L2) is two batched matmuls
  [G, D] x [D, NB] per (request, KV head) on the gathered summary rows (the squares of q and of
  the radius are taken on the gathered chunk), then a max over the G query heads.
* Attention: one index_select of whole (slot, KV head) K rows of the pool and a batched matmul
  for the logits, a masked fp32 softmax, then P @ V as weighted embedding bags read straight
  from the V pool (fp32) — no element-wise [B, Hkv, N] x [B, Hkv] gather, no V copy.
* Selection: a top-k over exact integer keys instead of a full stable sort (see select).

Tests check both against the twins; anything these do not cover falls back to the twin.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dynsplit_sglang.core import attention as _attention
from dynsplit_sglang.core import mapping as _mapping
from dynsplit_sglang.core import selection as _selection

twins = SimpleNamespace(
    block_summaries=_mapping.block_summaries,
    score_blocks=_selection.score_blocks,
    sparse_decode_attention=_attention.sparse_decode_attention,
)

# Summaries are built once per block at prefill / block freeze, off the per-step path: the twin
# (one gather + two reductions) is already bandwidth-bound there.
block_summaries = _mapping.block_summaries


# Gathered rows are consumed in chunks of about this many bytes, so that the matmul re-reads
# them from L2 instead of DRAM (1-2 MiB of L2 per core on current x86 servers); measured at 32k
# tokens, 8 KV heads, d128, cold caches, one thread: scoring 1.9 ms instead of 9.9 ms.
CHUNK_BYTES = 2 << 20


def _chunk(n: int, bytes_per_item: int) -> int:
    return max(64, min(n, CHUNK_BYTES // max(bytes_per_item, 1)))


def score_blocks(q, center, radius, summary_index, l2=False):
    """Same as core.selection.score_blocks (float32 [B, Hkv, NB], -inf where no block)."""
    b, hq, d = q.shape
    hkv = center.shape[1]
    g = hq // hkv
    nb = summary_index.shape[1]
    if not (center.is_contiguous() and radius.is_contiguous()):
        return twins.score_blocks(q, center, radius, summary_index, l2)
    valid = summary_index >= 0
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1)
    # Rows gathered in (request, KV head, block) order: one bmm batch per (request, KV head),
    # and the transposed operand needs no copy.
    rows = summary_index.clamp(min=0).long()[:, None, :] * hkv + heads  # [B, Hkv, NB]
    qf = q.float().reshape(b * hkv, g, d)
    # One norm for the batch (a bool) takes one matmul; a per-request tensor takes both and
    # picks per row (no host read either way).
    pick = None if isinstance(l2, bool) else \
        torch.as_tensor(l2, device=q.device).expand(b).repeat_interleave(hkv).view(b * hkv, 1, 1)
    c_pool, r_pool = center.view(-1, d), radius.view(-1, d)
    score = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    step = _chunk(nb, 2 * b * hkv * d * 4)
    for s in range(0, nb, step):
        flat = rows[:, :, s:s + step].reshape(-1)
        n = flat.numel() // (b * hkv)
        c = c_pool.index_select(0, flat).view(b * hkv, n, d).float().transpose(1, 2)
        r = r_pool.index_select(0, flat).view(b * hkv, n, d).float().transpose(1, 2)
        est = torch.bmm(qf, c)  # [B*Hkv, G, n]
        if pick is not None:
            est += torch.where(pick, torch.bmm(qf * qf, r * r).sqrt_(), torch.bmm(qf.abs(), r))
        elif l2:
            est += torch.bmm(qf * qf, r * r).sqrt_()
        else:
            est.baddbmm_(qf.abs(), r)
        score[:, :, s:s + n] = est.amax(dim=1).view(b, hkv, n)
    return score.masked_fill_(~valid[:, None, :], float("-inf"))


def sparse_decode_attention(q, k_buffer, v_buffer, kv_slots, scale=None, return_lse=False):
    """Same as core.attention.sparse_decode_attention."""
    b, hq, d = q.shape
    s, hkv, dv = v_buffer.shape
    n = kv_slots.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not (k_buffer.is_contiguous() and v_buffer.is_contiguous()):
        return twins.sparse_decode_attention(q, k_buffer, v_buffer, kv_slots, scale, return_lse)
    valid = kv_slots >= 0
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1)
    flat = (kv_slots.clamp(min=0).long() * hkv + heads).reshape(-1)  # (request, head, n) order
    qg = q.float().reshape(b * hkv, g, d)
    rows = flat.view(b * hkv, n)
    k_pool = k_buffer.view(-1, d)
    logits = torch.empty(b * hkv, g, n, dtype=torch.float32, device=q.device)
    step = _chunk(n, b * hkv * d * 4)
    for s0 in range(0, n, step):  # K rows gathered chunk by chunk, consumed from cache
        k = k_pool.index_select(0, rows[:, s0:s0 + step].reshape(-1)).view(b * hkv, -1, d)
        torch.bmm(qg, k.float().transpose(1, 2), out=logits[:, :, s0:s0 + step])
    logits.mul_(scale).masked_fill_(~valid.view(b * hkv, 1, n), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B*Hkv, G]
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = logits.sub_(lse_safe[..., None]).exp_()  # exp(-inf) = 0 for masked entries
    if v_buffer.dtype == torch.float32 and n > 0:
        # P @ V straight from the pool: one weighted bag of N rows per query head, so V is
        # never copied out (the G bags of a KV head re-read the same rows from cache).
        bags = flat.view(b * hkv, 1, n).expand(b * hkv, g, n).reshape(-1)
        offsets = torch.arange(0, bags.numel(), n, device=q.device)
        out = F.embedding_bag(bags, v_buffer.view(s * hkv, dv), offsets, mode="sum",
                              per_sample_weights=p.reshape(-1))
    else:  # bags would weight in V's dtype: gather, upcast, bmm
        v = v_buffer.view(-1, dv).index_select(0, flat).view(b * hkv, n, dv).float()
        out = torch.bmm(p, v)
    out = out.view(b, hq, dv).to(q.dtype)
    if return_lse:
        return out, lse.view(b, hq)
    return out


def max_kept_blocks(plan: _selection.SelectionPlan) -> int:
    """Most blocks select() can keep under this plan, whatever the scores: the most blocks whose
    clipped lengths fit the block budget (shortest first). Reads the device: call at plan time."""
    clen = plan.clip_len
    if clen.numel() == 0:
        return 0
    too_long = plan.block_budget[:, None] + 1  # a non-selectable block never fits
    shortest_first = torch.where(clen > 0, clen, too_long).sort(dim=1).values
    fits = (shortest_first.cumsum(dim=1) <= plan.block_budget[:, None]).sum(dim=1)
    return int(fits.max())


def select(scores: torch.Tensor, plan: _selection.SelectionPlan, max_kept: int | None = None):
    """Same result as core.selection.select, with a top-k instead of a full sort.

    Only the first max_kept blocks of the score order can be kept (see max_kept_blocks), so the
    order is a top-k over exact integer keys — the score's order-preserving int32 image, ties to
    the lower block index (the twin's stable sort) — and the position scatter runs over
    [B, Hkv, max_kept, S] instead of [B, Hkv, NB, S]. Device ops only, static shapes.
    """
    nb = scores.shape[-1]
    kk = nb if max_kept is None else max(min(max_kept, nb), 0)
    ok = (plan.clip_len > 0)[:, None, :] & torch.isfinite(scores)
    s = scores.float().masked_fill(~ok, float("-inf")) + 0.0  # + 0.0: -0.0 ties with +0.0
    bits = s.view(torch.int32)
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    tie = (nb - 1 - torch.arange(nb, device=scores.device)).view(1, 1, nb)
    order = torch.topk(monotone * (1 << 32) + tie, kk, dim=-1).indices  # [B, Hkv, kk]
    return _selection.fill_in_order(order, ok, plan)
