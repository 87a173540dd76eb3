"""The cold tier served (runtime/cold.py) in the simulated pool: what eviction frees goes to
the tier, and a next request that extends the evicted prompt (its prefix from the radix tree,
zeros included) gets every block back, bit for bit, before its forward reads the row; its
prompt's end then decides again over the whole own part, as a cold prefill of the same tokens
would."""

import torch

from dynsplit_sglang.runtime.compressor import Compressor

from .sim import D, HKV, HQ, LAYERS, _feat, vocab_masks
from .test_eviction import CFG, EvictPool, _tokens

TIER = CFG.replace(evict_tier="host", evict_tier_mb=1)


class ColdPool(EvictPool):
    pass_token_ids = True

    def __init__(self, cfg=TIER, slots=8192, rows=16, max_ctx=2048):
        super().__init__(cfg.replace(evict_tier="none"), slots, rows, max_ctx)
        self.comp = Compressor(cfg, LAYERS, HQ, HKV, D, torch.float32, "cpu", slots, rows,
                               max_ctx, self.req_to_token, lambda l: self.k[l], vocab_masks(),
                               free_slots=self._free, used_slots=self._used,
                               value_buffer=lambda l: self.v[l], alloc_slots=self._alloc,
                               available_slots=lambda: len(self.free))

    def _alloc(self, n):
        return self.alloc(n) if n <= len(self.free) else None

    def turn(self, row, tokens, prefix=None):
        """A request: its prefix as the radix tree gives it (another row's slots, zeros for
        evicted positions), then one extend that ends its prompt; nobody else holds it."""
        self.new_row(row)
        p = 0 if prefix is None else len(prefix)
        if p:
            self.req_to_token[row, :p] = prefix
        self._forward([row], [tokens], [p], decode=False, final=[True], owned=[0])


def _assert_kv_of_the_model(pool, row, n, tokens):
    """Every live position of the row holds exactly the K/V the model computes for it."""
    slots = pool.req_to_token[row, :n].long()
    live = torch.nonzero(slots != 0).flatten()
    t = torch.tensor(tokens)[live]
    for layer in range(LAYERS):
        for which, buf in (("k", pool.k), ("v", pool.v)):
            want = _feat(t, live, layer, which, HKV * D).view(-1, HKV, D)
            assert torch.equal(buf[layer][slots[live]], want), (layer, which)


def test_a_next_turn_recalls_every_evicted_block_and_decides_again():
    a = _tokens(400, 11)
    b = a + _tokens(40, 12)
    pool = ColdPool()
    pool.turn(0, a)
    first = pool.req_to_token[0, :400].clone()
    evicted = int((first == 0).sum())
    assert evicted > 200 and pool.comp.stats["tier_tokens_moved_out"] == evicted
    assert pool.comp.rows[0].tier_out == evicted
    # Other requests take the freed slots (so a recall must not find stale K/V there).
    pool.turn(2, _tokens(300, 13))
    pool.turn(1, b, prefix=first)
    st = pool.comp.rows[1]
    assert st.tier_in == evicted == pool.comp.stats["tier_tokens_recalled"]
    assert pool.comp.step.revised == [0]  # the tree's copy of the prefix changed
    _assert_kv_of_the_model(pool, 1, 440, b)
    # The prompt's end decided again over everything: as a cold prefill of the same tokens.
    cold = ColdPool()
    cold.turn(0, b)
    assert torch.equal(pool.req_to_token[1, :440] != 0, cold.req_to_token[0, :440] != 0)
    # Recalled blocks are blocks again (adopted-prefix gaps filled), in position order.
    starts = [s for s, n in pool.blocks(1)]
    assert starts == sorted(starts)
    covered = torch.zeros(440, dtype=torch.int32)
    for s, n in pool.blocks(1):
        covered[s:s + n] += 1
    assert int(covered.max()) == 1  # no position in two blocks
    assert pool.comp.stats["tier_tokens_moved_out"] > evicted  # what turn 2 dropped went too


