"""Eviction over the whole prompt against SGLang 0.5.23's own radix tree (patches/eviction.py):
where a request's own part starts (``prompt_ownership``: past every node another request
locks) and the tree's copy of earlier prefill chunks revised after their positions were freed
(``revise``), with the tree's slot counts kept exact."""

import types

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from dynsplit_sglang.patches import eviction as E

IDS = list(range(1000, 1150))  # A's prompt: 150 tokens, chunks of 60, 40 and 50


def _tree():
    params = CacheInitParams(disable=False, req_to_token_pool=None,
                             token_to_kv_pool_allocator=None, page_size=1)
    return E._cache_class()(params)


def _checkpoint(tree, req, n, values):
    """What SGLang's checkpoint does for a chunk: insert the row so far, lock its node."""
    tree.insert(InsertParams(key=RadixKey(IDS[:n]), value=values[:n].clone()))
    node = tree.match_prefix(MatchPrefixParams(key=RadixKey(IDS[:n]))).last_device_node
    if req.lock is not None:
        tree.unlock(req.lock)
    req.lock, req.last_node = tree.lock(node), node


def _match(tree, n):
    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(IDS[:n])))
    return tree.path_device_indices(m.last_device_node), m.last_device_node


def _values(tree) -> list:
    out, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node is not tree.root_node:
            out.append(node.value)
        stack.extend(node.children.values())
    return out


@pytest.fixture
def scene():
    """A prefilled two chunks (100 tokens in the tree, locked by A); B matched A's first 40."""
    tree = _tree()
    row = torch.arange(1, 151)  # A's slots
    a = types.SimpleNamespace(lock=None, last_node=None, full_untruncated_fill_ids=IDS)
    _checkpoint(tree, a, 60, row)
    _checkpoint(tree, a, 100, row)
    _, b_node = _match(tree, 40)
    b = types.SimpleNamespace(lock=tree.lock(b_node))
    return tree, a, b, row


def test_own_part_starts_past_what_another_request_locks(scene):
    tree, a, b, _ = scene
    assert E.prompt_ownership(a, 150) == (True, 40)
    assert E.prompt_ownership(a, 100)[0] is False  # a middle chunk
    tree.unlock(b.lock)  # B finished: nobody else holds any of A's path
    assert E.prompt_ownership(a, 150) == (True, 0)


def test_revise_copies_freed_positions_into_the_tree_and_counts_slots(scene):
    tree, a, b, row = scene
    protected = tree.protected_size()
    assert protected == 100 and tree.evictable_size() == 0
    row = row.clone()
    row[50:60] = 0  # freed: first chunk, past B's 40
    row[70:80] = 0  # freed: second chunk
    row[120:130] = 0  # freed: the last chunk, not in the tree yet
    tree.revise(a, row)
    assert torch.equal(tree.path_device_indices(a.last_node), row[:100])
    assert tree.protected_size() == protected - 20
    # B's match is untouched; a later request matching A's prompt gets the padding slot.
    got_b, _ = _match(tree, 40)
    assert torch.equal(got_b, torch.arange(1, 41))
    got_c, _ = _match(tree, 100)
    assert int((got_c == 0).sum()) == 20 and set(got_c[got_c != 0].tolist()).isdisjoint(
        set(range(51, 61)) | set(range(71, 81)))
    tree.revise(a, row)  # idempotent: nothing new to copy, nothing counted twice
    assert tree.protected_size() == protected - 20
    # Once nobody holds it, the whole tree is evictable, counted in slots (not positions).
    tree.unlock(a.lock)
    tree.unlock(b.lock)
    live = sum(int((v != 0).sum()) for v in _values(tree))
    assert tree.protected_size() == 0 and tree.evictable_size() == live == 80


def test_revise_of_an_unlocked_path_counts_evictable_slots(scene):
    tree, a, b, row = scene
    tree.unlock(b.lock)
    tree.unlock(a.lock)  # e.g. an abort after the forward
    assert tree.evictable_size() == 100
    row = row.clone()
    row[10:15] = 0
    tree.revise(a, row)
    assert tree.evictable_size() == 95 and tree.protected_size() == 0


def test_revise_brings_recalled_slots_back_into_the_tree(scene):
    """The cold tier (runtime/cold.py): a next turn writes fresh slots where its prefix had
    evicted positions; the tree's copy takes them and counts them again."""
    tree, a, b, row = scene
    evicted = row.clone()
    evicted[50:60] = 0
    evicted[70:80] = 0
    tree.revise(a, evicted)
    assert tree.protected_size() == 80
    recalled = evicted.clone()
    recalled[70:80] = torch.arange(500, 510)  # the block at 70 came back; 50..60 stays out
    tree.revise(a, recalled)
    assert torch.equal(tree.path_device_indices(a.last_node), recalled[:100])
    assert tree.protected_size() == 90
    tree.unlock(a.lock)
    tree.unlock(b.lock)
    assert tree.protected_size() == 0 and tree.evictable_size() == 90


class _Listener:
    def __init__(self):
        self.dropped_calls, self.flushes = [], 0

    def dropped(self, token_ids, positions):
        self.dropped_calls.append((list(token_ids), list(positions)))

    def flushed(self):
        self.flushes += 1


def test_the_tree_tells_the_cold_tier_what_leaves_it(scene):
    """A node with evicted positions leaving the tree, and a flush: the listeners (the
    compressors' cold tiers, runtime/hooks.py) hear of it, with the path's token ids."""
    from dynsplit_sglang.runtime import hooks

    tree, a, b, row = scene
    evicted = row.clone()
    evicted[70:80] = 0
    tree.revise(a, evicted)
    listener = _Listener()
    hooks.tree_listeners.add(listener)
    try:
        leaf = a.last_node
        tree.unlock(a.lock)
        tree.unlock(b.lock)
        tree._delete_leaf(leaf)  # what evict() does with an unlocked leaf
        assert listener.dropped_calls == [(IDS[:100], list(range(70, 80)))]
        tree.reset()
        assert listener.flushes == 1
    finally:
        hooks.tree_listeners.discard(listener)
