"""Compressed decode inside SGLang 0.5.23's captured decode graphs (free of SGLang types).

A captured graph replays the kernels recorded at capture on the same memory; no Python of the
backend runs at replay. So everything the decode kernels read lives in persistent buffers sized
for the largest captured batch and fixed shapes (block table width = the store's
``max_blocks_per_row``, selection capacity = the server's budget at the longest context, block
length = C + Δ), the per-request radius norm of the block score included (``l2``: a row's
``score``, gauss or bound, may be its own), and the host-side work is done before each replay,
outside the graph:

* capture (``capture``): the buffers hold an all-padding batch and the plan's views of them are
  installed in a wrapper of its own (its workspace reserved for the largest batch, never moved);
  every compressed layer records score → select → attend over those views;
* replay (``replay``): the compressor's ``begin_forward`` for the real requests (slot
  invalidation, blocks frozen, rows' state) and the plan for the padded batch written *in place*
  into the same buffers; padding rows (SGLang's row 0, one token) attend to slot 0 and count
  nothing.

Every compressed layer takes the sparse path under a graph, dense requests included (their plan
attends to all their positions), so a graph never bakes in a capture-time "dense" decision.
``fits`` says whether a batch fits these shapes (budget ≤ capacity, blocks ≤ C + Δ, refine ≤
the server's, no eviction); SGLang then runs the others eagerly (``patches/graphs.py``). The
two-stage selection's candidate plan (``refine``) shares the plan's buffers but its block
budget, with a static capacity sized for the server's refine factor.
"""

from __future__ import annotations

import math

import torch

from ..core import BlockTable, plan_selection
from ..core.selection import SelectionPlan, candidate_plan
from ..kernels.wrapper import SparseDecodeWrapper

_PLAN_FIELDS = ("clip_start", "clip_len", "seq_lens", "recent_start", "block_budget", "dense")


