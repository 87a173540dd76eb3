"""CPU formulations of scoring and sparse decode: same results as the core twins, fewer bytes.

The core twins are written for clarity; on a CPU their temporaries dominate (the twin scorer
materialises two [B, NB, Hkv, G, D] products, the twin attention gathers K/V element-wise with
two index tensors). These versions do the same maths as BLAS calls on row gathers:

* Scoring: q·center + |q|·radius (L1) or sqrt(q²·radius²) (L2) is two batched matmuls
  [G, D] x [D, NB] per (request, KV head) on the summary rows (the squares of q and of the
  radius are taken chunk by chunk), then a max over the G query heads. A planned step reads
  long runs of consecutive summary rows in place and gathers the rest.
* Attention: index_select of whole (slot, KV head) K rows of the pool, chunk by chunk, and a
  batched matmul for the logits, a masked fp32 softmax, then P @ V the same way on V rows — no
  element-wise [B, Hkv, N] x [B, Hkv] gather. A planned step reuses its work buffers (Scratch).
* Selection: a top-k over exact integer keys instead of a full stable sort (see select).

Tests check both against the twins; anything these do not cover falls back to the twin.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dynsplit_sglang.core import attention as _attention
from dynsplit_sglang.core import mapping as _mapping
from dynsplit_sglang.core import selection as _selection

from . import native as _native

twins = SimpleNamespace(
    block_summaries=_mapping.block_summaries,
    score_blocks=_selection.score_blocks,
    sparse_decode_attention=_attention.sparse_decode_attention,
    block_summaries_layers=_mapping.block_summaries_layers,
)

# Summaries are built once per block at prefill / block freeze, off the per-step path: the twin
# (one gather + two reductions, every layer's at once) is already bandwidth-bound there.
block_summaries = _mapping.block_summaries
block_summaries_layers = _mapping.block_summaries_layers


# Gathered rows are consumed in chunks of about this many bytes, so that the matmul re-reads
# them from L2 instead of DRAM (1-2 MiB of L2 per core on current x86 servers); measured at 32k
# tokens, 8 KV heads, d128, cold caches, one thread: scoring 1.9 ms instead of 9.9 ms.
CHUNK_BYTES = 2 << 20
# Summaries read in place (summary_runs) are squared chunk by chunk into a buffer as large again:
# a quarter of CHUNK_BYTES each keeps the chunk, its square and the estimate in L2 (32k tokens,
# 8 KV heads, d128: 64-block chunks 3.8 ms, 256-block 4.4 ms).
RUN_CHUNK_SHARE = 4


def _chunk(n: int, bytes_per_item: int) -> int:
    return max(64, min(n, CHUNK_BYTES // max(bytes_per_item, 1)))


class Scratch:
    """Work buffers a step's layers reuse: the gathered K/V chunks, the logits and the squared
    radius chunks. On a CPU a fresh multi-MiB tensor is a fresh mmap whose page faults cost as
    much as the gather that fills it (32k tokens, 8 KV heads, d128, 1/16: attention 8.9 ms with
    fresh buffers, 6.0 ms reused). A buffer grows to the largest request and is then kept;
    nothing returned to a caller lives here."""

    def __init__(self) -> None:
        self._bufs: dict = {}

    def take(self, name: str, shape: tuple, dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (name, dtype, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def gather(self, pool: torch.Tensor, rows: torch.Tensor, name: str = "rows") -> torch.Tensor:
        """float32 [len(rows), D]: rows of a [R, D] pool, copied into this scratch."""
        out = torch.index_select(pool, 0, rows,
                                 out=self.take(name, (rows.numel(), pool.shape[1]), pool.dtype,
                                               pool.device))
        return out if out.dtype == torch.float32 else out.float()


def score_blocks(q, center, radius, summary_index, l2=False):
    """Same as core.selection.score_blocks (float32 [B, Hkv, NB], -inf where no block)."""
    b, hq, d = q.shape
    hkv = center.shape[1]
    if not (center.is_contiguous() and radius.is_contiguous()):
        return twins.score_blocks(q, center, radius, summary_index, l2)
    valid = summary_index >= 0
    score = _score_rows(q, center, radius, summary_rows(summary_index, hkv),
                        _norm_pick(l2, b, hkv, q.device))
    return score.masked_fill_(~valid[:, None, :], float("-inf"))


def summary_rows(summary_index: torch.Tensor, hkv: int) -> torch.Tensor:
    """int64 [B, Hkv, NB]: the rows of a [M * Hkv, D] view of the summaries, gathered in
    (request, KV head, block) order: one bmm batch per (request, KV head), and the transposed
    operand needs no copy."""
    heads = torch.arange(hkv, device=summary_index.device).view(1, hkv, 1)
    return summary_index.clamp(min=0).long()[:, None, :] * hkv + heads


def _norm_pick(l2, b: int, hkv: int, device):
    """One norm for the batch (a bool) takes one matmul; a per-request tensor takes both and
    picks per row (no host read either way)."""
    if isinstance(l2, bool):
        return l2
    return torch.as_tensor(l2, device=device).expand(b).repeat_interleave(hkv).view(b * hkv, 1, 1)


def _score_rows(q, center, radius, rows, pick, scratch: Scratch | None = None) -> torch.Tensor:
    """float32 [B, Hkv, NB]: the score of every gathered summary row (no validity mask)."""
    scratch = scratch or Scratch()
    b, hq, d = q.shape
    _, hkv, nb = rows.shape
    qf = q.float().reshape(b * hkv, hq // hkv, d)
    q2 = qf * qf if pick is not False else None
    qa = qf.abs() if pick is not True else None
    c_pool, r_pool = center.view(-1, d), radius.view(-1, d)
    score = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    step = _chunk(nb, 2 * b * hkv * d * 4)
    for s in range(0, nb, step):
        flat = rows[:, :, s:s + step].reshape(-1)
        n = flat.numel() // (b * hkv)
        c = scratch.gather(c_pool, flat, "center")
        r = scratch.gather(r_pool, flat, "radius")
        r2 = _square(r, pick, scratch)
        est = _estimate(qf, q2, qa, c.view(b * hkv, n, d).transpose(1, 2),
                        r.view(b * hkv, n, d).transpose(1, 2),
                        None if r2 is None else r2.view(b * hkv, n, d).transpose(1, 2), pick)
        torch.amax(est, dim=1, out=score.view(b * hkv, nb)[:, s:s + n])
    return score


def _square(r, pick, scratch: Scratch):
    """r * r in r's layout (a scratch buffer), or None where no L2 radius is needed."""
    if pick is False:
        return None
    return torch.mul(r, r, out=scratch.take("radius2", r.shape, torch.float32, r.device))


