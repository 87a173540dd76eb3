"""Block metadata that lives with the KV pool, keyed by physical KV slot.

Radix sharing means requests with a common prefix read the *same physical slots*; metadata keyed
by slot is therefore shared for free and survives node splits (slots never move). Three kinds:

* per slot: its importance votes, one column per future offset j (the vote of the query j+1
  positions later). Keeping columns apart lets a request that shares a prefix take exactly the
  votes of the shared queries and add its own. With eviction, also its key's distinctiveness.
* per block: an entry (start position/slot, length, decision horizon, the sequence length
  known when it was decided, the segmentation it belongs to) and its key summary (a center and
  a radius, ``core.mapping``) for every compressed layer. A block is registered under its *end* slot only when that slot is owned by
  the request that decided it, so two requests never write the same key.
* per request row: the fixed-shape block table the decode plan indexes.

Invalidation: every slot handed out again (``out_cache_loc`` of a forward) loses its votes,
distinctiveness and registered block before the forward writes it; entries are recycled through
a free list. A cache flush needs nothing more: nothing matches in the tree afterwards, and each
stale entry goes when its slot is written again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SLOT_BYTES = 4 + 8  # end_entry (int32), the row blocks' token id (int64, runtime/rows.py)
_ENTRY_META_BYTES = 6 * 8  # e_start, e_len, e_start_slot, e_horizon, e_known, e_kind (int64)
_ROW_BYTES_PER_BLOCK = 4 + 4 + 8  # row_start, row_len (int32), row_entry (int64)


@dataclass(frozen=True)
class StoreGeometry:
    """Every size of a BlockStore, derived from the KV pool it serves; ``nbytes`` is exactly what
    it allocates (the per-slot token ids of ``RowBlocks`` included). The pool sizer
    (``patches/memory.py``) reserves these bytes from SGLang's KV budget with the same numbers."""

    num_slots: int
    max_rows: int
    max_blocks_per_row: int
    max_entries: int
    compressed_layers: int
    kv_heads: int
    head_dim: int
    future_window: int
    dtype_size: int
    track_heat: bool = False

    @classmethod
    def for_pool(cls, cfg, num_layers: int, kv_heads: int, head_dim: int, dtype_size: int,
                 num_slots: int, max_rows: int, max_context: int) -> "StoreGeometry":
        """cfg: the server's DynSplitConfig; num_slots/max_rows/max_context: the K buffer's rows,
        req_to_token's rows and width."""
        min_len = cfg.min_block_len
        return cls(
            num_slots=num_slots,
            max_rows=max_rows,
            max_blocks_per_row=max_context // min_len + 4,
            max_entries=BlockStore.entry_capacity(num_slots, max_rows, min_len),
            compressed_layers=num_layers - min(cfg.dense_layers, num_layers),
            kv_heads=kv_heads,
            head_dim=head_dim,
            future_window=cfg.future_window,
            dtype_size=dtype_size,
            track_heat=cfg.evict,
        )

    @property
    def entry_bytes(self) -> int:
        """One block: its entry and its summary (center and radius) in every compressed layer."""
        return (_ENTRY_META_BYTES
                + 2 * self.compressed_layers * self.kv_heads * self.head_dim * self.dtype_size)

    @property
    def slot_bytes(self) -> int:
        return _SLOT_BYTES + 4 * self.future_window + (4 if self.track_heat else 0)

    @property
    def nbytes(self) -> int:
        return (self.num_slots * self.slot_bytes + self.max_entries * self.entry_bytes
                + self.max_rows * self.max_blocks_per_row * _ROW_BYTES_PER_BLOCK)


