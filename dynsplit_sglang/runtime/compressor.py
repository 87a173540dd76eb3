"""The per-model-runner DynSplit state machine, fed by an attention backend, free of SGLang types.

A forward is ``begin_forward`` (builds the forward's StepState: the rows' states, their votes'
accumulators, the decode plan), then per layer ``extend_layer`` (+ ``end_extend`` after the last)
or ``decode_layer``. The rows' blocks are kept by ``RowBlocks`` (rows.py), eviction by
``Evictor`` (eviction.py); decode attends to sink + selected blocks + recent window through the
kernels' plan/run wrapper.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from typing import Callable

import torch

from ..core import (
    BlockTable, DynSplitConfig, candidate_plan, causal_lse, layer_votes, plan_selection,
)
from ..kernels.wrapper import SparseDecodeWrapper
from . import hooks
from .cold import ColdLink
from .eviction import Evictor
from .report import Reporter, warn_counted
from .rows import RowBlocks
from .state import BatchView, RowState, StepState
from .store import BlockStore, StoreGeometry
from .tier import ColdTier

__all__ = ["BatchView", "Compressor"]


def to_device(lists: list[list[int]], dev: torch.device) -> torch.Tensor:
    """Equal-length integer lists as one int64 tensor [len(lists), n] on dev, in one copy that
    does not stall the host on a GPU (pinned memory, non-blocking: ordered on the stream)."""
    host = torch.tensor(lists, dtype=torch.long, pin_memory=dev.type == "cuda")
    return host.to(dev, non_blocking=True)


class Compressor:
    def __init__(
        self,
        cfg: DynSplitConfig,
        num_layers: int,
        num_q_heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        num_slots: int,
        max_rows: int,
        max_context: int,
        req_to_token: torch.Tensor,
        key_buffer: Callable[[int], torch.Tensor],
        vocab_masks: dict[str, torch.Tensor],
        reporter: Reporter | None = None,
        tp_size: int = 1,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        kv_heads_total: int | None = None,
        free_slots: Callable[[torch.Tensor], None] | None = None,
        used_slots: Callable[[], int] | None = None,
        free_slot_ids: Callable[[], torch.Tensor] | None = None,
        live_rows: Callable[[], set] | None = None,
        value_buffer: Callable[[int], torch.Tensor] | None = None,
        alloc_slots: Callable[[int], torch.Tensor | None] | None = None,
        available_slots: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.req_to_token = req_to_token
        self.scored = set(cfg.scored_layers(num_layers))
        self.first_compressed = min(cfg.dense_layers, num_layers)
        # One geometry sizes the store and counts its bytes, as the pool sizer reserved them
        # (patches/memory.py).
        self.geometry = StoreGeometry.for_pool(cfg, num_layers, kv_heads, head_dim,
                                               torch.empty(0, dtype=dtype).element_size(),
                                               num_slots, max_rows, max_context)
        self.store = BlockStore.from_geometry(self.geometry, dtype, device)
        self.stats: Counter = Counter()
        # The kernel side (Triton on CUDA, torch on CPU) is chosen here, once, for every user.
        self.wrapper = SparseDecodeWrapper(num_q_heads, kv_heads, head_dim, device=device)
        kernels = self.wrapper.kernels
        self.blocks = RowBlocks(self.store, req_to_token, key_buffer, vocab_masks, kernels,
                                self.first_compressed, len(self.scored), self.stats,
                                free_slot_ids=free_slot_ids, live_rows=live_rows)
        # Eviction hands KV slots back to the allocator (free_slots).
        self.evictor: Evictor | None = None
        if cfg.evict:
            if free_slots is None:
                raise ValueError("Compressor: eviction needs free_slots (the KV allocator's free)")
            self.evictor = Evictor(self.store, req_to_token, kv_heads, kernels, free_slots,
                                   self.stats)
        self.cold: ColdLink | None = None
        if cfg.evict and cfg.evict_tier == "host":
            if value_buffer is None or alloc_slots is None or available_slots is None:
                raise ValueError("Compressor: the cold tier needs value_buffer, alloc_slots and "
                                 "available_slots")
            tier = ColdTier(cfg.evict_tier_mb << 20, num_layers, kv_heads, head_dim, dtype,
                            pin_memory=torch.device(device).type == "cuda",
                            aux_width=cfg.future_window + 1)
            tier.stats = self.stats
            layers = range(num_layers)
            self.cold = ColdLink(
                tier, lambda: ([key_buffer(i) for i in layers], [value_buffer(i) for i in layers]),
                alloc_slots, available_slots, self.stats, publish=lambda: self._dump_stats())
            self.evictor.cold = self.cold
            hooks.tree_listeners.add(self.cold)  # flushes and nodes leaving the tree
        self.used_slots = used_slots
        # Under tensor parallelism each rank holds some KV heads: the votes are summed over ranks
        # so that every rank (and a single-GPU run) splits the sequence at the same boundaries.
        self.tp_size = tp_size
        self.all_reduce = all_reduce
        # The model's KV heads (every rank's together); under TP a rank holds kv_heads of them,
        # or a replica of one when there are more ranks than heads.
        self.kv_heads_total = kv_heads_total or kv_heads * tp_size
        self.reporter = reporter or Reporter(os.environ.get("DYNSPLIT_STATS_PATH"))
        self.step: StepState | None = None
        self._attended: torch.Tensor | None = None  # counters [sum, max] attended, on device

    @property
    def rows(self) -> dict[int, RowState]:
        return self.blocks.rows

    @property
    def store_bytes(self) -> int:
        """What the block store allocated, the per-slot token ids included (geometry.nbytes)."""
        token = self.blocks.token
        return self.store.nbytes + token.numel() * token.element_size()

    # -- lifecycle --------------------------------------------------------------------------

    def begin_forward(self, batch: BatchView, plan: bool = True) -> None:
        """plan=False: a captured decode graph plans into its own buffers (graphs.py)."""
        states = self.blocks.begin(batch, self.cfg)
        step = self.step = StepState(batch, states)
        if self.cold is not None and not batch.is_decode:
            self._recall(step)
        # Every extend attends densely, one new token over a cached prompt included: the first
        # answer token always comes from the prefill, cached or not (docs/design.md).
        if batch.is_decode:
            self._note_usage()
            self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(batch.rows))
            for i, st in enumerate(states):
                self.blocks.advance_decode(st, batch.rows[i], batch.seq_lens[i] - 1)
            step.sparse = self._plan_decode(step) if plan else False
        else:
            step.votes = [
                torch.zeros(s - p, self.cfg.future_window, device=batch.input_ids.device)
                for s, p in zip(batch.seq_lens, batch.prefix_lens)
            ]
        if not (step.sparse and self.first_compressed < self.num_layers):
            self._dump_stats()  # else the forward's last layer reports (_end_decode): once

    def extend_layer(self, layer_id: int, q: torch.Tensor, k_buffer: torch.Tensor, scale) -> None:
        """Votes of one layer's new queries (q: [tokens, Hq, D], post-RoPE)."""
        if layer_id not in self.scored:
            return
        step, off = self.step, 0
        b = step.batch
        for i, st in enumerate(step.rows):
            n, p = b.seq_lens[i] - b.prefix_lens[i], b.prefix_lens[i]
            votes = st.cfg.strategy_impl.needs_votes and not st.prompt_done and n > 0
            evicting = self.evictor is not None and not st.prompt_done and n > 0
            # Distinctiveness: the chunk scope's ranking, and a held prompt's before its end.
            keyheat = evicting and (st.cfg.evict_scope == "chunk" or _holds_early(st, b, i))
            window = evicting and st.cfg.evict_scope == "prompt" and b.final is not None \
                and b.final[i]
            if votes or keyheat or window:
                slots = self.req_to_token[b.rows[i], : b.seq_lens[i]].long()
                keys, lse = k_buffer[slots], None
                if keyheat:  # importance of this extend's own keys, for eviction
                    self.evictor.note_keys(slots, keys, max(p, st.shared_len))
                    step.noted_keys = True
                if window:  # the prompt's last queries: what its question attends to
                    wkeys, ok = keys, None
                    if st.cold is not None:  # its tier blocks compete too, keys from the tier
                        at, cold_k = self.cold.keys_at(st.cold, layer_id)
                        at = at.to(keys.device)
                        wkeys, ok = keys.clone(), slots != 0
                        wkeys[at], ok[at] = cold_k.to(keys.device, keys.dtype), True
                    step.window[i] = self.evictor.window(step.window.get(i), q[off:off + n],
                                                        wkeys, p, slots, scale, st.cfg, ok)
                if votes and self.evictor is not None:  # evicted keys (slot 0): in no softmax
                    lse = causal_lse(q[off:off + n], keys, p, scale, key_ok=slots != 0)
                if votes:
                    step.votes[i] += layer_votes(q[off:off + n], keys, p, st.cfg, scale=scale,
                                                 lse=lse)
            off += n

    def end_extend(self) -> None:
        """After the last layer: keep the votes and finalise the blocks that are now settled."""
        step = self.step
        b = step.batch
        tp = self.all_reduce is not None and self.tp_size > 1
        if tp and step.votes:
            flat = self.all_reduce(torch.cat(step.votes)) / self.tp_size
            step.votes = list(flat.split([v.shape[0] for v in step.votes]))
        for i, st in enumerate(step.rows):
            if st.prompt_done:
                continue
            self.blocks.commit_votes(st, b.rows[i], b.prefix_lens[i], step.votes[i])
            self.blocks.segment(st, b.rows[i], b.seq_lens[i], complete=False)
        if self.evictor is not None:
            self._evict(step, tp)
        self._dump_stats()

    def _recall(self, step: StepState) -> None:
        """A request's first extend: its own part's evicted blocks come back from the cold
        tier (runtime/cold.py), before the forward reads the row."""
        b = step.batch
        if b.token_ids is None or b.owned_from is None:
            return
        for i, st in enumerate(step.rows):
            if st.recall_checked:
                continue
            st.recall_checked = True
            t0 = time.perf_counter()
            if st.cfg.evict_hold > 0:  # bounded: ranked at the prompt's end, not brought back
                st.cold = self.cold.find_row(self.req_to_token, b.rows[i], b.owned_from[i],
                                             b.prefix_lens[i], b.token_ids[i])
                continue
            if self.cold.recall_row(self.blocks, st, b.rows[i], b.owned_from[i],
                                    b.prefix_lens[i], b.token_ids[i]):
                step.revised.append(i)  # the radix tree's copy: 0 -> the new slots
                # Host time of the lookup, the allocation and the copies (on a GPU the copies
                # are queued: a lower bound there).
                st.tier_ms = 1000 * (time.perf_counter() - t0)

    def _rank_with_cold(self, step: StepState, i: int, st: RowState, own: int) -> int | None:
        b = step.batch
        cold, st.cold = st.cold, None
        self.cold.prune(cold)
        t0 = time.perf_counter()
        first, winners = self.evictor.rank_with_cold(st, b.rows[i], own, b.seq_lens[i],
                                                     step.window[i], cold, self._row_keys(b, i))
        if winners and self.cold.recall_blocks(self.blocks, st, b.rows[i], cold, winners) \
                and i not in step.revised:
            step.revised.append(i)  # recalled positions are in the tree's copy
        st.tier_ms += 1000 * (time.perf_counter() - t0)
        return first

    def _row_keys(self, b: BatchView, i: int) -> torch.Tensor | None:
        if self.cold is None or b.token_ids is None:
            return None
        return self.cold.keys(b.token_ids[i], b.seq_lens[i])

    def _evict(self, step: StepState, tp: bool) -> None:
        b = step.batch
        if tp:  # every rank must evict alike: heat averaged over the ranks' KV heads
            if step.noted_keys:  # key heat: the chunk scope, or a prompt held before its end
                self.evictor.average_over_ranks(b.out_cache_loc, self.all_reduce, self.tp_size)
            for i in sorted(step.window):
                step.window[i] = self.all_reduce(step.window[i]) / self.tp_size
        self._note_usage()  # the peak: this chunk's slots are held, nothing evicted yet
        for i, st in enumerate(step.rows):
            if st.prompt_done:
                continue
            held_early = _holds_early(st, b, i)
            if st.cfg.evict_scope == "chunk":
                self.evictor.evict(st, b.rows[i], b.prefix_lens[i], b.seq_lens[i],
                                   self._row_keys(b, i))
            elif i in step.window or held_early:
                # Unknown ownership: only this extend's tokens are surely the request's own.
                own = b.owned_from[i] if b.owned_from is not None else b.prefix_lens[i]
                own = max(own, st.cfg.evict_keep)  # what the client marked as shared
                if held_early:  # before the question: bound the peak, by key distinctiveness
                    first = self.evictor.hold_prompt(st, b.rows[i], own, b.seq_lens[i],
                                                     self._row_keys(b, i))
                elif st.cold is not None:  # pool and tier blocks compete (runtime/cold.py)
                    first = self._rank_with_cold(step, i, st, own)
                else:
                    first = self.evictor.evict_prompt(st, b.rows[i], own, b.seq_lens[i],
                                                      step.window[i], keys=self._row_keys(b, i))
                if first is not None and first < b.prefix_lens[i] and i not in step.revised:
                    step.revised.append(i)  # the radix tree holds a copy of those positions
            elif b.final is None and not st.evict_unknown:
                st.evict_unknown = True
                self.stats["evict_skipped_rows"] += 1
                warn_counted(self.stats, "evict_skipped_rows", "a request keeps its whole prompt "
                             "because its SGLang request was not known to whole-prompt eviction")

    def is_sparse_layer(self, layer_id: int) -> bool:
        """This module attends in this decode layer (else SGLang's dense path runs). With
        eviction, every layer: SGLang's dense decode would read the evicted positions."""
        sparse = self.step is not None and self.step.sparse
        return self.evictor is not None or (sparse and layer_id >= self.first_compressed)

    def decode_layer(self, layer_id, q, k_buffer, v_buffer, scale) -> torch.Tensor | None:
        """Compressed decode attention for this layer, or None where dense attention applies."""
        step = self.step
        if not step.sparse or layer_id < self.first_compressed:
            if self.evictor is not None:
                out = self.evictor.attend_kept(step, q, k_buffer, v_buffer, scale)
                if layer_id >= self.first_compressed:
                    step.count_rows(step.kept[1])
                return out
            return None
        # Tokens attended are counted on the device into the step's table (step.counts_table),
        # folded into the server's counters once per forward (no sync per layer on a GPU).
        out = self.wrapper.run_layer(layer_id - self.first_compressed, q, k_buffer, v_buffer,
                                     scale)
        if layer_id == self.num_layers - 1:
            self._end_decode(step)
        return out

    def _end_decode(self, step: StepState) -> None:
        layers = self.num_layers - self.first_compressed
        total, peak = step.attended()
        if self._attended is None:
            self._attended = torch.zeros(2, dtype=torch.int64, device=total.device)
        self._attended[0] += total.sum()
        self._attended[1] = torch.maximum(self._attended[1], peak.max())
        self.stats["tokens_dense"] += sum(step.batch.seq_lens) * self.kv_heads * layers
        self.stats["sparse_layer_steps"] += len(step.batch.rows) * layers
        self._dump_stats()

    def rows_attended(self) -> torch.Tensor | None:
        """[B] K/V tokens each request of this decode forward attended over the compressed
        layers and every KV head of the model, on the device (None when SGLang's dense decode
        ran). Under TP the ranks' counts are summed (one small all-reduce per decode forward,
        which every rank runs: the per-request report then equals a single process's)."""
        step = self.step
        got = None if step is None else step.row_attended
        if got is None or self.all_reduce is None or self.tp_size == 1:
            return got
        replicas = self.tp_size * self.kv_heads // self.kv_heads_total  # copies of each head
        return self.all_reduce(got.clone()) // max(1, replicas)

    # -- decode plan ----------------------------------------------------------------------------

    def _plan_decode(self, step: StepState) -> bool:
        b, states = step.batch, step.rows
        seq = b.seq_lens
        budgets = [st.cfg.decode_budget(n) if not st.fallback else n for st, n in zip(states, seq)]
        if all(n <= bud for n, bud in zip(seq, budgets)):
            self.stats["dense_steps"] += 1
            return False
        self.stats["sparse_steps"] += 1
        dev = self.store.row_start.device
        recents = [st.cfg.recent_for(bud) for st, bud in zip(states, budgets)]
        rows, seq_t, budget_t, recent_t = to_device([b.rows, seq, budgets, recents], dev)
        nb = max(1, max(st.nblocks for st in states))
        table = BlockTable(self.store.row_start[rows, :nb], self.store.row_len[rows, :nb])
        # torch.where, not a masked assignment (a boolean index is a host sync on a GPU)
        summary_index = torch.where(table.lens == 0, -1, self.store.row_entry[rows, :nb])
        token_slots = self.req_to_token[rows, : max(seq)]
        if self.evictor is not None:  # slot 0 = evicted: the attention's padding value
            token_slots = torch.where(token_slots == 0, -1, token_slots)
        selection = plan_selection(
            table,
            seq_t,
            budget_t,
            self.cfg.sink,
            recent_t,
            # What the batch can attend, not the largest budget: a budget (per request) may be
            # far above any context (strategy=none, a large token override).
            capacity=max(min(bud, n) for bud, n in zip(budgets, seq)),
            max_block_len=max(st.cfg.max_block_len for st in states),
        )
        l2 = [st.cfg.summary_spread is not None for st in states]
        refine = [st.cfg.refine for st in states]
        cand = None
        if max(refine) > 1:  # two-stage selection (core.select_refined) for the batch
            # Sized from the host's lists (no device read): a request's extra candidate tokens
            # are at most (R - 1) x what it attends.
            extra = max(math.ceil((r - 1) * min(bud, n)) for r, bud, n in zip(refine, budgets, seq))
            cand = candidate_plan(selection, refine[0] if len(set(refine)) == 1 else refine,
                                  capacity=min(selection.capacity + extra, max(seq)),
                                  max_block_len=max(st.cfg.max_block_len for st in states))
            self.stats["refined_steps"] += 1
        self.wrapper.plan(selection, summary_index, token_slots,
                          l2[0] if len(set(l2)) == 1 else to_device([l2], dev)[0].bool(),
                          summaries=(self.store.center, self.store.radius), refine=cand)
        step.counts_table = self.wrapper.layer_counts
        return True

    # -- counters -------------------------------------------------------------------------------

    def _note_usage(self) -> None:
        if self.used_slots is not None:
            used = int(self.used_slots())
            self.stats["slots_in_use"] = used
            self.stats["peak_slots_in_use"] = max(self.stats["peak_slots_in_use"], used)

    def _dump_stats(self) -> None:
        """Hand the counters to the reporter (it publishes them off the decode path)."""
        attended = None if self._attended is None else self._attended.clone()
        self.reporter.report(self.stats, attended)

    def counters(self) -> Counter:
        """The counters now, the device ones read in (a host read: not for the decode path)."""
        out = Counter(self.stats)
        if self._attended is not None:
            out["tokens_attended"], out["max_tokens_attended"] = self._attended.tolist()
        return out


def _holds_early(st: RowState, b: BatchView, i: int) -> bool:
    """Scope "prompt" with evict_hold: this extend is one of the prompt's chunks before its end,
    where the own part is held to evict_hold times its budget."""
    return st.cfg.evict_scope == "prompt" and st.cfg.evict_hold > 0 and b.final is not None \
        and not b.final[i]
