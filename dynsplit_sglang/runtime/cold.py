"""Eviction that a later turn can undo (``--dynsplit-evict-tier host``, issue 38).

``move_out``: the blocks eviction frees go to the cold tier (``tier.py``) with everything a
block needs to come back as it was: its K/V in every layer, its slots' votes and key heat, and
its entry's split (kind, horizon, what was known when it was decided).

``recall``: a request that extends an evicted prompt through the radix tree (a conversation's
next turn) finds the evicted positions of its own part (slot 0 in its row) in the tier by their
prefix keys, and, at its first extend, brings every whole block it finds back into fresh pool
slots before the forward runs. So the new turn's prompt is attended densely over everything the
conversation had, and the prompt's end decides again, with the new question's window, what the
row keeps: the blocks the old question dropped compete with the ones it kept. The radix tree's
copy of the row is revised (both ways: 0 to a slot for what came back, a slot to 0 for what goes
out again) after the forward, as eviction's is.

Recall needs free slots: it brings back what the allocator can give (whole blocks, latest
positions first) and counts the rest (``tier_recall_short``). Decode steps do not recall (a
block that only a later decode step would want stays cold); docs/design.md says why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .tier import ColdTier, prefix_keys


@dataclass
class ColdRow:
    """A request's evicted positions that the tier holds, found at its first extend."""

    keys: torch.Tensor  # position keys of its evicted positions
    pos: torch.Tensor  # those positions, ascending
    blocks: list  # the tier's whole blocks among them: (block id, first position, length)
    token_ids: list  # the request's tokens through its prefix

    @property
    def tokens(self) -> int:
        return sum(n for _, _, n in self.blocks)


@dataclass(frozen=True)
class BlockSplit:
    """What a block's entry said about its split, kept with it in the tier."""

    kind: int
    horizon: int
    known: int