class GraphDecode:
    def __init__(self, comp, max_bs: int) -> None:
        store, cfg = comp.store, comp.cfg
        dev = store.row_start.device
        self.comp = comp
        self.max_bs = max_bs
        self.nb = store.max_blocks_per_row
        self.width = comp.req_to_token.shape[1]
        self.capacity = cfg.token_budget(self.width)
        self.max_block_len = cfg.max_block_len
        self.layers = comp.num_layers - comp.first_compressed
        i64 = {"dtype": torch.int64, "device": dev}
        self.buf = {name: torch.zeros(max_bs, self.nb, **i64) for name in _PLAN_FIELDS[:2]}
        self.buf.update({name: torch.zeros(max_bs, **i64) for name in _PLAN_FIELDS[2:5]})
        self.buf["dense"] = torch.ones(max_bs, dtype=torch.bool, device=dev)
        # Two-stage selection: each row's candidate block budget, under a capacity that holds
        # the server's factor (a row asking for more runs eagerly: fits).
        self.refine = cfg.refine
        self.cand_budget = torch.zeros(max_bs, **i64)
        extra = math.ceil((self.refine - 1) * self.capacity)
        self.cand_capacity = min(self.width, self.capacity + extra)
        self.summary_index = torch.full((max_bs, self.nb), -1, **i64)
        self.token_slots = torch.zeros(max_bs, self.width, dtype=comp.req_to_token.dtype,
                                       device=dev)
        self.valid = torch.zeros(max_bs, **i64)  # 1 for a real request, 0 for padding
        # Each row's radius norm (core.selection.score_blocks): True for gauss summaries.
        self.l2 = torch.zeros(max_bs, dtype=torch.bool, device=dev)
        if comp._attended is None:  # the device counters the eager path adds to as well
            comp._attended = torch.zeros(2, **i64)
        w = comp.wrapper  # the same kernel side as the eager path
        self.wrapper = SparseDecodeWrapper(w.num_q_heads, w.num_kv_heads, w.head_dim_v,
                                           w.max_splits, device=dev, backend=w.kernels.side)
        self.wrapper.reserve(max_bs, dev)
        self.active = False  # the next decode layers belong to a captured graph

    # -- host side, before capture / replay -------------------------------------------------------

    def plan(self, bs: int) -> SelectionPlan:
        """The plan of a batch of `bs` as views of the persistent buffers."""
        return SelectionPlan(**{k: self.buf[k][:bs] for k in _PLAN_FIELDS},
                             sink=self.comp.cfg.sink, capacity=self.capacity,
                             max_clip_len=self.max_block_len)

    def candidates(self, bs: int) -> SelectionPlan | None:
        """The candidate plan of a batch of `bs` (views of the buffers), None without refine."""
        if self.refine <= 1:
            return None
        return SelectionPlan(**{k: self.buf[k][:bs] for k in _PLAN_FIELDS if k != "block_budget"},
                             block_budget=self.cand_budget[:bs], sink=self.comp.cfg.sink,
                             capacity=self.cand_capacity,
                             max_clip_len=min(self.max_block_len, self.cand_capacity))

    def fits(self, rows: list[int], seq_lens: list[int]) -> bool:
        """Whether these decode requests fit the captured shapes."""
        comp = self.comp
        if comp.evictor is not None or len(rows) > self.max_bs:
            return False
        for row, n in zip(rows, seq_lens):
            st = comp.rows.get(row)
            cfg = st.cfg if st is not None else comp.cfg
            budget = n if st is not None and st.fallback else cfg.decode_budget(n)
            if budget > self.capacity or cfg.max_block_len > self.max_block_len \
                    or cfg.refine > self.refine:
                return False
        return True

    def capture(self, bs: int) -> None:
        self._fill(bs, [], [], [], [], [], [])
        self.wrapper.plan_static(self.plan(bs), self.summary_index[:bs], self.token_slots[:bs],
                                 self.l2[:bs], refine=self.candidates(bs))
        self.active = True

    def replay(self, view, bs: int) -> None:
        """view: the real requests (BatchView, decode) of a replay padded to `bs`; None if none."""
        comp = self.comp
        rows, seqs, budgets, recents, l2, refine = [], [], [], [], [], []
        if view is not None:
            comp.begin_forward(view, plan=False)
            for row, n in zip(view.rows, view.seq_lens):
                st = comp.rows[row]
                budget = n if st.fallback else st.cfg.decode_budget(n)
                rows.append(row)
                seqs.append(n)
                budgets.append(budget)
                recents.append(st.cfg.recent_for(budget))
                l2.append(st.cfg.summary_spread is not None)
                refine.append(st.cfg.refine)
            comp.stats["graph_steps"] += 1
            comp.stats["tokens_dense"] += sum(seqs) * comp.kv_heads * self.layers
            comp.stats["sparse_layer_steps"] += len(rows) * self.layers
        self._fill(bs, rows, seqs, budgets, recents, l2, refine)
        self.active = True

    def _fill(self, bs, rows, seqs, budgets, recents, l2, refine=()) -> None:
        """Write the plan of these requests, padded to `bs`, into the buffers (in place)."""
        pad = bs - len(rows)
        comp, store = self.comp, self.comp.store
        dev = store.row_start.device
        r = torch.tensor(rows + [0] * pad, dtype=torch.long, device=dev)
        table = BlockTable(store.row_start[r, :self.nb], store.row_len[r, :self.nb])
        cfg = comp.cfg
        p = plan_selection(table, torch.tensor(seqs + [1] * pad, device=dev),
                           torch.tensor(budgets + [self.capacity] * pad, device=dev), cfg.sink,
                           torch.tensor(recents + [cfg.recent] * pad, device=dev),
                           capacity=self.capacity, max_block_len=self.max_block_len)
        for name in _PLAN_FIELDS:
            self.buf[name][:bs].copy_(getattr(p, name))
        if self.refine > 1:
            factor = list(refine) + [1.0] * (bs - len(refine))
            self.cand_budget[:bs].copy_(candidate_plan(p, factor, self.cand_capacity,
                                                       self.max_block_len).block_budget)
        index = store.row_entry[r, :self.nb]
        self.summary_index[:bs].copy_(torch.where(table.lens == 0, -1, index))
        self.token_slots[:bs].copy_(comp.req_to_token[r])
        self.valid[:bs].copy_(torch.tensor([1] * len(rows) + [0] * pad, device=dev))
        self.l2[:bs].copy_(torch.tensor(l2 + [False] * pad, device=dev))

    # -- device side, recorded into the graph -------------------------------------------------

    def decode_layer(self, layer_id, q, k_buffer, v_buffer, scale) -> torch.Tensor | None:
        """The compressed attention of one layer with the persistent plan (device ops, fixed
        shapes); None for the dense layers, which SGLang's own graph path serves."""
        comp = self.comp
        li = layer_id - comp.first_compressed
        if li < 0:
            return None
        out = self.wrapper.run(q, k_buffer, v_buffer, comp.store.center[li],
                               comp.store.radius[li], scale)
        counts = self.wrapper.tokens_attended() * self.valid[: q.shape[0], None]
        comp._attended[0] += counts.sum()
        comp._attended[1] = torch.maximum(comp._attended[1], counts.max())
        return out
