"""Each request row's blocks: adopted from a radix-shared prefix, voted on, split, registered.

One request row's life: its first extend reuses the blocks of the radix-shared prefix that were
decided with everything they depend on in view (their end slot is in the shared region, their
horizon too); each extend adds the votes of the scored layers' queries and finalises the blocks
whose decision can no longer change; the first decode step closes the prompt (the tail blocks
are decided with the votes available, and are not offered for reuse); every decode step freezes
the generated tokens into fixed blocks of C. Blocks are written to the BlockStore (entries,
summaries, the row's block table); the strategy of the row's config decides where they end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core import STRATEGIES, BlockTable, DynSplitConfig, Segmentation, candidates_for
from ..kernels import Kernels
from .reclaim import reclaim
from .report import report_fallback
from .state import BatchView, RowState
from .store import BlockStore

_FIXED = STRATEGIES["fixed"]


def _kind(cfg: DynSplitConfig, decode: bool = False) -> int:
    """A block entry's identity (``DynSplitConfig.block_identity``) as a 62-bit integer."""
    return hash(cfg.block_identity(decode)) & 0x3FFFFFFFFFFFFFFF


@dataclass(eq=False)
class RowBlocks:
    store: BlockStore
    req_to_token: torch.Tensor
    key_buffer: Callable[[int], torch.Tensor]
    vocab_masks: dict[str, torch.Tensor]
    kernels: Kernels
    first_compressed: int
    num_scored: int  # layers whose queries vote
    stats: Counter
    rows: dict[int, RowState] = field(default_factory=dict)
    # Where entries no request can reach are found again when the store runs short (reclaim.py):
    # the allocator's free slots, and the request rows SGLang holds.
    free_slot_ids: Callable[[], torch.Tensor] | None = None
    live_rows: Callable[[], set] | None = None

    def __post_init__(self) -> None:
        store = self.store  # token id per slot, for the candidate flags
        self.token = torch.zeros(store.votes.shape[0], dtype=torch.int64, device=store.device)

    def begin(self, batch: BatchView, default: DynSplitConfig) -> list[RowState]:
        """The state of every request of this forward (new requests adopt their shared prefix).
        The forward's slots are written anew: what the store keyed by them goes first."""
        self.store.invalidate_slots(batch.out_cache_loc)
        self.token[batch.out_cache_loc.long()] = batch.input_ids.long()
        return [self._row_state(batch, i, default) for i in range(len(batch.rows))]

    def _row_state(self, b: BatchView, i: int, default: DynSplitConfig) -> RowState:
        row, gen = b.rows[i], b.generations[i]
        st = self.rows.get(row)
        if st is not None and st.generation == gen:
            return st
        if st is not None:  # the row was reused by a new request
            self.store.release_entries(st.local)
        self.store.clear_row(row)
        cfg = b.configs[i] if b.configs and b.configs[i] is not None else default
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
        if p == 0 or not st.cfg.strategy_impl.has_blocks:
            return
        s = self.store
        slots = self.req_to_token[row, :p].long()
        ends = torch.nonzero(s.end_entry[slots] >= 0).flatten().tolist()
        kinds = (_kind(st.cfg), _kind(st.cfg, decode=True))
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
                  and int(s.e_kind[e]) in kinds
                  and int(s.e_start_slot[e]) == int(slots[expect]))
            if not ok:
                break
            adopted.append((expect, e_pos - expect + 1, e))
            expect = e_pos + 1
        if adopted and self._fits(st, len(adopted)):
            starts, lens, ents = zip(*adopted)
            self._append_row(st, row, list(starts), list(lens), list(ents))
            st.next_start = expect
            st.reused = len(adopted)
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

    def commit_votes(self, st: RowState, row: int, q_start: int, votes: torch.Tensor) -> None:
        """Votes for own slots go to the store; votes for shared candidates stay with the row."""
        n, wf = votes.shape
        if n == 0 or not st.cfg.strategy_impl.needs_votes:
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
        cnt = voted.sum(1) * self.num_scored
        s = (v * voted).sum(1) / cnt.clamp(min=1)
        return torch.where(cnt > 0, s, torch.full_like(s, float("-inf")))

    def segment(self, st: RowState, row: int, length: int, complete: bool) -> None:
        """Finalise the row's blocks up to `length` (only the settled ones unless complete)."""
        cfg, lo = st.cfg, st.next_start
        strategy = cfg.strategy_impl
        if not strategy.has_blocks or lo >= length or st.fallback:
            return
        scores = cands = None
        mode = strategy.candidate_mode(cfg)
        if mode is not None:
            ids = torch.zeros(length, dtype=torch.int64, device=self.token.device)
            ids[lo:] = self.token[self.req_to_token[row, lo:length].long()]
            cands = candidates_for(ids, self.vocab_masks[mode])
        if strategy.needs_votes:
            scores = torch.zeros(length, device=self.store.votes.device)
            scores[lo:] = self._scores(st, row, lo, length)
        seg = strategy.segment(cfg, length, scores, cands, start=lo, complete=complete)
        self._add_segmentation(st, row, seg, length, _kind(cfg))

    def advance_decode(self, st: RowState, row: int, cached: int) -> None:
        """Close the prompt on the first decode step, then freeze generated tokens into blocks."""
        if not st.prompt_done:
            self.segment(st, row, cached, complete=True)
            st.prompt_done = True
        if not st.cfg.strategy_impl.has_blocks or st.fallback or st.next_start >= cached:
            return
        # Fixed blocks of C whatever the strategy: a generated token is never a split decision.
        seg = _FIXED.segment(st.cfg, cached, start=st.next_start, complete=False)
        self._add_segmentation(st, row, seg, cached, _kind(st.cfg, decode=True))

    def _add_segmentation(self, st, row, seg: Segmentation, known: int, kind: int) -> None:
        if seg.ends.numel() == 0:
            return
        self._add_blocks(st, row, seg.starts.tolist(), seg.lengths.tolist(),
                         seg.horizons.tolist(), known, kind)
        st.next_start = seg.next_start

    def restore(self, st: RowState, row: int, blocks: list, slots: torch.Tensor,
                pos: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Blocks recalled from the cold tier into `slots` (positions `pos`; runtime/cold.py):
        the slots take their token ids, and the blocks inside the part this row adopted from
        the radix tree (before next_start, where they were gaps) are entries again, split as
        they were and registered under their new end slots, so a later turn adopts them. Past
        next_start the row splits its own blocks anyway (the recalled votes are there)."""
        self.token[slots.long()] = token_ids.to(self.token.device)
        inside = [(p, n, split) for p, n, split in blocks if p + n <= st.next_start]
        if not inside or st.fallback or not st.cfg.strategy_impl.has_blocks:
            return
        starts, lens, splits = zip(*inside)
        self._add_blocks(st, row, list(starts), list(lens), [x.horizon for x in splits],
                         [x.known for x in splits], [x.kind for x in splits], register_all=True)
        self.stats["blocks_recalled"] += len(inside)
        self._sort_row(st, row)

    def _sort_row(self, st: RowState, row: int) -> None:
        """The row's table in position order (recalled blocks were appended at its end)."""
        s, n = self.store, st.nblocks
        order = torch.argsort(s.row_start[row, :n].long(), stable=True)
        for t in (s.row_start, s.row_len, s.row_entry):
            t[row, :n] = t[row, :n][order]

    def _add_blocks(self, st, row, starts, lens, horizon, known, kind,
                    register_all: bool = False) -> None:
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
        s.e_known[e] = torch.as_tensor(known, dtype=torch.int64, device=dev)
        s.e_kind[e] = torch.as_tensor(kind, dtype=torch.int64, device=dev)
        table = BlockTable(st_t[None].int(), ln_t[None].int())
        keys = [self.key_buffer(self.first_compressed + li) for li in range(s.center.shape[0])]
        self.kernels.block_summaries_layers(keys, row_slots[None], table, s.center, s.radius,
                                            e[None], max(lens), st.cfg.summary_spread)
        end_pos = st_t + ln_t - 1
        owned = torch.ones_like(end_pos, dtype=torch.bool) if register_all \
            else end_pos >= st.shared_len
        s.end_entry[row_slots[end_pos[owned]].long()] = e[owned].int()
        st.local.extend(e[~owned].tolist())
        self._append_row(st, row, starts, lens, ents)
        self.stats["blocks_built"] += n
