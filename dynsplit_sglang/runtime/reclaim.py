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


def _live_references(comp, live: set) -> torch.Tensor:
    s = comp.store
    refs = [s.row_entry[row, :st.nblocks] for row, st in comp.rows.items()
            if row in live and st.nblocks]
    return torch.cat(refs) if refs else s.row_entry.new_empty(0)


def reclaim(comp, need: int) -> int:
    """Give entries of `comp` (a Compressor) back to its store until `need` are free (or nothing
    more can go); return how many were given back."""
    s, n = comp.store, 0
    if comp.live_rows is None:
        return 0
    live = comp.live_rows()
    for row in [r for r in comp.rows if r not in live]:
        st = comp.rows.pop(row)
        s.release_entries(st.local)
        n += len(st.local)
    if len(s.free_entries) < need and comp.free_slot_ids is not None:
        free = comp.free_slot_ids()
        if free.numel():
            n += s.drop_registered(free.to(s.end_entry.device))
    short = need - len(s.free_entries)
    if short > 0:
        slots = torch.nonzero(s.end_entry >= 0).flatten()
        ents = s.end_entry[slots].long()
        idle = ~torch.isin(ents, _live_references(comp, live))
        slots, ents = slots[idle], ents[idle]
        # Latest first, and an eighth of the store beyond the need: not one reclaim per block.
        take = min(ents.numel(), short + s.e_start.numel() // 8)
        order = torch.argsort(s.e_start[ents], descending=True)[:take]
        n += s.drop_registered(slots[order])
    return n
