"""Query-aware block selection under a token budget, per request and KV head.

Scoring estimates the largest q·k in a block from its summary (core.mapping): q·center plus the
radius measured along q, in the L1 norm (Σ_d |q_d|·radius_d: Quest's upper bound, for box
summaries) or the L2 norm (sqrt(Σ_d q_d²·radius_d²): the Gaussian expected maximum, for "gauss"
summaries). It is taken per query head and max-reduced over the query heads of a KV group: a
block is kept for a KV head if any of its query heads may need it, and K/V are never repeated
per query head.

Selection keeps whole blocks in score order while their total length fits the budget left after
the sink and recent window (a prefix of the sorted order: static shapes, no host sync). Blocks are
clipped to the middle region [sink, seq_len - recent), so no position is attended twice.
Requests no longer than their budget run dense.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .mapping import BlockTable


def score_blocks(
    q: torch.Tensor,
    center: torch.Tensor,
    radius: torch.Tensor,
    summary_index: torch.Tensor,
    l2=False,
) -> torch.Tensor:
    """q: [B, Hq, D]; center/radius: [M, Hkv, D]; summary_index: [B, NB] (-1 = no block);
    l2: the radius norm, one bool for the batch or a bool tensor [B] (per request).
    Returns float32 [B, Hkv, NB], -inf where there is no block."""
    b, hq, d = q.shape
    hkv = center.shape[1]
    g = hq // hkv
    valid = summary_index >= 0
    idx = summary_index.clamp(min=0).long()
    c = center[idx].float()[:, :, :, None, :]  # [B, NB, Hkv, 1, D]
    r = radius[idx].float()[:, :, :, None, :]
    qg = q.float().view(b, 1, hkv, g, d)
    along = (qg * c).sum(-1)  # [B, NB, Hkv, G]
    rad_l1 = (qg.abs() * r).sum(-1)
    rad_l2 = (qg * qg * r * r).sum(-1).sqrt()
    rows_l2 = torch.as_tensor(l2, device=q.device).expand(b).view(b, 1, 1, 1)
    score = (along + torch.where(rows_l2, rad_l2, rad_l1)).amax(dim=-1).permute(0, 2, 1)
    return score.masked_fill(~valid[:, None, :], float("-inf")).contiguous()


def score_blocks_ragged(q: torch.Tensor, centers: list, radii: list, l2: bool = False):
    """Naive variant for one request (q: [Hq, D]): one small op per block."""
    hq, d = q.shape
    out = []
    for c, r in zip(centers, radii):
        hkv = c.shape[0]
        qg = q.float().view(hkv, hq // hkv, d)
        r = r.float()[:, None]
        rad = (qg * qg * r * r).sum(-1).sqrt() if l2 else (qg.abs() * r).sum(-1)
        out.append(((qg * c.float()[:, None]).sum(-1) + rad).amax(dim=-1))
    return torch.stack(out, dim=-1) if out else q.new_zeros(q.shape[0], 0)


@dataclass(frozen=True)
class Selection:
    positions: torch.Tensor  # int64 [B, Hkv, cap]: attended positions, -1 = padding
    counts: torch.Tensor  # int64 [B, Hkv]: how many entries are real (they come first)
    order: torch.Tensor  # int64 [B, Hkv, K]: the first K blocks of the score order
    kept_len: torch.Tensor  # int64 [B, Hkv, K]: tokens kept of each (0 = not kept)
    nblocks: int  # NB

    @property
    def blocks(self) -> torch.Tensor:
        """bool [B, Hkv, NB]: which blocks were kept (built on demand: not on the decode path)."""
        b, hkv, _ = self.order.shape
        return torch.zeros(b, hkv, self.nblocks, dtype=torch.bool, device=self.order.device
                           ).scatter_(2, self.order, self.kept_len > 0)


def _as_batch(x, b: int, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long).expand(b) if x.dim() == 0 else x.to(device).long()
    return torch.full((b,), int(x), dtype=torch.long, device=device)


@dataclass(frozen=True)
class SelectionPlan:
    """Everything selection needs that does not depend on the query: built once per batch step,
    reused by every layer."""

    clip_start: torch.Tensor  # int64 [B, NB]: block start clipped to the middle region
    clip_len: torch.Tensor  # int64 [B, NB]: 0 = not selectable
    seq_lens: torch.Tensor  # int64 [B]
    recent_start: torch.Tensor  # int64 [B]: first position of the recent window
    block_budget: torch.Tensor  # int64 [B]: tokens left for blocks after sink + recent
    dense: torch.Tensor  # bool [B]: request fits its budget, attend to everything
    sink: int
    capacity: int
    max_clip_len: int


def plan_selection(
    table: BlockTable, seq_lens: torch.Tensor, budget, sink: int, recent,
    capacity: int | None = None, max_block_len: int | None = None,
) -> SelectionPlan:
    """seq_lens: [B] tokens in each sequence including the current one; budget/recent: int or [B].
    capacity (positions per request and KV head) defaults to the most any request can attend,
    max(min(budget, seq_len)): a budget is a per-request value, possibly far above any context,
    and must not size a tensor. max_block_len bounds the block length (static shapes; defaults
    to a host read of the longest block); it is clipped to the capacity, since a block longer
    than a request's block budget is never kept."""
    dev = table.starts.device
    seq = seq_lens.to(dev).long()
    b = seq.numel()
    bud = _as_batch(budget, b, dev)
    rec = _as_batch(recent, b, dev)
    r0 = torch.maximum(seq - rec, torch.full_like(seq, sink))
    st = table.starts.long()
    cs = torch.maximum(st, torch.full_like(st, sink))
    clen = (torch.minimum(st + table.lens.long(), r0[:, None]) - cs).clamp(min=0)
    dense = seq <= bud
    clen = clen.masked_fill(dense[:, None], 0)
    cap = int(torch.minimum(bud, seq).max()) if capacity is None else capacity
    return SelectionPlan(
        clip_start=cs, clip_len=clen, seq_lens=seq, recent_start=r0,
        block_budget=(bud - sink - (seq - r0)).clamp(min=0), dense=dense, sink=sink,
        capacity=cap,
        max_clip_len=min(int(table.lens.max()) if max_block_len is None else max_block_len, cap),
    )


