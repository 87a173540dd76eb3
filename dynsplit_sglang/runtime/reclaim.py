"""Block-store entries given back when the store runs short, so that dense fallback takes more
live blocks than the store holds, not an accumulation of dead ones.

In order, until enough are free:
1. the private entries (``RowState.local``) of request rows SGLang has freed;
2. entries registered at KV slots the allocator has taken back (a free slot is in no row and no
   radix-tree node: nothing can match the block it ends);
3. idle registered entries: blocks of cached prefixes that no live row's table references, the
   latest positions first (a prefix's chain stays adoptable from position 0 as far as it goes).
   They are a cache: a request that later shares the prefix splits the rest again from the
   slots' stored votes, exactly as the dropped blocks were split, and keeps those blocks private.
Live rows then hold at most their own positions over the shortest block, plus a few tail and
straddling blocks each, while the store has twice the slots over the shortest block plus eight
per row (``BlockStore.entry_capacity``). What can still exhaust it: many live requests that
each split a long shared prefix their own way (per-request strategy or geometry overrides);
they attend densely, counted as ``fallback_rows_store``.
"""

from __future__ import annotations

import torch


def _live_references(blocks, live: set) -> torch.Tensor:
    s = blocks.store
    refs = [s.row_entry[row, :st.nblocks] for row, st in blocks.rows.items()
            if row in live and st.nblocks]
    return torch.cat(refs) if refs else s.row_entry.new_empty(0)


def reclaim(blocks, need: int) -> int:
    """Give entries back to the store of `blocks` (a RowBlocks) until `need` are free (or nothing
    more can go); return how many were given back."""
    s, n = blocks.store, 0
    if blocks.live_rows is None:
        return 0
    live = blocks.live_rows()
    for row in [r for r in blocks.rows if r not in live]:
        st = blocks.rows.pop(row)
        s.release_entries(st.local)
        n += len(st.local)
    if len(s.free_entries) < need and blocks.free_slot_ids is not None:
        free = blocks.free_slot_ids()
        if free.numel():
            n += s.drop_registered(free.to(s.end_entry.device))
    short = need - len(s.free_entries)
    if short > 0:
        slots = torch.nonzero(s.end_entry >= 0).flatten()
        ents = s.end_entry[slots].long()
        idle = ~torch.isin(ents, _live_references(blocks, live))
        slots, ents = slots[idle], ents[idle]
        # Latest first, and an eighth of the store beyond the need: not one reclaim per block.
        take = min(ents.numel(), short + s.e_start.numel() // 8)
        order = torch.argsort(s.e_start[ents], descending=True)[:take]
        n += s.drop_registered(slots[order])
    return n