def _estimate(qf, q2, qa, c, r, r2, pick) -> torch.Tensor:
    """[X, G, n]: q·c + the radius along q, L2 (pick True), L1 (False) or per row (a bool
    tensor [X, 1, 1]). c, r, r2 (= r * r): [X, D, n] matmul operands, any strides."""
    est = torch.bmm(qf, c)
    if pick is True:
        return est.add_(torch.bmm(q2, r2).sqrt_())
    if pick is False:
        return est.baddbmm_(qa, r)
    return est.add_(torch.where(pick, torch.bmm(q2, r2).sqrt_(), torch.bmm(qa, r)))


# A run of consecutive summary rows is read in place at ~7 torch calls per chunk (tens of us);
# gathering costs ~1 us per block. Runs shorter than this on average are gathered instead.
MIN_RUN_BLOCKS = 32


def summary_runs(summary_index: torch.Tensor) -> list | None:
    """[(request, first block, first summary row, blocks)]: the maximal runs of consecutive
    summary rows in each request's valid blocks, or None when they average fewer than
    MIN_RUN_BLOCKS blocks (gathering is cheaper). Reads the host: plan time only."""
    idx = summary_index.long()
    ok = idx >= 0
    total = int(ok.sum())
    if total == 0:
        return None
    # cont[i, j]: block j + 1 is the summary row after block j's, so it extends j's run
    cont = F.pad(ok[:, 1:] & (idx[:, 1:] == idx[:, :-1] + 1), (0, 1), value=False)
    first = ok & ~F.pad(cont[:, :-1], (1, 0), value=False)
    starts = first.nonzero().tolist()
    if len(starts) * MIN_RUN_BLOCKS > total:
        return None
    ends = (ok & ~cont).nonzero()[:, 1].tolist()  # each run's last block, in the same order
    return [(i, j, int(idx[i, j]), e - j + 1) for (i, j), e in zip(starts, ends)]