@dataclass(eq=False)
class ColdLink:
    tier: ColdTier
    # Every layer's K and V buffers of the pool (lists, layer order).
    kv_buffers: Callable[[], tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]
    alloc_slots: Callable[[int], torch.Tensor | None]  # the KV allocator's alloc
    available_slots: Callable[[], int]
    stats: Counter
    # Publishes the counters (the compressor's reporter): a flush or a node leaving the tree
    # happens between forwards, which otherwise publish them.
    publish: Callable[[], None] | None = None

    def keys(self, token_ids: Sequence[int], length: int) -> torch.Tensor:
        return prefix_keys(torch.as_tensor(list(token_ids[:length]), dtype=torch.int64))

    def move_out(self, keys: torch.Tensor, slots: torch.Tensor, lens: Sequence[int],
                 aux: torch.Tensor, splits: Sequence[BlockSplit]) -> None:
        """Blocks about to be freed: `slots` and their position keys, block after block."""
        k, v = self.kv_buffers()
        self.tier.put(keys, slots, k, v, lens=lens, aux=aux, meta=splits)
        self._sync()

    def find_blocks(self, keys: torch.Tensor, pos: torch.Tensor) -> list[tuple[int, int, int]]:
        """Of evicted positions `pos` (ascending) with their keys: the tier's blocks held whole
        and contiguous among them, as (block id, first position, length), latest first."""
        bids = self.tier.locate(keys)
        where = Counter(b for b in bids if b >= 0)
        first: dict[int, int] = {}
        for p, b in zip(pos.tolist(), bids):
            if b >= 0 and b not in first:
                first[b] = p
        out = [(b, first[b], n) for b, n in where.items()
               if n == self.tier.size(b)
               and int(pos[(pos >= first[b]) & (pos < first[b] + n)].numel()) == n]
        return sorted(out, key=lambda t: -t[1])

    def bring_back(self, keys: torch.Tensor, pos: torch.Tensor,
                   blocks: list[tuple[int, int, int]]):
        """Recall `blocks` (from ``find_blocks``; as many as the free slots allow, in order):
        (positions, their new slots, aux [n, aux_width], [(start, len, BlockSplit)]) or None."""
        free, take = self.available_slots(), []
        for b in blocks:
            if b[2] > free:
                self.stats["tier_recall_short"] += 1
                self.stats["tier_tokens_recall_short"] += b[2]
                continue
            take.append(b)
            free -= b[2]
        if not take:
            return None
        take.sort(key=lambda t: t[1])
        got = torch.cat([torch.arange(s, s + n) for _, s, n in take])
        splits = [(s, n, self.tier.meta(b)) for b, s, n in take]
        sel = torch.searchsorted(pos, got)
        slots = self.alloc_slots(int(got.numel()))
        if slots is None:
            self.stats["tier_recall_short"] += len(take)
            self.stats["tier_tokens_recall_short"] += int(got.numel())
            return None
        k, v = self.kv_buffers()
        aux = self.tier.load(keys[sel], slots, k, v)
        self._sync()
        return got, slots, aux, splits

    # -- what the radix tree tells (runtime/hooks.py tree_listeners) ----------------------------

    def flushed(self) -> None:
        self.tier.clear("flushed")
        self._sync(publish=True)

    def dropped(self, token_ids: Sequence[int], positions: Sequence[int]) -> None:
        """A tree node whose evicted `positions` these are has gone: no request can reach
        their blocks any more."""
        if positions:
            keys = self.keys(token_ids, max(positions) + 1)[torch.as_tensor(positions)]
            self.tier.forget(keys, "unreachable")
            self._sync(publish=True)

    def _sync(self, publish: bool = False) -> None:
        self.stats["tier_bytes_held"] = self.tier.bytes_held
        if publish and self.publish is not None:
            self.publish()

    def find_row(self, r2t: torch.Tensor, row: int, lo: int, hi: int, token_ids):
        """The tier's whole blocks among the evicted positions [lo, hi) of a row: a ColdRow,
        or None when there are none."""
        if hi <= lo:
            return None
        pos = torch.nonzero(r2t[row, lo:hi] == 0).flatten().cpu() + lo
        if pos.numel() == 0:
            return None
        keys = self.keys(token_ids, hi)[pos]
        found = self.find_blocks(keys, pos)
        return ColdRow(keys, pos, found, list(token_ids[:hi])) if found else None

    def keys_at(self, cold: "ColdRow", layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, their keys in `layer` [n, Hkv, D]) of a row's cold blocks, read from
        the tier (the window ranks them without bringing them back)."""
        self.prune(cold)
        if not cold.blocks:
            return torch.empty(0, dtype=torch.long), self.tier.data[:0, 0, layer]
        got = torch.cat([torch.arange(s, s + n) for _, s, n in cold.blocks])
        sel = torch.searchsorted(cold.pos, got)
        rows = self.tier.find(cold.keys[sel])
        return got, self.tier.data[rows, 0, layer]

    def prune(self, cold: "ColdRow") -> None:
        """Forget the blocks the tier no longer holds (dropped by its cap, a flush or the tree
        since the row found them: a block id is never reused)."""
        cold.blocks = [b for b in cold.blocks if b[0] in self.tier.blocks]

    def recall_row(self, blocks, st, row: int, lo: int, hi: int, token_ids) -> int:
        """Bring back the tier's whole blocks among the evicted positions [lo, hi) of a row
        (`blocks`: the compressor's RowBlocks; `token_ids`: the request's, through hi at least).
        Returns the tokens recalled."""
        cold = self.find_row(blocks.req_to_token, row, lo, hi, token_ids)
        return 0 if cold is None else self.recall_blocks(blocks, st, row, cold, cold.blocks)

    def recall_blocks(self, blocks, st, row: int, cold: "ColdRow", which: list) -> int:
        """Bring back `which` of a row's cold blocks (as many as the free slots allow)."""
        r2t = blocks.req_to_token
        token_ids = cold.token_ids
        got = self.bring_back(cold.keys, cold.pos, which) if which else None
        if got is None:
            return 0
        where, slots, aux, splits = got
        store, dev = blocks.store, r2t.device
        slots = slots.to(dev).long()
        store.invalidate_slots(slots)  # a slot handed out again: nothing stale keyed by it
        wf = store.votes.shape[1]
        store.votes[slots] = aux[:, :wf].to(dev)
        if store.heat.numel():
            store.heat[slots] = aux[:, wf].to(dev)
        r2t[row, where.to(dev)] = slots.to(r2t.dtype)
        ids = torch.as_tensor(token_ids, dtype=torch.int64)[where]
        blocks.restore(st, row, splits, slots, where, ids)
        st.tier_in += int(where.numel())
        return int(where.numel())
