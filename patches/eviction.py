"""The radix cache and allocator side of ``--dynsplit-evict`` (SGLang 0.5.23).

Eviction writes SGLang's padding slot 0 into ``req_to_token`` for the positions whose K/V it
freed, so the radix tree stores those zeros like any slot value: a later request matching the
prefix receives it compressed, node splits slice the zeros with the rest. Two things must then
count KV *slots* rather than tree positions:

* the allocator must never take slot 0 back (the tree frees node values that contain it);
* the tree's ``evictable_size`` / ``protected_size`` feed admission (free + evictable) and the
  idle leak invariant (free + evictable == total), so they leave the zeros out, and ``evict``
  keeps going until it has freed the slots it was asked for, not the positions.

Registry entry (not a HookRegistry target): ``sglang.srt.mem_cache.registry.
register_radix_cache_backend("dynsplit-evict", ...)``, SGLang's own plugin point for tree caches;
``--dynsplit-evict`` selects it (``--radix-cache-backend dynsplit-evict``). It builds the classic
``sglang.srt.mem_cache.radix_cache.RadixCache`` with the accounting below: the default
``UnifiedRadixCache`` keeps its sizes in per-component ledgers this plugin does not reach.
``MASK_EVICTED`` makes the torch_native extend patch (``native_extend``) attend to live keys only
(set by the attention backend factory when the server's settings ask for eviction).

Whole-prompt eviction (``evict_scope`` "prompt") also reads, in SGLang 0.5.23, ``Req.last_node``
(the node a request locks), ``Req.full_untruncated_fill_ids`` (where its prompt ends; with the
cold tier, its token ids) and
``TreeNode.parent`` / ``.value`` / ``.lock_ref`` (``prompt_ownership``), and writes node values
and the tree's ``protected_size_`` / ``evictable_size_`` (``SlotCountingRadixCache.revise``).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from dynsplit_sglang.runtime import hooks

NAME = "dynsplit-evict"
TARGET = f"sglang.srt.mem_cache.registry.register_radix_cache_backend({NAME!r})"


def _zeros(node) -> int:
    """Evicted positions in a node's value (cached per value tensor: splits replace it)."""
    value = getattr(node, "value", None)
    if value is None:
        return 0
    cached = getattr(node, "_dynsplit_zeros", None)
    if cached is not None and cached[0] is value:
        return cached[1]
    n = int((value == 0).sum())
    node._dynsplit_zeros = (value, n)
    return n


def _path(cache, node, lock_ref: int) -> list:
    """Nodes from `node` to the root whose lock count is `lock_ref` (the ones a lock change
    moves between evictable and protected)."""
    out = []
    while node is not None and node is not cache.root_node:
        if node.lock_ref == lock_ref:
            out.append(node)
        node = node.parent
    return out


def _tree_path(node) -> list:
    """The nodes from the root's child down to `node`."""
    out = []
    while node is not None and node.parent is not None:
        out.append(node)
        node = node.parent
    return out[::-1]


def _token_list(node) -> list:
    """A node's token ids (``TreeNode.key``: a ``RadixKey`` with ``token_ids``, SGLang 0.5.23)."""
    key = node.key
    ids = key.raw_token_ids() if hasattr(key, "raw_token_ids") else key
    return list(ids)[: len(node.value)]


def prompt_ownership(req, seq_len: int) -> tuple[bool, int]:
    """For an extend of SGLang's ``Req`` that ends at seq_len: (whether it ends the prompt, the
    first position that is the request's own).

    Own: past the deepest node of its tree path (``req.last_node``, the node it locks) that
    another holder locks too (lock_ref > 1). SGLang matches the tree when it schedules, before
    the forward, and a scheduled request locks what it matched; so a position past that node
    is referenced by this request alone for as long as this forward runs, and a request that
    matches it later finds the tree's copy, revised before the next scheduling round
    (``checkpoint``)."""
    final = seq_len >= len(req.full_untruncated_fill_ids)
    n = owned = 0
    for node in _tree_path(getattr(req, "last_node", None)):
        n += len(node.value)
        if node.lock_ref > 1:
            owned = n
    return final, owned


def _drop_padding_slot(free):
    def free_live(free_index: torch.Tensor):
        if free_index.numel():
            free_index = free_index[free_index != 0]
        return free(free_index)

    free_live.__dynsplit_wraps__ = free
    return free_live