def select(scores: torch.Tensor, plan: SelectionPlan) -> Selection:
    """Positions each (request, KV head) attends to: sink + kept blocks + recent window.
    scores: [B, Hkv, NB] (-inf = no block). Device-only ops, static shapes."""
    ok = (plan.clip_len > 0)[:, None, :] & torch.isfinite(scores)
    key = scores.masked_fill(~ok, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return fill_in_order(order, ok, plan)


def fixed_positions(plan: SelectionPlan, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query-independent part of every selection: (out, front). out: int64 [B, Hkv, cap + 1],
    the sink then the recent window in its first front[b] entries (every position of a dense
    request), -1 after; the last column is a dump for masked scatters. front: int64 [B]."""
    sink, seq, r0, dense = plan.sink, plan.seq_lens, plan.recent_start, plan.dense
    j = torch.arange(plan.capacity + 1, device=seq.device)[None, :]
    front = torch.where(dense, seq, sink + seq - r0)
    pos = torch.where(dense[:, None] | (j < sink), j, r0[:, None] + j - sink)
    pos = torch.where(j < front[:, None], pos, -1)
    return pos[:, None, :].expand(-1, hkv, -1).contiguous(), front


def fill_in_order(order: torch.Tensor, ok: torch.Tensor, plan: SelectionPlan,
                  fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
    """Keep whole blocks in score order while they fit the block budget (a greedy prefix of the
    order), and lay out their positions after the sink and the recent window.

    order: int64 [B, Hkv, K], the first K block indices of each score order (K <= NB: a caller
    that knows no more than K blocks can be kept may cut it); ok: bool [B, Hkv, NB], selectable
    blocks; fixed: fixed_positions(plan, Hkv), if the caller keeps it between layers.
    The query-independent positions come first, so that only the kept blocks are laid out per
    query; every list is its valid entries, then -1."""
    b, hkv, nb = ok.shape
    cap = plan.capacity
    ok_sorted = torch.gather(ok, 2, order)
    len_sorted = torch.gather(plan.clip_len[:, None, :].expand(b, hkv, nb), 2, order) * ok_sorted
    return lay_out_blocks(order, len_sorted, plan.clip_start[:, None, :].expand(b, hkv, nb),
                          plan.block_budget[:, None, None], fixed or fixed_positions(plan, hkv),
                          cap, plan.max_clip_len, nb)


def lay_out_blocks(order, len_sorted, clip_start, budget, fixed, cap: int, max_clip_len: int,
                   nb: int) -> Selection:
    """Shared by the core and the CPU kernels: len_sorted [B, Hkv, K] (0 = not selectable) in
    score order; the first blocks whose cumulative length fits `budget` are kept."""
    out, front = fixed
    fill = torch.cumsum(len_sorted, dim=-1)
    kept_len = len_sorted * (fill <= budget)  # a greedy prefix: lengths are >= 0
    out = out.clone()
    if max_clip_len > 0 and order.shape[-1] > 0:
        t = torch.arange(max_clip_len, device=order.device)
        offset = front[:, None, None] + fill - kept_len  # where each kept block's positions go
        put = t < kept_len[..., None]  # [B, Hkv, K, S]
        dst = torch.where(put, offset[..., None] + t, cap)  # the rest goes to the dump column
        val = torch.gather(clip_start, 2, order)[..., None] + t
        out.scatter_(2, dst.flatten(2), val.flatten(2))
    counts = front[:, None] + kept_len.sum(-1)
    return Selection(out[..., :cap], counts, order, kept_len, nb)


def select_positions(
    scores: torch.Tensor, table: BlockTable, seq_lens: torch.Tensor, budget, sink: int, recent,
    capacity: int | None = None,
) -> Selection:
    """plan_selection + select in one call."""
    return select(scores, plan_selection(table, seq_lens, budget, sink, recent, capacity))


def candidate_plan(plan: SelectionPlan, factor, capacity: int | None = None,
                   max_block_len: int | None = None) -> SelectionPlan:
    """The first stage of a two-stage selection: the same plan with `factor` (>= 1; a number,
    or one per request: a list of numbers, checked on the host, or a [B] tensor, checked with a
    device read) times each request's block budget. capacity / max_block_len as in
    plan_selection (static values for a captured graph); the defaults read the device (plan
    time only): the plan's capacity grown by the largest extra budget (at most the longest
    sequence), and the longest selectable block."""
    if isinstance(factor, (list, tuple)):
        if len(factor) != plan.block_budget.shape[0] or not all(
                _is_factor(f) for f in factor):
            raise ValueError(f"refine factors {list(factor)!r}: expected numbers >= 1, one per "
                             f"request")
        factor = torch.tensor(factor, dtype=torch.float64, device=plan.block_budget.device)
    elif isinstance(factor, torch.Tensor):
        factor = factor.to(plan.block_budget.device, torch.float64)
        if factor.shape not in ((), plan.block_budget.shape) or not bool((factor >= 1).all()):
            raise ValueError(f"refine factors {factor.tolist()!r}: expected numbers >= 1, one "
                             f"per request")
    elif not _is_factor(factor):
        raise ValueError(f"refine factor {factor!r}: expected a number >= 1")
    budget = (plan.block_budget.double() * factor).floor().long()
    if capacity is None:  # no request attends more than its sequence, whatever the factor
        capacity = min(plan.capacity + (int((budget - plan.block_budget).max())
                                        if budget.numel() else 0),
                       int(plan.seq_lens.max()) if plan.seq_lens.numel() else 0)
    if max_block_len is None:
        max_block_len = int(plan.clip_len.max()) if plan.clip_len.numel() else 0
    return replace(plan, block_budget=budget, capacity=capacity,
                   max_clip_len=min(max_block_len, capacity))


def _is_factor(f) -> bool:
    return not isinstance(f, bool) and isinstance(f, (int, float)) and f >= 1


def block_owner(sel: Selection, plan: SelectionPlan) -> torch.Tensor:
    """int64 [B, Hkv, capacity]: the block each of sel.positions belongs to (sel made under
    plan), NB for the sink, the recent window and padding: lay_out_blocks' arithmetic on the
    kept blocks. Static shapes, no host read."""
    b, hkv, _ = sel.order.shape
    nb, cap, width = sel.nblocks, plan.capacity, plan.max_clip_len
    owner = torch.full((b, hkv, cap + 1), nb, dtype=torch.long, device=sel.order.device)
    if width > 0 and sel.order.shape[-1] > 0:
        fill = torch.cumsum(sel.kept_len, dim=-1)
        front = sel.counts - sel.kept_len.sum(-1)
        t = torch.arange(width, device=owner.device)
        dst = torch.where(t < sel.kept_len[..., None],
                          (front[..., None] + fill - sel.kept_len)[..., None] + t, cap)
        owner.scatter_(2, dst.flatten(2),
                       sel.order[..., None].expand(-1, -1, -1, width).flatten(2))
    return owner[..., :cap]


def exact_block_scores(q: torch.Tensor, k_pool: torch.Tensor, token_slots: torch.Tensor,
                       cand: Selection, cand_plan: SelectionPlan) -> torch.Tensor:
    """float32 [B, Hkv, NB]: for each block `cand` kept (under cand_plan), the largest q·k over
    its attended keys and the query heads of the KV group; -inf for every other block.
    q: [B, Hq, D]; k_pool: [S, Hkv, D]; token_slots: [B, T] (a slot < 0, evicted, is no key).
    Reads the candidates' keys only: the summary estimate errs, the exact maxima of a few
    blocks do not."""
    b, hq, d = q.shape
    hkv, nb = k_pool.shape[1], cand.nblocks
    slots = positions_to_slots(cand.positions, token_slots)
    keys = k_pool[slots.clamp(min=0), torch.arange(hkv, device=slots.device)[None, :, None]]
    logit = torch.einsum("bhgd,bhnd->bhgn", q.float().view(b, hkv, hq // hkv, d),
                         keys.float()).amax(dim=2)  # [B, Hkv, N]
    owner = block_owner(cand, cand_plan)
    logit = logit.masked_fill((owner == nb) | (slots < 0), float("-inf"))
    best = torch.full((b, hkv, nb + 1), float("-inf"), device=q.device)
    return best.scatter_reduce_(2, owner, logit, "amax")[..., :nb]


def select_refined(scores: torch.Tensor, plan: SelectionPlan, cand_plan: SelectionPlan,
                   q: torch.Tensor, k_pool: torch.Tensor, token_slots: torch.Tensor) -> Selection:
    """Two-stage selection: `scores` (the summary estimate) pick candidate blocks for
    cand_plan's budget (candidate_plan), their exact max q·k picks plan's budget among them."""
    cand = select(scores, cand_plan)
    return select(exact_block_scores(q, k_pool, token_slots, cand, cand_plan), plan)


def positions_to_slots(positions: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Map positions [B, Hkv, N] (-1 = pad) to KV slots through token_slots [B, T]."""
    b, h, n = positions.shape
    flat = positions.clamp(min=0).view(b, h * n)
    slots = torch.gather(token_slots.long(), 1, flat).view(b, h, n)
    return torch.where(positions >= 0, slots, -1)
