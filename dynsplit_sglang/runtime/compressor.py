"""The per-model-runner DynSplit state machine, fed by an attention backend, free of SGLang types.

One request row's life: its first extend reuses the blocks of the radix-shared prefix that were
decided with everything they depend on in view (their end slot is in the shared region, their
look-ahead too); each extend adds the votes of the scored layers' queries and finalises the blocks
whose decision can no longer change; the first decode step closes the prompt (the tail blocks
are decided with the votes available, and are not offered for reuse); every decode step freezes
the generated tokens into fixed blocks of C; decode attends to sink + selected blocks + recent.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core import (BlockTable, DynSplitConfig, candidates_for, causal_lse, key_distinctiveness,
                    layer_votes, segment)
from ..kernels import dispatch
from ..kernels.dispatch import block_summaries
from .eviction import block_heat, pick_victims
from ..kernels.wrapper import SparseDecodeWrapper
from .reclaim import reclaim
from .report import Reporter, report_fallback
from .store import BlockStore, StoreGeometry

_KIND_DECODE = 1  # fixed blocks of generated tokens, identical for every strategy


@dataclass
class BatchView:
    """What a forward tells the compressor; lists are per request, in batch order."""

    rows: list[int]
    generations: list[int]
    seq_lens: list[int]  # tokens in the sequence once this forward has run
    prefix_lens: list[int]  # tokens already in the cache before it
    input_ids: torch.Tensor  # the new tokens, requests concatenated
    out_cache_loc: torch.Tensor  # their slots
    is_decode: bool
    configs: list[DynSplitConfig] | None = None  # per-request overrides (None = the default)


@dataclass
class RowState:
    generation: int
    cfg: DynSplitConfig
    shared_len: int  # slots [0, shared_len) were matched in the radix tree: owned by others
    shared_votes: torch.Tensor  # own votes for candidates just before shared_len
    next_start: int = 0  # where segmentation resumes
    nblocks: int = 0
    prompt_done: bool = False
    fallback: bool = False  # metadata did not fit: attend densely
    local: list[int] = field(default_factory=list)  # entries only this row references


def _kind(cfg: DynSplitConfig) -> int:
    key = (cfg.strategy, cfg.block_size, cfg.tolerance, cfg.alpha, cfg.future_window, cfg.sink,
           cfg.candidates, cfg.score_layers)
    return hash(key) & 0x3FFFFFFFFFFFFFFF | 2


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
        free_slots: Callable[[torch.Tensor], None] | None = None,
        used_slots: Callable[[], int] | None = None,
        free_slot_ids: Callable[[], torch.Tensor] | None = None,
        live_rows: Callable[[], set] | None = None,
    ) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.req_to_token = req_to_token
        self.key_buffer = key_buffer
        self.vocab_masks = vocab_masks
        self.scored = set(cfg.scored_layers(num_layers))
        self.first_compressed = min(cfg.dense_layers, num_layers)
        self.geometry = StoreGeometry.for_pool(cfg, num_layers, kv_heads, head_dim,
                                               torch.empty(0, dtype=dtype).element_size(),
                                               num_slots, max_rows, max_context)
        self.store = BlockStore.from_geometry(self.geometry, dtype, device)
        # Eviction hands KV slots back to the allocator; its padding slot 0 marks a position
        # whose K/V are gone, which every attention path of this module skips.
        self.evict = cfg.evict
        if self.evict and free_slots is None:
            raise ValueError("Compressor: eviction needs free_slots (the KV allocator's free)")
        self.free_slots = free_slots
        self.used_slots = used_slots
        # Where entries no request can reach are found again (see reclaim.py).
        self.free_slot_ids = free_slot_ids
        self.live_rows = live_rows
        self._kept = None  # decode: every position that still has K/V, per request
        self.token = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.rows: dict[int, RowState] = {}
        self.stats: Counter = Counter()
        # Under tensor parallelism each rank holds some KV heads: the votes are summed over ranks
        # so that every rank (and a single-GPU run) splits the sequence at the same boundaries.
        self.tp_size = tp_size
        self.all_reduce = all_reduce
        self.reporter = reporter or Reporter(os.environ.get("DYNSPLIT_STATS_PATH"))
        self.batch: BatchView | None = None
        self._votes: list[torch.Tensor] = []
        self._sparse = False  # this decode step has a request longer than its budget
        self._attended: torch.Tensor | None = None  # [sum, max] tokens attended, on device
        self.wrapper = SparseDecodeWrapper(num_q_heads, kv_heads, head_dim)

    # -- lifecycle --------------------------------------------------------------------------

    def begin_forward(self, batch: BatchView, plan: bool = True) -> None:
        """plan=False: a captured decode graph plans into its own buffers (graphs.py)."""
        self.batch = batch
        self.store.invalidate_slots(batch.out_cache_loc)
        self.token[batch.out_cache_loc.long()] = batch.input_ids.long()
        states = [self._row_state(i) for i in range(len(batch.rows))]
        self._kept = None
        if batch.is_decode:
            self._note_usage()
            self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(batch.rows))
            for i, st in enumerate(states):
                self._advance_decode(st, batch.rows[i], batch.seq_lens[i] - 1)
            self._sparse = self._plan_decode(states) if plan else False
        else:
            self._sparse = False
            self._votes = [
                torch.zeros(s - p, self.cfg.future_window, device=batch.input_ids.device)
                for s, p in zip(batch.seq_lens, batch.prefix_lens)
            ]
        self._dump_stats()

    def extend_layer(self, layer_id: int, q: torch.Tensor, k_buffer: torch.Tensor, scale) -> None:
        """Votes of one layer's new queries (q: [tokens, Hq, D], post-RoPE)."""
        if layer_id not in self.scored:
            return
        b, off = self.batch, 0
        for i, row in enumerate(b.rows):
            n, p = b.seq_lens[i] - b.prefix_lens[i], b.prefix_lens[i]
            st = self.rows[row]
            votes = st.cfg.strategy == "dynsplit" and not st.prompt_done and n > 0
            heat = self.evict and not st.prompt_done and n > 0
            if votes or heat:
                slots = self.req_to_token[row, : b.seq_lens[i]].long()
                keys, lse = k_buffer[slots], None
                if heat:  # importance of this extend's own keys, for eviction
                    h = key_distinctiveness(keys[max(p, st.shared_len):])
                    own = slots[max(p, st.shared_len):]
                    self.store.heat[own] = torch.maximum(self.store.heat[own], h)
                if votes and self.evict:  # evicted keys (slot 0) are in no softmax
                    lse = causal_lse(q[off:off + n], keys, p, scale, key_ok=slots != 0)
                if votes:
                    self._votes[i] += layer_votes(q[off:off + n], keys, p, st.cfg, scale=scale,
                                                  lse=lse)
            off += n

    def end_extend(self) -> None:
        """After the last layer: keep the votes and finalise the blocks that are now settled."""
        b = self.batch
        if self.all_reduce is not None and self.tp_size > 1 and self._votes:
            flat = self.all_reduce(torch.cat(self._votes)) / self.tp_size
            self._votes = list(flat.split([v.shape[0] for v in self._votes]))
        for i, row in enumerate(b.rows):
            st = self.rows[row]
            if st.prompt_done:
                continue
            self._commit_votes(st, row, b.prefix_lens[i], self._votes[i])
            self._segment(st, row, b.seq_lens[i], complete=False)
        if self.evict:
            if self.all_reduce is not None and self.tp_size > 1:
                # Each rank scores its own KV heads: average, so every rank evicts alike.
                new = b.out_cache_loc.long()
                self.store.heat[new] = self.all_reduce(self.store.heat[new]) / self.tp_size
            self._note_usage()  # the peak: this chunk's slots are held, nothing evicted yet
            for i, row in enumerate(b.rows):
                if not self.rows[row].prompt_done:
                    self._evict(self.rows[row], row, b.prefix_lens[i], b.seq_lens[i])
        self._dump_stats()

    def is_sparse_layer(self, layer_id: int) -> bool:
        """This module attends in this decode layer (else SGLang's dense path runs). With
        eviction, every layer: SGLang's dense decode would read the evicted positions."""
        return self.evict or (self._sparse and layer_id >= self.first_compressed)

    def decode_layer(self, layer_id, q, k_buffer, v_buffer, scale) -> torch.Tensor | None:
        """Compressed decode attention for this layer, or None where dense attention applies."""
        if self.evict and (not self._sparse or layer_id < self.first_compressed):
            return self._attend_kept(q, k_buffer, v_buffer, scale)
        if not self._sparse or layer_id < self.first_compressed:
            return None
        li = layer_id - self.first_compressed
        out = self.wrapper.run(q, k_buffer, v_buffer, self.store.kmin[li], self.store.kmax[li],
                               scale)
        # Counted on the device; read once per forward (no sync per layer on a GPU).
        counts = self.wrapper.tokens_attended()
        if self._attended is None:
            self._attended = torch.zeros(2, dtype=torch.int64, device=counts.device)
        self._attended[0] += counts.sum()
        self._attended[1] = torch.maximum(self._attended[1], counts.max())
        self.stats["tokens_dense"] += sum(self.batch.seq_lens) * self.kv_heads
        self.stats["sparse_layer_steps"] += len(self.batch.rows)
        if layer_id == self.num_layers - 1:
            self._dump_stats()
        return out

    # -- rows -------------------------------------------------------------------------------

    def _row_state(self, i: int) -> RowState:
        b = self.batch
        row, gen = b.rows[i], b.generations[i]
        st = self.rows.get(row)
        if st is not None and st.generation == gen:
            return st
        if st is not None:  # the row was reused by a new request
            self.store.release_entries(st.local)
        self.store.clear_row(row)
        cfg = b.configs[i] if b.configs and b.configs[i] is not None else self.cfg
        wf = cfg.future_window
        st = RowState(gen, cfg, shared_len=b.prefix_lens[i],
                      shared_votes=torch.zeros(wf, wf, device=b.input_ids.device))
        self.rows[row] = st
        self.stats["requests"] += 1
        self._reuse_prefix(st, row)
        return st

    def _reuse_prefix(self, st: RowState, row: int) -> None:
        """Adopt the blocks of the radix-shared prefix, in chain order from position 0, as long as
        their decision depended on shared tokens only."""
        p = st.shared_len
        if p == 0 or st.cfg.strategy == "streaming":
            return
        s = self.store
        slots = self.req_to_token[row, :p].long()
        ends = torch.nonzero(s.end_entry[slots] >= 0).flatten().tolist()
        kind = _kind(st.cfg)
        live = torch.nonzero(slots != 0).flatten()
        evicted = live.numel() < p
        expect, adopted = 0, []
        for e_pos in ends:
            if evicted:  # an evicted run is a gap in the chain: the next block starts after it
                at = int(torch.searchsorted(live, expect))
                expect = int(live[at]) if at < live.numel() else p
            e = int(s.end_entry[slots[e_pos]])
            # The decision saw only shared tokens: either its whole look-ahead lies inside the
            # shared prefix (then it is what this request would decide alone), or everything
            # known when it was taken does (a later turn of the same conversation).
            horizon, known = int(s.e_horizon[e]), int(s.e_known[e])
            settled = horizon <= min(known, p) - 1 or known <= p
            ok = (settled and int(s.e_start[e]) == expect
                  and int(s.e_kind[e]) in (kind, _KIND_DECODE)
                  and int(s.e_start_slot[e]) == int(slots[expect]))
            if not ok:
                break
            adopted.append((expect, e_pos - expect + 1, e))
            expect = e_pos + 1
        if adopted and self._fits(st, len(adopted)):
            starts, lens, ents = zip(*adopted)
            self._append_row(st, row, list(starts), list(lens), list(ents))
            st.next_start = expect
            self.stats["blocks_reused"] += len(adopted)

    def _fits(self, st: RowState, n: int) -> bool:
        if st.nblocks + n > self.store.max_blocks_per_row:
            self._fall_back(st, "table")
            return False
        return True

    def _fall_back(self, st: RowState, reason: str) -> None:
        """This request's blocks do not fit: it attends densely from now on (counted, logged)."""
        st.fallback = True
        self.stats["fallback_rows"] += 1
        self.stats[f"fallback_rows_{reason}"] += 1
        report_fallback(reason, self.stats)

    def _append_row(self, st, row, starts, lens, ents) -> None:
        s, a, n = self.store, st.nblocks, len(starts)
        s.row_start[row, a:a + n] = torch.tensor(starts, dtype=torch.int32)
        s.row_len[row, a:a + n] = torch.tensor(lens, dtype=torch.int32)
        s.row_entry[row, a:a + n] = torch.tensor(ents, dtype=torch.int64)
        st.nblocks += n

    # -- votes and segmentation ---------------------------------------------------------------

    def _commit_votes(self, st: RowState, row: int, q_start: int, votes: torch.Tensor) -> None:
        """Votes for own slots go to the store; votes for shared candidates stay with the row."""
        n, wf = votes.shape
        if n == 0 or st.cfg.strategy != "dynsplit":
            return
        dev = votes.device
        t = torch.arange(n, device=dev)[:, None]
        j = torch.arange(wf, device=dev)[None, :]
        cand = q_start + t - j - 1
        own = cand >= st.shared_len
        jj = j.expand(n, wf)
        if bool(own.any()):
            slots = self.req_to_token[row, cand[own]].long()
            self.store.votes[slots, jj[own]] = votes[own]
        base = st.shared_len - wf
        shared = (cand >= max(base, 0)) & (cand < st.shared_len)
        if bool(shared.any()):
            st.shared_votes[cand[shared] - base, jj[shared]] = votes[shared]

    def _scores(self, st: RowState, row: int, lo: int, length: int) -> torch.Tensor:
        wf = st.cfg.future_window
        dev = self.store.votes.device
        pos = torch.arange(lo, length, device=dev)
        v = self.store.votes[self.req_to_token[row, lo:length].long()]
        q = pos[:, None] + torch.arange(wf, device=dev)[None, :] + 1
        base = st.shared_len - wf
        mine = (pos[:, None] < st.shared_len) & (q >= st.shared_len) & (pos[:, None] >= base)
        if bool(mine.any()):
            local = st.shared_votes[(pos - base).clamp(0, wf - 1)]
            v = torch.where(mine, local, v)
        voted = q < length
        cnt = voted.sum(1) * len(self.scored)
        s = (v * voted).sum(1) / cnt.clamp(min=1)
        return torch.where(cnt > 0, s, torch.full_like(s, float("-inf")))

    def _segment(self, st: RowState, row: int, length: int, complete: bool) -> None:
        cfg, lo = st.cfg, st.next_start
        if cfg.strategy == "streaming" or lo >= length or st.fallback:
            return
        scores = cands = None
        if cfg.strategy in ("dynsplit", "delimiter"):
            mode = cfg.candidates if cfg.strategy == "dynsplit" else "sentence"
            ids = torch.zeros(length, dtype=torch.int64, device=self.token.device)
            ids[lo:] = self.token[self.req_to_token[row, lo:length].long()]
            cands = candidates_for(ids, self.vocab_masks[mode])
        if cfg.strategy == "dynsplit":
            scores = torch.zeros(length, device=self.store.votes.device)
            scores[lo:] = self._scores(st, row, lo, length)
        seg = segment(cfg, length, scores, cands, start=lo, complete=complete)
        if seg.ends.numel() == 0:
            return
        starts, lens = seg.starts.tolist(), seg.lengths.tolist()
        if cfg.strategy == "fixed":
            horizon = [a + n - 1 for a, n in zip(starts, lens)]
        else:
            horizon = [a + cfg.block_size - 1 + cfg.tolerance + cfg.lookahead for a in starts]
        self._add_blocks(st, row, starts, lens, horizon, length, _kind(cfg))
        st.next_start = seg.next_start

    def _advance_decode(self, st: RowState, row: int, cached: int) -> None:
        """Close the prompt on the first decode step, then freeze generated tokens into blocks."""
        if not st.prompt_done:
            self._segment(st, row, cached, complete=True)
            st.prompt_done = True
        if st.cfg.strategy == "streaming" or st.fallback:
            return
        c = st.cfg.block_size
        n = (cached - st.next_start) // c
        if n > 0:
            starts = [st.next_start + k * c for k in range(n)]
            self._add_blocks(st, row, starts, [c] * n, [a + c - 1 for a in starts], cached,
                             _KIND_DECODE)
            st.next_start += n * c

    def _add_blocks(self, st, row, starts, lens, horizon, known, kind) -> None:
        s, n = self.store, len(starts)
        if not self._fits(st, n):
            return
        ents = s.alloc_entries(n)
        if ents is None:
            self.stats["entries_reclaimed"] += reclaim(self, n)
            ents = s.alloc_entries(n)
        if ents is None:
            self._fall_back(st, "store")
            return
        dev = s.e_start.device
        e = torch.tensor(ents, dtype=torch.int64, device=dev)
        st_t = torch.tensor(starts, dtype=torch.int64, device=dev)
        ln_t = torch.tensor(lens, dtype=torch.int64, device=dev)
        hz_t = torch.tensor(horizon, dtype=torch.int64, device=dev)
        row_slots = self.req_to_token[row]
        s.e_start[e], s.e_len[e], s.e_horizon[e] = st_t, ln_t, hz_t
        s.e_start_slot[e] = row_slots[st_t].long()
        s.e_known[e] = known
        s.e_kind[e] = kind
        table = BlockTable(st_t[None].int(), ln_t[None].int())
        width = max(lens)
        for li in range(s.kmin.shape[0]):
            k = self.key_buffer(self.first_compressed + li)
            block_summaries(k, row_slots[None], table, s.kmin[li], s.kmax[li], e[None], width)
        end_pos = st_t + ln_t - 1
        owned = end_pos >= st.shared_len
        s.end_entry[row_slots[end_pos[owned]].long()] = e[owned].int()
        st.local.extend(e[~owned].tolist())
        self._append_row(st, row, starts, lens, ents)
        self.stats["blocks_built"] += n

    # -- decode plan ----------------------------------------------------------------------------

    def _plan_decode(self, states: list[RowState]) -> bool:
        b = self.batch
        seq = b.seq_lens
        budgets = [st.cfg.token_budget(n) if not st.fallback else n for st, n in zip(states, seq)]
        if all(n <= bud for n, bud in zip(seq, budgets)):
            self.stats["dense_steps"] += 1
            return False
        self.stats["sparse_steps"] += 1
        dev = self.store.row_start.device
        rows = torch.tensor(b.rows, dtype=torch.long, device=dev)
        nb = max(1, max(st.nblocks for st in states))
        table = BlockTable(self.store.row_start[rows, :nb], self.store.row_len[rows, :nb])
        summary_index = self.store.row_entry[rows, :nb].clone()
        summary_index[table.lens == 0] = -1
        recents = [st.cfg.recent_for(bud) for st, bud in zip(states, budgets)]
        token_slots = self.req_to_token[rows, : max(seq)]
        if self.evict:  # slot 0 = evicted: the attention's padding value
            token_slots = torch.where(token_slots == 0, -1, token_slots)
        self.wrapper.plan(
            table,
            summary_index,
            token_slots,
            torch.tensor(seq, device=dev),
            torch.tensor(budgets, device=dev),
            self.cfg.sink,
            torch.tensor(recents, device=dev),
            capacity=max(budgets),
            max_block_len=max(st.cfg.max_block_len for st in states),
        )
        return True

    # -- eviction -------------------------------------------------------------------------------

    def _evict(self, st: RowState, row: int, cached: int, length: int) -> None:
        """Free the least important settled blocks of this extend's new tokens until what the
        row keeps fits its budget at this length, sink and recent window excepted.

        Only positions past `cached` (what the radix tree held before this forward): nobody
        else can reference them yet, and the tree stores them as they are after this forward
        (SGLang inserts a chunk once it has run). A shared prefix was thereby decided once, by
        its owner, from the prefix alone; earlier chunks are not revisited."""
        cfg, s = st.cfg, self.store
        if st.fallback or st.nblocks == 0:
            return
        slots = self.req_to_token[row, :length]
        excess = int((slots != 0).sum()) - cfg.token_budget(length)
        if excess <= 0:
            return
        nb = st.nblocks
        starts, lens = s.row_start[row, :nb].long(), s.row_len[row, :nb].long()
        lo, hi = max(cached, st.shared_len, cfg.sink), length - cfg.recent
        cand = torch.nonzero((lens > 0) & (starts >= lo) & (starts + lens <= hi)).flatten()
        if cand.numel() == 0:
            return
        heat = block_heat(s.heat[slots.long()], starts[cand], lens[cand])
        victims = cand[pick_victims(heat, lens[cand], excess)]
        width = int(lens[victims].max())
        offs = torch.arange(width, device=starts.device)
        pos = starts[victims, None] + offs[None, :]
        pos = pos[offs[None, :] < lens[victims, None]]
        freed = slots[pos].long()
        self.req_to_token[row, pos] = 0
        s.invalidate_slots(freed)  # releases the victims' entries (registered at their end slot)
        s.row_len[row, victims] = 0
        s.row_entry[row, victims] = -1
        self.free_slots(freed)
        self.stats["slots_evicted"] += int(freed.numel())
        self.stats["blocks_evicted"] += int(victims.numel())

    def _attend_kept(self, q, k_buffer, v_buffer, scale) -> torch.Tensor:
        """Dense decode over the positions that still have K/V (built once per step)."""
        if self._kept is None:
            b = self.batch
            dev = self.req_to_token.device
            rows = torch.tensor(b.rows, dtype=torch.long, device=dev)
            seq = torch.tensor(b.seq_lens, device=dev)
            t = self.req_to_token[rows, : max(b.seq_lens)].long()
            ok = (torch.arange(t.shape[1], device=dev)[None, :] < seq[:, None]) & (t != 0)
            # Valid entries first: the Triton kernel stops at each list's count.
            order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices
            t = torch.gather(torch.where(ok, t, -1), 1, order)
            h = self.kv_heads
            self._kept = (t[:, None, :].expand(-1, h, -1).contiguous(),
                          ok.sum(1)[:, None].expand(-1, h).contiguous())
        slots, counts = self._kept
        return dispatch.sparse_decode_attention(q, k_buffer, v_buffer, slots, scale,
                                                counts=counts)

    def _note_usage(self) -> None:
        if self.used_slots is not None:
            used = int(self.used_slots())
            self.stats["slots_in_use"] = used
            self.stats["peak_slots_in_use"] = max(self.stats["peak_slots_in_use"], used)

    def _dump_stats(self) -> None:
        if self._attended is not None:
            total, peak = self._attended.tolist()
            self.stats["tokens_attended"] = total
            self.stats["max_tokens_attended"] = peak
        self.reporter.report(self.stats)
