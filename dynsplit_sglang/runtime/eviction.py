"""Which settled blocks a request gives back to the KV pool, and attention that skips them.

Two scopes (``DynSplitConfig.evict_scope``):

* ``prompt`` (the default): once the request's whole prompt is in, the blocks of its own part
  (past what other requests hold in the radix tree) compete together, ranked by the attention
  the prompt's last queries pay them (core.window_heat: SnapKV's observation window, so the
  question takes part), least attention per kept token first.
  With ``evict_hold`` h > 0 the prompt is also bounded while it is prefilled: after every
  chunk that does not end it, its own part keeps at most h times its budget at the length so
  far, blocks ranked by their most distinctive key (the question is not in yet), so a request
  alone peaks at about h x its budget plus one chunk instead of its whole prompt.
* ``chunk``: after every prefill chunk, among the chunk's new tokens, by the most distinctive of
  a block's keys (core.key_distinctiveness: query-agnostic, decided before the question exists,
  a lower peak).

An evicted position keeps its place in the sequence and points at SGLang's padding slot 0, which
every attention path of this package skips (``Evictor.attend_kept`` for the layers and steps that
attend densely).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from ..core import DynSplitConfig, key_distinctiveness, window_heat
from ..kernels import Kernels
from .cold import BlockSplit, ColdLink
from .state import RowState, StepState
from .store import BlockStore


def block_heat(token_heat: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
               mean: bool = False) -> torch.Tensor:
    """Max (or mean) of token_heat [T] over each block [starts, starts + lens) (lens > 0):
    float32 [N]. The mean is a block's attention per token it would keep: the order in which
    blocks fill a token budget (a greedy knapsack), not rewarding a long block for its length."""
    width = int(lens.max())
    offs = torch.arange(width, device=starts.device)
    pos = starts[:, None] + offs[None, :]
    inside = offs[None, :] < lens[:, None]
    vals = token_heat[pos.clamp(max=token_heat.numel() - 1)].float()
    if mean:
        return vals.masked_fill(~inside, 0.0).sum(dim=1) / lens.float()
    return vals.masked_fill(~inside, float("-inf")).amax(dim=1)


def pick_victims(heat: torch.Tensor, lens: torch.Tensor, excess: int) -> torch.Tensor:
    """Indices of the coldest blocks whose lengths first add up to >= excess (all of them if
    they never do). Ties go to the earlier block, so the choice is deterministic."""
    order = torch.sort(heat, stable=True).indices
    covered = torch.cumsum(lens[order], dim=0)
    take = int(torch.searchsorted(covered, torch.tensor(excess, device=covered.device))) + 1
    return order[: min(take, order.numel())]


@dataclass(eq=False)
class Evictor:
    """Eviction for one compressor (``--dynsplit-evict``): key importance, victims, kept-only
    decode."""

    store: BlockStore
    req_to_token: torch.Tensor
    kv_heads: int
    kernels: Kernels
    free_slots: Callable[[torch.Tensor], None]  # the KV allocator's free
    stats: Counter
    cold: ColdLink | None = None  # where freed blocks go (--dynsplit-evict-tier host)

    def note_keys(self, slots: torch.Tensor, keys: torch.Tensor, own_from: int) -> None:
        """Importance of this extend's own keys (positions from `own_from`) in one scored layer;
        slots/keys: the row's slots and their keys so far."""
        h = key_distinctiveness(keys[own_from:])
        own = slots[own_from:]
        self.store.heat[own] = torch.maximum(self.store.heat[own], h)

    def average_over_ranks(self, new_slots: torch.Tensor, all_reduce, tp_size: int) -> None:
        # Each rank scores its own KV heads: average, so every rank evicts alike.
        new = new_slots.long()
        self.store.heat[new] = all_reduce(self.store.heat[new]) / tp_size

    def window(self, acc: torch.Tensor | None, q: torch.Tensor, keys: torch.Tensor,
               q_start: int, slots: torch.Tensor, scale, cfg: DynSplitConfig,
               key_ok: torch.Tensor | None = None) -> torch.Tensor:
        """One scored layer of the prompt's last queries (q: this extend's, at q_start..; keys
        and slots: the row's so far; key_ok: which keys exist, default the live slots): their
        attention per position, maxed into acc."""
        w = min(cfg.evict_window, q.shape[0])
        h = window_heat(q[-w:], keys, q_start + q.shape[0] - w, scale,
                        key_ok=slots != 0 if key_ok is None else key_ok, pool=cfg.evict_pool)
        return h if acc is None else torch.maximum(acc, h)

    def evict(self, st: RowState, row: int, cached: int, length: int,
              keys: torch.Tensor | None = None) -> None:
        """Scope "chunk": free the least important settled blocks of this extend's new tokens
        until what the row keeps fits its budget at this length, sink and recent window
        excepted.

        Only positions past `cached` (what the radix tree held before this forward): nobody
        else can reference them yet, and the tree stores them as they are after this forward
        (SGLang inserts a chunk once it has run). A shared prefix was thereby decided once, by
        its owner, from the prefix alone; earlier chunks are not revisited."""
        picked = self._candidates(st, row, max(cached, st.shared_len), length,
                                  st.cfg.token_budget(length))
        if picked is None:
            return
        cand, starts, lens, slots, excess = picked
        heat = block_heat(self.store.heat[slots.long()], starts[cand], lens[cand])
        self._drop(st, row, cand[pick_victims(heat, lens[cand], excess)], starts, lens, slots,
                   keys)

    def evict_prompt(self, st: RowState, row: int, owned_from: int, length: int,
                     heat: torch.Tensor, hold: float = 1.0, mean: bool = True,
                     keys: torch.Tensor | None = None) -> int | None:
        """Scope "prompt", at the end of the prompt: free the blocks of the request's own part
        ([owned_from, length), sink and recent window excepted) with the least window attention
        per token (`heat` per position; mean=False: a block's most important token) until the
        row fits `hold` times its budget at this length. Returns the first position freed
        (None: none).

        Earlier chunks of this prompt are in the radix tree already, in nodes only this request
        holds (owned_from is past every node another holder locks): the tree's copy of them is
        revised before anyone can match it (patches/eviction.py)."""
        # What the tree matched stays as it is, unless a cold tier lets a next turn decide again
        # over its whole own part (what it drops can come back).
        lo = owned_from if self.cold is not None else max(owned_from, st.shared_len)
        # The shared part is stored once for all its holders: the own part is allowed at least
        # its own budget, as if it stood alone (else a long system prompt would leave nothing).
        own_len = length - lo
        budget = lambda n: int(hold * st.cfg.token_budget(n))  # noqa: E731
        picked = self._candidates(st, row, lo, length, budget(length),
                                  floor=budget(own_len) if own_len > 0 else 0)
        if picked is None:
            return None
        cand, starts, lens, slots, excess = picked
        score = block_heat(heat, starts[cand], lens[cand], mean=mean)
        victims = cand[pick_victims(score, lens[cand], excess)]
        first = int(starts[victims].min())
        self._drop(st, row, victims, starts, lens, slots, keys)
        return first

    def rank_with_cold(self, st: RowState, row: int, owned_from: int, length: int,
                       heat: torch.Tensor, cold, keys: torch.Tensor | None = None):
        """Scope "prompt" with a cold tier and evict_hold (runtime/cold.py): at the prompt's
        end the own part's blocks in the pool and its blocks in the tier (``cold.blocks``,
        ranked by the same window, their keys read from the tier) compete for the budget.
        Pool blocks that lose are freed (moved to the tier); tier blocks that win are returned
        for the caller to bring back into the slots just freed, so the row never holds more
        than it did. Returns (the first position freed or None, the winning tier blocks)."""
        cfg = st.cfg
        slots = self.req_to_token[row, :length]
        live = slots != 0
        held = int(live.sum())
        st.peak_held = max(st.peak_held, held)
        if st.fallback or st.nblocks == 0:
            return None, []
        lo, hi = max(owned_from, cfg.sink), length - cfg.recent
        cold_b = [b for b in cold.blocks if b[1] >= lo and b[1] + b[2] <= hi]
        extra = sum(n for _, _, n in cold_b)
        budget = cfg.token_budget
        own_len = length - owned_from
        excess = min(held + extra - budget(length),
                     int(live[owned_from:].sum()) + extra - (budget(own_len) if own_len else 0))
        if excess <= 0:
            return None, cold_b
        nb = st.nblocks
        starts, lens = self.store.row_start[row, :nb].long(), self.store.row_len[row, :nb].long()
        hot = torch.nonzero((lens > 0) & (starts >= lo) & (starts + lens <= hi)).flatten()
        dev = starts.device
        all_starts = torch.cat([starts[hot], torch.tensor([b[1] for b in cold_b], device=dev,
                                                          dtype=torch.long)])
        all_lens = torch.cat([lens[hot], torch.tensor([b[2] for b in cold_b], device=dev,
                                                      dtype=torch.long)])
        if all_lens.numel() == 0:
            return None, []
        score = block_heat(heat, all_starts, all_lens, mean=True)
        lost = set(pick_victims(score, all_lens, excess).tolist())
        n_hot = hot.numel()
        victims = hot[[j for j in range(n_hot) if j in lost]]
        winners = [b for j, b in enumerate(cold_b) if n_hot + j not in lost]
        first = None
        if victims.numel():
            first = int(starts[victims].min())
            self._drop(st, row, victims, starts, lens, slots, keys)
        return first, winners

    def hold_prompt(self, st: RowState, row: int, owned_from: int, length: int,
                    keys: torch.Tensor | None = None) -> int | None:
        """Scope "prompt" with evict_hold, at the end of a chunk before the prompt's: the own
        part so far keeps at most evict_hold times its budget at this length, blocks ranked by
        their most distinctive key (noted per chunk, query-agnostic: the question is not in
        yet; the chunk's own last queries, tried instead, lost the needles, docs/design.md).
        The prompt's end then decides among what is held with the question's window."""
        heat = self.store.heat[self.req_to_token[row, :length].long()]
        return self.evict_prompt(st, row, owned_from, length, heat, st.cfg.evict_hold,
                                 mean=False, keys=keys)

    def _candidates(self, st: RowState, row: int, lo: int, length: int, keep: int,
                    floor: int = 0):
        """The row's whole blocks in [lo, length - recent) past the sink, if it keeps more than
        `keep` slots (and its part from lo more than `floor`): (candidate block indices, starts,
        lens, the row's slots, excess tokens)."""
        cfg, s = st.cfg, self.store
        slots = self.req_to_token[row, :length]
        live = slots != 0
        held = int(live.sum())
        # The row's peak while it prefills: every eviction decision passes here before freeing.
        st.peak_held = max(st.peak_held, held)
        if st.fallback or st.nblocks == 0:
            return None
        excess = held - keep
        if floor:
            excess = min(excess, int(live[lo:].sum()) - floor)
        if excess <= 0:
            return None
        nb = st.nblocks
        starts, lens = s.row_start[row, :nb].long(), s.row_len[row, :nb].long()
        lo, hi = max(lo, cfg.sink), length - cfg.recent
        cand = torch.nonzero((lens > 0) & (starts >= lo) & (starts + lens <= hi)).flatten()
        return None if cand.numel() == 0 else (cand, starts, lens, slots, excess)

    def _drop(self, st: RowState, row: int, victims, starts, lens, slots,
              keys: torch.Tensor | None = None) -> None:
        """Free the victim blocks' slots: slot 0 in the row, entries and registrations gone.
        With a cold tier and the row's position keys, the blocks go there first."""
        s = self.store
        width = int(lens[victims].max())
        offs = torch.arange(width, device=starts.device)
        pos = starts[victims, None] + offs[None, :]
        pos = pos[offs[None, :] < lens[victims, None]]  # block after block, in victims' order
        freed = slots[pos].long()
        if self.cold is not None and keys is not None:
            self._move_out(st, row, victims, lens, pos, freed, keys)
        self.req_to_token[row, pos] = 0
        s.invalidate_slots(freed)  # releases the victims' entries (registered at their end slot)
        s.row_len[row, victims] = 0
        s.row_entry[row, victims] = -1
        self.free_slots(freed)
        self.stats["slots_evicted"] += int(freed.numel())
        self.stats["blocks_evicted"] += int(victims.numel())

    def _move_out(self, st, row, victims, lens, pos, freed, keys) -> None:
        s = self.store
        ents = s.row_entry[row, victims].tolist()
        splits = [BlockSplit(int(s.e_kind[e]), int(s.e_horizon[e]), int(s.e_known[e]))
                  for e in ents]
        aux = s.votes[freed]
        if s.heat.numel():
            aux = torch.cat([aux, s.heat[freed, None]], dim=1)
        self.cold.move_out(keys[pos.cpu()], freed, lens[victims].tolist(), aux, splits)
        st.tier_out += int(freed.numel())

    def attend_kept(self, step: StepState, q, k_buffer, v_buffer, scale) -> torch.Tensor:
        """Dense decode over the positions that still have K/V (built once per step)."""
        if step.kept is None:
            b = step.batch
            dev = self.req_to_token.device
            rows = torch.tensor(b.rows, dtype=torch.long, device=dev)
            seq = torch.tensor(b.seq_lens, device=dev)
            t = self.req_to_token[rows, : max(b.seq_lens)].long()
            ok = (torch.arange(t.shape[1], device=dev)[None, :] < seq[:, None]) & (t != 0)
            # Valid entries first: the Triton kernel stops at each list's count.
            order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices
            t = torch.gather(torch.where(ok, t, -1), 1, order)
            h = self.kv_heads
            step.kept = (t[:, None, :].expand(-1, h, -1).contiguous(),
                         ok.sum(1)[:, None].expand(-1, h).contiguous())
        slots, counts = step.kept
        return self.kernels.sparse_decode_attention(q, k_buffer, v_buffer, slots, scale,
                                                    counts=counts)
