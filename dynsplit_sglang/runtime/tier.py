"""A cold tier for evicted blocks (issue 38; not served yet: docs/design.md, "The cold tier").

Eviction frees a block's KV slots for good. The tier keeps the block's K and V of every layer
outside SGLang's token pool (host memory; on this CPU host, the same memory), so that a later
query that needs the block can bring it back instead of finding it gone.

A position is found again by what it *is*, not where it was: its key is the hash of the token ids
from the sequence's start up to and including it (``prefix_keys``), the identity the radix tree
gives a position. A later request that shares the prefix (a next turn extending the conversation)
computes the same keys from its own token ids, whatever row and slots it has.

The tier holds whole blocks (a block is evicted and recalled whole) and has a byte cap: past it,
the least recently used blocks are dropped for good, counted. Counters: blocks and tokens moved
out, recalled and dropped, and the bytes held.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

# Two 31-bit polynomial hashes make one 62-bit key: a collision between two different prefixes
# of a few thousand tokens has a chance of about n^2 / 2^62.
_MODS = (2_147_483_647, 2_147_483_629)
_BASES = (1_000_003, 998_244_353 % 2_147_483_629)


def _powers(n: int, base: int, mod: int) -> torch.Tensor:
    """base^i mod mod for i < n, int64 (doubling: log n vectorised steps, no overflow)."""
    out = torch.ones(n, dtype=torch.int64)
    if n > 1:
        out[1] = base % mod
    filled = min(n, 2)
    while filled < n:
        step = min(filled, n - filled)
        # out[filled + i] = out[i] * base^filled; both factors < 2^31, the product < 2^62.
        out[filled:filled + step] = out[:step] * out[filled - 1] % mod * (base % mod) % mod
        filled += step
    return out


def prefix_keys(token_ids: torch.Tensor) -> torch.Tensor:
    """int64 [n]: key i identifies token_ids[: i + 1] (its tokens and their positions)."""
    ids = token_ids.to(torch.int64).cpu() + 1  # 0 is a token too
    n = ids.numel()
    key = torch.zeros(n, dtype=torch.int64)
    for mod, base in zip(_MODS, _BASES):
        # sum_j ids[j] * base^j, j <= i: every term < 2^31 * 2^31 is taken mod first, so the
        # running sum of n terms stays below n * 2^31 (no overflow below 2^32 tokens).
        terms = ids % mod * _powers(n, base, mod) % mod
        key = key * mod + torch.cumsum(terms, 0) % mod
    return key


@dataclass
class _Block:
    keys: list[int]
    host: torch.Tensor  # int64 [len]: its rows in the tier's buffers
    meta: object = None  # what the caller keeps with the block (its entry's split, say)


class ColdTier:
    """K/V of evicted blocks, every layer, keyed by position identity (``prefix_keys``), with
    ``aux_width`` floats per token besides (the block store's per-slot votes and heat)."""

    def __init__(self, max_bytes: int, layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, pin_memory: bool = False, aux_width: int = 0) -> None:
        row = 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        row += 4 * aux_width
        self.capacity = max(0, int(max_bytes) // row)  # tokens
        self.row_bytes = row
        shape = (self.capacity, 2, layers, kv_heads, head_dim)
        self.data = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        self.aux = torch.zeros(self.capacity, aux_width, dtype=torch.float32)
        self.free = list(range(self.capacity - 1, -1, -1))  # a stack: low rows first
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.where: dict[int, tuple[int, int]] = {}  # key -> (block id, offset)
        self.stats: Counter = Counter()
        self._next_id = 0

    @property
    def bytes_held(self) -> int:
        return (self.capacity - len(self.free)) * self.row_bytes

    def put(self, keys: torch.Tensor, slots: torch.Tensor,
            k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor],
            lens: Sequence[int] | None = None, aux: torch.Tensor | None = None,
            meta: Sequence | None = None) -> bool:
        """Move blocks out: the K/V of `slots` ([n] pool rows) in every layer's buffer
        ([slots, Hkv, D] each), under `keys` ([n], their positions' prefix keys), cut into
        blocks of `lens` (default: one block), with `aux` ([n, aux_width]) and one `meta` per
        block. Makes room by dropping the least recently used blocks. False when some block is
        larger than the whole tier (it is counted dropped; the others are kept)."""
        n = int(slots.numel())
        if n == 0:
            return True
        lens = [n] if lens is None else [int(x) for x in lens]
        meta = [None] * len(lens) if meta is None else list(meta)
        keys_l = [int(k) for k in keys.tolist()]
        for k in keys_l:  # the same positions moved out again (another request's copy)
            if k in self.where:
                self._forget(self.where[k][0], "replaced")
        ok, added, off = True, [], 0
        for m, info in zip(lens, meta):
            bkeys, src = keys_l[off:off + m], torch.arange(off, off + m)
            off += m
            if m > self.capacity:
                self._count("dropped", m)
                ok = False
                continue
            while len(self.free) < m:
                self._forget(next(iter(self.blocks)), "dropped")
            host = torch.tensor([self.free.pop() for _ in range(m)], dtype=torch.int64)
            bid = self._next_id
            self._next_id += 1
            self.blocks[bid] = _Block(bkeys, host, info)
            for o, k in enumerate(bkeys):
                self.where[k] = (bid, o)
            added.append((bid, src))
            self._count("moved_out", m)
        # Blocks of this call that a later one pushed out again are not copied.
        kept = [(self.blocks[b].host, src) for b, src in added if b in self.blocks]
        if kept:
            host = torch.cat([h for h, _ in kept])
            src = torch.cat([s for _, s in kept])
            idx = slots.to(torch.int64)[src]
            for layer, (k, v) in enumerate(zip(k_layers, v_layers)):
                i = idx.to(k.device)
                self.data[host, 0, layer] = k[i].to(self.data.device, self.data.dtype)
                self.data[host, 1, layer] = v[i].to(self.data.device, self.data.dtype)
            if aux is not None and self.aux.shape[1]:
                self.aux[host] = aux[src.to(aux.device)].to(torch.float32).cpu()
        return ok

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """int64 [n]: the tier row holding each key's K/V, -1 where the tier has none."""
        rows = [self._row(int(k)) for k in keys.tolist()]
        return torch.tensor(rows, dtype=torch.int64)

    def locate(self, keys: torch.Tensor) -> list[int]:
        """The block holding each key, -1 where none (for ``whole`` and ``meta``)."""
        return [self.where.get(int(k), (-1,))[0] for k in keys.tolist()]

    def size(self, bid: int) -> int:
        return len(self.blocks[bid].keys)

    def meta(self, bid: int):
        return self.blocks[bid].meta

    def load(self, keys: torch.Tensor, slots: torch.Tensor,
             k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor],
             keep: bool = False) -> torch.Tensor:
        """Recall: write the K/V held under `keys` into pool rows `slots` of every layer, and
        return their aux floats ([n, aux_width]). A block all of whose keys are recalled leaves
        the tier unless `keep`; the others stay, marked used. KeyError for a key the tier does
        not hold (``find`` says which it holds)."""
        rows = self.find(keys)
        if bool((rows < 0).any()):
            raise KeyError(f"ColdTier.load: {int((rows < 0).sum())} of {rows.numel()} keys are "
                           "not held")
        idx = slots.to(torch.int64)
        for layer, (k, v) in enumerate(zip(k_layers, v_layers)):
            k[idx.to(k.device)] = self.data[rows, 0, layer].to(k.device, k.dtype)
            v[idx.to(v.device)] = self.data[rows, 1, layer].to(v.device, v.dtype)
        aux = self.aux[rows].clone()
        self._count("recalled", int(rows.numel()))
        loaded = Counter(self.where[int(k)][0] for k in keys.tolist())
        for bid, n in loaded.items():
            if keep or n < len(self.blocks[bid].keys):
                self.blocks.move_to_end(bid)
            else:
                self._forget(bid, None)
        return aux

    def forget(self, keys: torch.Tensor, why: str | None = None) -> None:
        """Drop the blocks holding any of these keys."""
        for bid in {self.where[int(k)][0] for k in keys.tolist() if int(k) in self.where}:
            self._forget(bid, why)

    def clear(self, why: str | None = None) -> None:
        """Drop every block (a cache flush: nothing can match them any more)."""
        for bid in list(self.blocks):
            self._forget(bid, why)

    def _row(self, key: int) -> int:
        found = self.where.get(key)
        return -1 if found is None else int(self.blocks[found[0]].host[found[1]])

    def _forget(self, bid: int, why: str | None) -> None:
        block = self.blocks.pop(bid)
        for k in block.keys:
            if self.where.get(k, (None,))[0] == bid:
                del self.where[k]
        self.free.extend(block.host.tolist()[::-1])
        if why is not None:
            self._count(why, len(block.keys))

    def _count(self, what: str, tokens: int) -> None:
        self.stats[f"tier_blocks_{what}"] += 1
        self.stats[f"tier_tokens_{what}"] += tokens