def _score_runs(q, center, radius, runs: list, nb: int, pick, scratch: Scratch) -> torch.Tensor:
    """Same as _score_rows for blocks in runs of consecutive summary rows (summary_runs): the
    run's [blocks, Hkv, D] summaries are read in place as strided [Hkv, D, blocks] matmul
    operands, so nothing is gathered (32k, 8 KV heads, d128: 6.3 -> 3.8 ms). Blocks outside
    the runs score 0 (the caller's bias masks them)."""
    b, hq, d = q.shape
    hkv = center.shape[1]
    qf = q.float().reshape(b, hkv, hq // hkv, d)
    q2 = qf * qf if pick is not False else None
    qa = qf.abs() if pick is not True else None
    picks = pick if isinstance(pick, bool) else pick.view(b, hkv, 1, 1)
    score = torch.zeros(b, hkv, nb, dtype=torch.float32, device=q.device)
    step = _chunk(nb, RUN_CHUNK_SHARE * 2 * hkv * d * center.element_size())
    for i, col, first, n in runs:
        pick_i = picks if isinstance(picks, bool) else picks[i]
        for s in range(0, n, step):
            m = min(step, n - s)
            c = center[first + s:first + s + m].float()  # [m, Hkv, D], read in place
            r = radius[first + s:first + s + m].float()
            r2 = _square(r, pick_i, scratch)
            est = _estimate(qf[i], None if q2 is None else q2[i], None if qa is None else qa[i],
                            c.permute(1, 2, 0), r.permute(1, 2, 0),
                            None if r2 is None else r2.permute(1, 2, 0), pick_i)
            torch.amax(est, dim=1, out=score[i, :, col + s:col + s + m])
    return score


def sparse_decode_attention(q, k_buffer, v_buffer, kv_slots, scale=None, return_lse=False):
    """Same as core.attention.sparse_decode_attention."""
    hkv = v_buffer.shape[1]
    if not (k_buffer.is_contiguous() and v_buffer.is_contiguous()):
        return twins.sparse_decode_attention(q, k_buffer, v_buffer, kv_slots, scale, return_lse)
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1)
    rows = kv_slots.clamp(min=0).long() * hkv + heads  # (request, head, n) order
    return _attend_rows(q, k_buffer, v_buffer, rows, kv_slots >= 0, scale, return_lse)