def _cache_class():
    from sglang.srt.mem_cache.radix_cache import RadixCache

    class SlotCountingRadixCache(RadixCache):
        """SGLang's RadixCache with evictable/protected sizes in KV slots."""

        def inc_lock_ref(self, node):
            moving = _path(self, node, 0)
            result = super().inc_lock_ref(node)
            z = sum(_zeros(n) for n in moving)
            self.evictable_size_ += z
            self.protected_size_ -= z
            if z and result.delta is not None:
                result = dataclasses.replace(result, delta=result.delta + z)
            return result

        def dec_lock_ref(self, node, params=None):
            moving = _path(self, node, 1)
            result = super().dec_lock_ref(node, params)
            z = sum(_zeros(n) for n in moving)
            self.evictable_size_ -= z
            self.protected_size_ += z
            if z and result.delta is not None:
                result = dataclasses.replace(result, delta=result.delta - z)
            return result

        def _insert_helper(self, *args, **kwargs):
            before = self.evictable_size_
            prefix_len, node = super()._insert_helper(*args, **kwargs)
            if self.evictable_size_ > before:  # a new leaf (the node returned) was added
                self.evictable_size_ -= _zeros(node)
            return prefix_len, node

        def _delete_leaf(self, node):
            gone = _zeros(node)
            if gone and hooks.tree_listeners:  # its evicted positions are unreachable now
                path = _tree_path(node)
                tokens = [t for n in path for t in _token_list(n)]
                start = len(tokens) - len(node.value)
                pos = (torch.nonzero(node.value == 0).flatten() + start).tolist()
                for listener in hooks.tree_listeners:
                    listener.dropped(tokens, pos)
            super()._delete_leaf(node)
            self.evictable_size_ += gone

        def reset(self, *args, **kwargs):
            super().reset(*args, **kwargs)
            for listener in hooks.tree_listeners:  # a flush: nothing matches any more
                listener.flushed()

        def revise(self, req, row: torch.Tensor):
            """Copy what eviction and recall changed in the request's row (`row`: its slots)
            into its tree path. Evicted positions were freed, so a later match must get the
            padding slot, not a slot the allocator hands out again; recalled ones (the cold
            tier) hold new slots, which the tree now owns. The sizes follow in slots."""
            off = 0
            for node in _tree_path(getattr(req, "last_node", None)):
                n = len(node.value)
                now = row[off:off + n].to(node.value.device, node.value.dtype)
                gone = (now == 0) & (node.value != 0)
                back = (now != 0) & (node.value == 0)
                delta = int(back.sum()) - int(gone.sum())
                if bool(gone.any()) or bool(back.any()):
                    node.value[gone] = 0
                    node.value[back] = now[back]
                    node._dynsplit_zeros = None
                    if node.lock_ref > 0:
                        self.protected_size_ += delta
                    else:
                        self.evictable_size_ += delta
                off += n

        def evict(self, params):
            # The parent counts positions evicted; zeros among them freed nothing.
            alloc = self.token_to_kv_pool_allocator
            want, freed = params.num_tokens, 0
            while True:  # ends: every pass removes leaves, or finds none
                before = alloc.available_size()
                result = super().evict(dataclasses.replace(params, num_tokens=want - freed))
                got = alloc.available_size() - before
                freed += got
                # A leaf of evicted positions only frees nothing: go on while leaves remain.
                if freed >= want or result.num_tokens_evicted == 0:
                    return dataclasses.replace(result, num_tokens_evicted=freed)

    return SlotCountingRadixCache


_LIVE: list = []  # the tree cache this process built (a weak reference), for revise_tree


def build(ctx):
    """The registered factory: a slot-counting RadixCache over an allocator that ignores
    slot 0 (patched on this instance only)."""
    alloc = ctx.params.token_to_kv_pool_allocator
    if not hasattr(alloc.free, "__dynsplit_wraps__"):
        alloc.free = _drop_padding_slot(alloc.free)
    cache = _cache_class()(ctx.params)
    _LIVE[:] = [weakref.ref(cache)]
    return cache


def token_ids(req):
    """The request's tokens (``Req.full_untruncated_fill_ids``, SGLang 0.5.23: its prompt and
    any output so far, an ``array('q')``); the caller reads the first seq_len."""
    return req.full_untruncated_fill_ids


def revise_tree(req, row: torch.Tensor) -> bool:
    """Right after the forward that evicted positions of `req` the tree already holds (earlier
    prefill chunks), before the scheduler acts again: revise the tree's copy. False when this
    process has no slot-counting tree (nothing to revise)."""
    cache = _LIVE[0]() if _LIVE else None
    if cache is None:
        return False
    cache.revise(req, row)
    return True


# The runtime reads these through its hooks (it never imports patches/).
hooks.prompt_ownership = prompt_ownership
hooks.revise_tree = revise_tree
hooks.token_ids = token_ids


def register() -> list[str]:
    from sglang.srt.mem_cache.registry import (
        register_radix_cache_backend,
        registered_radix_cache_backends,
    )

    if NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(NAME, build)
    return [TARGET]


def applied() -> bool:
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends

    return NAME in registered_radix_cache_backends()
