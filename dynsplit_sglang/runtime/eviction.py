"""Which settled blocks a request gives back to the KV pool, and attention that skips them.

A block's importance is the most distinctive of its keys (core.key_distinctiveness: how far a
key points from the mean key direction of its extend, averaged over KV heads, the max over the
scored layers): query-agnostic, so a prefix compressed once is right for every request that later
shares it. The least important blocks go first, whole, until the excess is covered.

An evicted position keeps its place in the sequence and points at SGLang's padding slot 0, which
every attention path of this package skips (``Evictor.attend_kept`` for the layers and steps that
attend densely).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from ..core import key_distinctiveness
from ..kernels import Kernels
from .state import RowState, StepState
from .store import BlockStore


def block_heat(token_heat: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Max of token_heat [T] over each block [starts, starts + lens) (lens > 0): float32 [N]."""
    width = int(lens.max())
    offs = torch.arange(width, device=starts.device)
    pos = starts[:, None] + offs[None, :]
    inside = offs[None, :] < lens[:, None]
    vals = token_heat[pos.clamp(max=token_heat.numel() - 1)]
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

    def evict(self, st: RowState, row: int, cached: int, length: int) -> None:
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