def _attend_rows(q, k_buffer, v_buffer, rows, valid, scale=None, return_lse=False,
                 never_empty=False, scratch: Scratch | None = None):
    """Attention over pool rows (slot * Hkv + head) [B, Hkv, N], valid [B, Hkv, N].
    never_empty: every list has a valid entry (a planned decode step: the sink), so no row's
    softmax can be empty and its guard is skipped.

    K rows are gathered chunk by chunk into the scratch and consumed from cache by the logits
    bmm; after the softmax, V rows are gathered the same way and accumulated with baddbmm.
    (A weighted embedding_bag read V from the pool without a copy, but re-read it once per
    query head: 4.5-4.8 ms against 2.9 ms for a gather + bmm at 32k, 8 KV heads, d128, 1/16.)"""
    scratch = scratch or Scratch()
    b, hq, d = q.shape
    s, hkv, dv = v_buffer.shape
    n = rows.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = rows.reshape(b * hkv, n)
    qg = q.float().reshape(b * hkv, g, d) * scale
    k_pool, v_pool = k_buffer.view(-1, d), v_buffer.view(-1, dv)
    logits = scratch.take("logits", (b * hkv, g, n), torch.float32, q.device)
    step = _chunk(n, b * hkv * max(d, dv) * 4)
    for s0 in range(0, n, step):  # K rows gathered chunk by chunk, consumed from cache
        k = scratch.gather(k_pool, rows[:, s0:s0 + step].reshape(-1)).view(b * hkv, -1, d)
        torch.bmm(qg, k.transpose(1, 2), out=logits[:, :, s0:s0 + step])
    logits.masked_fill_(~valid.view(b * hkv, 1, n), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B*Hkv, G]
    lse_safe = lse if never_empty else torch.where(torch.isfinite(lse), lse, 0.0)
    p = logits.sub_(lse_safe[..., None]).exp_()  # exp(-inf) = 0 for masked entries
    out = torch.zeros(b * hkv, g, dv, dtype=torch.float32, device=q.device)
    for s0 in range(0, n, step):
        v = scratch.gather(v_pool, rows[:, s0:s0 + step].reshape(-1)).view(b * hkv, -1, dv)
        out.baddbmm_(p[:, :, s0:s0 + step], v)
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
    order is a top-k (see _top_blocks) and the position scatter runs over [B, Hkv, max_kept, S]
    instead of [B, Hkv, NB, S]. Device ops only, static shapes.
    """
    nb = scores.shape[-1]
    kk = nb if max_kept is None else max(min(max_kept, nb), 0)
    ok = (plan.clip_len > 0)[:, None, :] & torch.isfinite(scores)
    s = scores.float().masked_fill(~ok, float("-inf")) + 0.0  # + 0.0: -0.0 ties with +0.0
    order = _top_blocks(s, kk, _ties(nb, scores.device))
    return _selection.fill_in_order(order, ok, plan)


def _ties(nb: int, device) -> torch.Tensor:
    return (nb - 1 - torch.arange(nb, device=device)).view(1, 1, nb)


def _top_blocks(scores: torch.Tensor, k: int, ties: torch.Tensor) -> torch.Tensor:
    """The first k blocks of the score order (descending, ties to the lower block index: the
    twin's stable sort), as a top-k over exact integer keys: the score's order-preserving int32
    image in the high half, the tie-break in the low half. scores: float32, no -0.0."""
    bits = scores.view(torch.int32)
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return torch.topk((monotone << 32) | ties, k, dim=-1).indices


class DecodeStep:
    """What every layer of one CPU decode step shares, built once by SparseDecodeWrapper.plan:
    the summary rows to gather, the selectable lengths and starts per KV head, the fixed
    positions (sink + recent window), the top-k bound and each position's pool row.

    A layer is then score -> top-k -> lay out the kept blocks -> gather pool rows -> attend:
    one fused C call (native.c ds_layer, `run`) on fp32 tensors where it builds, else about 45
    torch calls instead of about 110 (on a CPU each call costs microseconds, more with the
    caches cold after the model's matmuls, which at short contexts is most of a compressed
    layer's time). `select` and `attend` run the stages apart (three C calls). Results equal
    the unplanned path's.

    cand: the candidate plan of a two-stage selection (core.selection.candidate_plan; None: the
    score alone): the score picks candidates under it, their exact max q·k over the pool's keys
    picks the blocks under `plan` (core.selection.select_refined), in the same fused call.
    """

    def __init__(self, plan: _selection.SelectionPlan, summary_index: torch.Tensor,
                 token_slots: torch.Tensor, hkv: int, l2, max_kept: int | None = None,
                 scratch: Scratch | None = None,
                 cand: _selection.SelectionPlan | None = None,
                 max_cand: int | None = None) -> None:
        b, nb = plan.clip_len.shape
        dev = plan.clip_len.device
        self.plan, self.hkv, self.nb = plan, hkv, nb
        self.cand, self.token_slots = cand, token_slots
        # the most candidates a list can keep (host read: plan time only, unless given)
        if cand is not None and max_cand is None:
            max_cand = max_kept_blocks(cand)
        self.max_cand = None if cand is None else min(max_cand, nb)
        self.scratch = scratch or Scratch()
        self.native = _native.load()  # fused kernels (native.c), or None: torch ops below
        # Runs of summary rows (host reads: plan time only) serve the torch scorer alone; with
        # the fused one loaded, summaries it cannot take (not fp32) are gathered instead.
        self.runs = summary_runs(summary_index) if self.native is None else None
        if max_kept is None:
            max_kept = max_kept_blocks(plan)  # host read: plan time only
        self.max_kept = min(max_kept, nb)
        ok = (plan.clip_len > 0) & (summary_index >= 0)
        self.bias = torch.zeros(b, 1, nb, device=dev).masked_fill_(~ok[:, None, :], float("-inf"))
        self.summary_index, self.l2_arg = summary_index, l2
        self.clen = (plan.clip_len * ok)[:, None, :].expand(b, hkv, nb).contiguous()
        self.cstart = plan.clip_start[:, None, :].expand(b, hkv, nb).contiguous()
        self.fixed = _selection.fixed_positions(plan, hkv)
        # Position p's pool row (slot * Hkv + head) at column p + 1; column 0 (position -1,
        # padding) holds row 0, which the attention masks.
        heads = torch.arange(hkv, device=dev).view(1, hkv, 1)
        slots = F.pad(token_slots.long().clamp(min=0), (1, 0))[:, None, :] * hkv + heads
        self.pool_rows = slots.view(b, hkv, -1)
        if self.native is not None:  # what the fused kernels take, with their index bounds
            self.index = torch.where(summary_index >= 0, summary_index.long(), -1).contiguous()
            self.index_top = _native.index_max(self.index)
            self.rows_top = _native.index_max(self.pool_rows)
            self.l2 = torch.as_tensor(l2, device=dev).expand(b).to(torch.uint8).contiguous()
        # Evicted positions (slot -1) are masked like padding; only then can a list be empty.
        self.slot_ok = None
        if bool((token_slots < 0).any()):  # host read: plan time only
            ok_slots = F.pad(token_slots >= 0, (1, 0), value=False)[:, None, :]
            self.slot_ok = ok_slots.expand(b, hkv, -1).contiguous()
        self._layers = {}  # (Hq, D, Dv) -> native.Layer: the whole layer in one fused call

    # What the torch formulation alone reads (score and keep without the fused kernels), built
    # on first use: the server's fused path never needs them, and each is a few tensor ops per
    # decode step.
    @functools.cached_property
    def rows(self) -> torch.Tensor:
        return summary_rows(self.summary_index, self.hkv)

    @functools.cached_property
    def pick(self):
        return _norm_pick(self.l2_arg, self.plan.clip_len.shape[0], self.hkv,
                          self.plan.clip_len.device)

    @functools.cached_property
    def ties(self) -> torch.Tensor:
        return _ties(self.nb, self.plan.clip_len.device)

    @functools.cached_property
    def budget(self) -> torch.Tensor:
        return self.plan.block_budget[:, None, None]

    def select(self, q, center, radius, k_buffer=None) -> _selection.Selection:
        """k_buffer: the layer's key pool [S, Hkv, D], read by a two-stage selection alone."""
        if self.cand is not None and k_buffer is None:
            raise ValueError("DecodeStep.select: a two-stage selection reads the keys: give "
                             "k_buffer")
        refine = self.cand is not None
        if self.native is not None and _native.supports(q, center, radius, *(
                (k_buffer,) if refine else ())):
            # score and block choice in one fused call
            layer = self._layer(q, None)
            k_rows = k_buffer.view(-1, k_buffer.shape[2]) if refine else None
            return _selection.Selection(*layer.select(q, center, radius, k_rows), self.nb)
        scores = self.score(q, center, radius)
        if refine:
            cand = select(scores, self.cand, self.max_cand)
            scores = _selection.exact_block_scores(q, k_buffer, self.token_slots, cand,
                                                   self.cand)
        return self.keep(scores)

    def _layer(self, q, v_buffer):
        """The fused layer call bound to this step for these shapes (v_buffer None: for the
        selection alone); the caller has checked that the fused kernels take the tensors."""
        _, hq, d = q.shape
        return self._layer_for(hq, d, 0 if v_buffer is None else v_buffer.shape[2], q.device)

    def _layer_for(self, hq: int, d: int, dv: int, dev):
        layer = self._layers.get((hq, d, dv))
        if layer is None:
            b = self.plan.clip_len.shape[0]
            out, front = self.fixed
            layer = self._layers[(hq, d, dv)] = _native.Layer(
                self.native, hq=hq, d=d, dv=dv, k=self.max_kept, index=self.index,
                index_top=self.index_top, l2=self.l2, bias=self.bias.view(b, self.nb),
                clen=self.clen, cstart=self.cstart, budget=self.plan.block_budget, fixed=out,
                front=front, pool_rows=self.pool_rows, rows_top=self.rows_top,
                slot_ok=self.slot_ok, take=lambda n, shape, dt: self.scratch.take(n, shape, dt,
                                                                                  dev),
                cbudget=None if self.cand is None else self.cand.block_budget.contiguous(),
                kc=self.max_cand or 0)
        return layer

    def layer_set(self, center, radius, counts, hq: int, dv: int, pools: dict):
        """Every compressed layer of this step as one bound fused call (native.LayerSet: layer
        li runs as set(li, q, k_buffer, v_buffer, scale)), or None where the fused kernels
        cannot take the summaries (no compiler, not fp32). center, radius: [L, M, Hkv, D];
        counts: int64 [L, B, Hkv] (tokens attended, written per layer); pools: kept by the
        caller across steps."""
        if self.native is None or not _native.supports(center, radius):
            return None
        b, d = self.plan.clip_len.shape[0], center.shape[-1]
        layer = self._layer_for(hq, d, dv, center.device)
        out = torch.empty(center.shape[0], b, hq, dv, dtype=torch.float32)
        return _native.LayerSet(layer, center, radius, counts, out,
                                lambda n, shape, dt: self.scratch.take(n, shape, dt, out.device),
                                pools)

    def run(self, q, k_buffer, v_buffer, center, radius, scale=None, return_lse=False):
        """The whole layer (select, then attend) in one fused call: (output as attend gives
        it, Selection), or None where the fused kernels cannot take these tensors (no compiler,
        not fp32), and select + attend run instead."""
        if self.native is None or not _native.supports(q, center, radius, k_buffer, v_buffer):
            return None
        layer = self._layer(q, v_buffer)
        d, dv = q.shape[2], v_buffer.shape[2]
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        out, lse, pos, counts, order, kept = layer.run_supported(
            q, center, radius, k_buffer.view(-1, d), v_buffer.view(-1, dv), scale)
        sel = _selection.Selection(pos, counts, order, kept, self.nb)
        return ((out, lse) if return_lse else out), sel

    def score(self, q, center, radius) -> torch.Tensor:
        """float32 [B, Hkv, NB]; -inf for the blocks that cannot be kept."""
        # + bias also turns -0.0 into +0.0, which the top-k keys need
        if self.native is not None and _native.supports(center, radius):
            score = _native.score(self.native, q.float().contiguous(), center, radius,
                                  self.index, self.l2, self.index_top)
        elif self.runs is not None:
            score = _score_runs(q, center, radius, self.runs, self.nb, self.pick, self.scratch)
        else:
            score = _score_rows(q, center, radius, self.rows, self.pick, self.scratch)
        return score.add_(self.bias)

    def keep(self, scores: torch.Tensor) -> _selection.Selection:
        if self.native is not None and _native.supports(scores):
            heap = self.scratch.take("heap", (_native.threads(self.native) * self.max_kept,),
                                     torch.int64, scores.device)
            out, front = self.fixed
            pos, counts, order, kept = _native.keep(
                self.native, scores, self.clen, self.cstart, self.plan.block_budget, out, front,
                self.max_kept, heap)
            return _selection.Selection(pos, counts, order, kept, self.nb)
        order = _top_blocks(scores, self.max_kept, self.ties)
        plan = self.plan
        lens = torch.gather(self.clen, 2, order) * torch.isfinite(torch.gather(scores, 2, order))
        return _selection.lay_out_blocks(order, lens, self.cstart,
                                         self.budget, self.fixed, plan.capacity,
                                         plan.max_clip_len, self.nb)

    def attend(self, q, k_buffer, v_buffer, sel: _selection.Selection, scale=None,
               return_lse=False):
        pos = sel.positions
        rows = torch.gather(self.pool_rows, 2, pos + 1)
        if self.slot_ok is None:
            valid = pos >= 0
        else:
            valid = torch.gather(self.slot_ok, 2, pos + 1)
        if self.native is not None and _native.supports(k_buffer, v_buffer):
            return self._attend_native(q, k_buffer, v_buffer, rows, valid, scale, return_lse)
        return _attend_rows(q, k_buffer, v_buffer, rows, valid, scale, return_lse,
                            never_empty=self.slot_ok is None, scratch=self.scratch)

    def _attend_native(self, q, k_buffer, v_buffer, rows, valid, scale, return_lse):
        d, dv = k_buffer.shape[2], v_buffer.shape[2]
        n, g = rows.shape[2], q.shape[1] // self.hkv
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        b = q.shape[0]
        size = _native.attend_work(self.native, b, self.hkv, g, n, dv)
        work = self.scratch.take("work", (size,), torch.float32, q.device)
        out, lse = _native.attend(self.native, q.float().contiguous(), k_buffer.view(-1, d),
                                  v_buffer.view(-1, dv), rows.contiguous(), valid.contiguous(),
                                  scale, work, self.rows_top)
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out