def test_recall_takes_only_what_the_pool_has_room_for():
    a = _tokens(400, 21)
    pool = ColdPool(slots=560)  # 559 usable: turn 1 keeps ~100, turn 2 needs 40 new slots
    pool.turn(0, a)
    first = pool.req_to_token[0, :400].clone()
    evicted = int((first == 0).sum())
    hog = pool.alloc(len(pool.free) - 100)  # another request holds all but 100 free slots
    pool.turn(1, a + _tokens(40, 22), prefix=first)
    st = pool.comp.rows[1]
    assert 0 < st.tier_in <= 100 - 40 < evicted
    assert pool.comp.stats["tier_tokens_recall_short"] == evicted - st.tier_in
    _assert_kv_of_the_model(pool, 1, 440, a + _tokens(40, 22))
    assert pool.double_frees == [] and hog.numel()


def test_blocks_the_tier_dropped_stay_evicted():
    a = _tokens(400, 31)
    row_bytes = 2 * LAYERS * HKV * D * 4 + 4 * (TIER.future_window + 1)
    pool = ColdPool(TIER.replace(evict_tier_mb=1))
    pool.comp.cold.tier.__init__(50 * row_bytes, LAYERS, HKV, D, torch.float32,
                                 aux_width=TIER.future_window + 1)  # room for 50 tokens
    pool.comp.cold.tier.stats = pool.comp.stats
    pool.turn(0, a)
    first = pool.req_to_token[0, :400].clone()
    evicted = int((first == 0).sum())
    dropped = pool.comp.stats["tier_tokens_dropped"]
    assert dropped >= evicted - 50
    pool.turn(1, a + _tokens(40, 32), prefix=first)
    assert pool.comp.rows[1].tier_in == evicted - dropped
    _assert_kv_of_the_model(pool, 1, 440, a + _tokens(40, 32))


def _held_first_turn(seed):
    """A held server's first turn: 400 tokens, evicted at its prompt's end."""
    cfg = TIER.replace(evict_hold=1.0)
    pool = ColdPool(cfg)
    pool.turn(0, _tokens(400, seed))
    return cfg, pool, pool.req_to_token[0, :400].clone()


def test_with_hold_the_tier_competes_without_raising_the_peak():
    """evict_hold > 0: a next turn does not bring everything back. Its window ranks the pool's
    blocks and the tier's (their keys read from the tier) together; losers in the pool go out,
    winners in the tier come into the slots just freed. Same kept set as a cold prefill of the
    same tokens, while the row never holds more than its kept part plus the new tokens."""
    cfg, pool, first = _held_first_turn(41)
    b = _tokens(400, 41) + _tokens(40, 42)
    kept_before = int((first != 0).sum())
    pool.turn(2, _tokens(300, 43))
    pool.turn(1, b, prefix=first)
    st = pool.comp.rows[1]
    assert st.peak_held == kept_before + 40 < 440  # never the whole prompt
    assert 0 < st.tier_in < 400 - kept_before  # some of the tier's blocks won, not all
    assert int((pool.req_to_token[1, :440] != 0).sum()) <= cfg.token_budget(440)
    _assert_kv_of_the_model(pool, 1, 440, b)
    cold = ColdPool(cfg)
    cold.turn(0, b)
    assert torch.equal(pool.req_to_token[1, :440] != 0, cold.req_to_token[0, :440] != 0)
    assert pool.comp.step.revised == [0]


def test_with_hold_blocks_the_tier_drops_before_the_prompt_end_are_left_out():
    """Found at the first chunk, gone by the prompt's end (a flush, say): ranked without them,
    nothing read from rows the tier no longer holds."""
    _, pool, first = _held_first_turn(51)
    b = _tokens(400, 51) + _tokens(100, 52)
    pool.new_row(1)
    pool.req_to_token[1, :400] = first
    pool._forward([1], [b[:450]], [400], decode=False, final=[False], owned=[0])
    assert pool.comp.rows[1].cold is not None
    pool.comp.cold.flushed()
    pool._forward([1], [b], [450], decode=False, final=[True], owned=[0])
    assert pool.comp.rows[1].tier_in == 0
    _assert_kv_of_the_model(pool, 1, 500, b)