class BlockStore:
    def __init__(
        self,
        num_slots: int,
        max_rows: int,
        max_blocks_per_row: int,
        max_entries: int,
        compressed_layers: int,
        kv_heads: int,
        head_dim: int,
        future_window: int,
        dtype: torch.dtype,
        device: torch.device | str,
        track_heat: bool = False,
    ) -> None:
        self.device = device
        # Eviction's importance per slot: its key's distinctiveness (core.key_distinctiveness),
        # the max over the scored layers.
        self.heat = torch.zeros(num_slots if track_heat else 0, dtype=torch.float32,
                                device=device)
        self.votes = torch.zeros(num_slots, future_window, dtype=torch.float32, device=device)
        self.end_entry = torch.full((num_slots,), -1, dtype=torch.int32, device=device)

        self.e_start = torch.zeros(max_entries, dtype=torch.int64, device=device)
        self.e_len = torch.zeros(max_entries, dtype=torch.int64, device=device)
        self.e_start_slot = torch.zeros(max_entries, dtype=torch.int64, device=device)
        self.e_horizon = torch.zeros(max_entries, dtype=torch.int64, device=device)
        self.e_known = torch.zeros(max_entries, dtype=torch.int64, device=device)
        self.e_kind = torch.zeros(max_entries, dtype=torch.int64, device=device)
        # Each block's summary per compressed layer (core.mapping): center and radius.
        self.center = torch.zeros(compressed_layers, max_entries, kv_heads, head_dim, dtype=dtype,
                                  device=device)
        self.radius = torch.zeros_like(self.center)
        self.free_entries: list[int] = list(range(max_entries - 1, -1, -1))

        self.row_start = torch.zeros(max_rows, max_blocks_per_row, dtype=torch.int32, device=device)
        self.row_len = torch.zeros_like(self.row_start)
        self.row_entry = torch.full((max_rows, max_blocks_per_row), -1, dtype=torch.int64,
                                    device=device)

    @classmethod
    def from_geometry(cls, g: StoreGeometry, dtype: torch.dtype, device) -> "BlockStore":
        return cls(g.num_slots, g.max_rows, g.max_blocks_per_row, g.max_entries,
                   g.compressed_layers, g.kv_heads, g.head_dim, g.future_window, dtype, device,
                   track_heat=g.track_heat)

    @property
    def nbytes(self) -> int:
        """Bytes this store's tensors hold (the row blocks' token ids not included)."""
        return sum(t.numel() * t.element_size() for t in vars(self).values()
                   if isinstance(t, torch.Tensor))

    @staticmethod
    def entry_capacity(num_slots: int, max_rows: int, min_block: int) -> int:
        """Entries for a pool of `num_slots`: every slot's own blocks, plus as many again for
        requests that split a shared prefix their own way (another strategy or geometry)."""
        return 2 * (num_slots // min_block) + 8 * max_rows + 64

    @property
    def max_blocks_per_row(self) -> int:
        return self.row_start.shape[1]

    # -- entries ----------------------------------------------------------------------------

    def alloc_entries(self, n: int) -> list[int] | None:
        if n > len(self.free_entries):
            return None
        # Ascending ids: a request's blocks become consecutive summary rows, which the CPU
        # scorer reads in place instead of gathering (kernels.cpu.summary_runs).
        out = self.free_entries[len(self.free_entries) - n:][::-1]
        del self.free_entries[len(self.free_entries) - n:]
        return out

    def release_entries(self, ids: list[int]) -> None:
        self.free_entries.extend(ids)

    def clear_row(self, row: int) -> None:
        """A new request takes this row: no block of the previous one may stay visible (a batch's
        table is as wide as its longest row)."""
        self.row_len[row] = 0
        self.row_entry[row] = -1

    # -- slots ------------------------------------------------------------------------------

    def drop_registered(self, slots: torch.Tensor) -> int:
        """Release the blocks registered at these slots, keeping the slots' votes (the blocks can
        be split again from them). Returns how many were released."""
        slots = slots.long()
        ents = self.end_entry[slots]
        dropped = ents[ents >= 0]
        if dropped.numel():
            self.release_entries(dropped.tolist())
            self.end_entry[slots] = -1
        return int(dropped.numel())

    def invalidate_slots(self, slots: torch.Tensor) -> int:
        """Forget everything keyed by these slots (they are being written anew). Returns the
        number of registered blocks dropped."""
        if slots.numel() == 0:
            return 0
        slots = slots.long()
        dropped = self.drop_registered(slots)
        self.votes[slots] = 0.0
        if self.heat.numel():
            self.heat[slots] = 0.0
        return dropped
