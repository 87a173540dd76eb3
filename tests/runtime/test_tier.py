"""The cold tier's store (runtime/tier.py): position keys against a big-integer reference, K/V
moved out and recalled bit for bit, the byte cap and its least-recently-used drops, counted."""

import pytest
import torch

from dynsplit_sglang.runtime.tier import _BASES, _MODS, ColdTier, prefix_keys

L, H, D = 3, 2, 4


def _reference_key(ids: list[int]) -> int:
    """The key of the whole of `ids`: each modulus's polynomial sum in Python's big integers."""
    key = 0
    for mod, base in zip(_MODS, _BASES):
        key = key * mod + sum((t + 1) * pow(base, j, mod) for j, t in enumerate(ids)) % mod
    return key


def test_prefix_keys_equal_the_big_integer_reference_and_identify_prefixes():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 150_000, (300,), generator=g)
    got = prefix_keys(ids).tolist()
    assert got == [_reference_key(ids[: i + 1].tolist()) for i in range(ids.numel())]
    # A long sequence with the largest ids: no overflow (spot-checked positions).
    long = torch.full((20_000,), 2**31 - 2, dtype=torch.int64)
    got = prefix_keys(long)
    for i in (0, 1, 4_095, 19_999):
        assert int(got[i]) == _reference_key(long[: i + 1].tolist())
    a, b = ids.clone(), ids.clone()
    b[100] += 1
    ka, kb = prefix_keys(a), prefix_keys(b)
    assert torch.equal(ka[:100], kb[:100]) and not bool((ka[100:] == kb[100:]).any())
    shifted = prefix_keys(torch.cat([ids[:1], ids]))  # same tokens one position later
    assert not bool(torch.isin(shifted[1:], ka).any())
    assert len(set(ka.tolist())) == ka.numel()


def _pool(slots=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(slots, H, D, generator=g) for _ in range(L)],
            [torch.randn(slots, H, D, generator=g) for _ in range(L)])


def _tier(tokens):
    return ColdTier(tokens * 2 * L * H * D * 4, L, H, D, torch.float32)


def test_moved_out_blocks_come_back_bit_for_bit_in_other_slots():
    k, v = _pool()
    tier = _tier(32)
    keys = prefix_keys(torch.arange(20))
    assert tier.put(keys[:8], torch.arange(10, 18), k, v)
    assert tier.put(keys[8:20], torch.arange(30, 42), k, v)
    want_k = [x[torch.arange(10, 18)].clone() for x in k]
    want_v = [x[torch.arange(10, 18)].clone() for x in v]
    assert tier.bytes_held == 20 * tier.row_bytes
    assert tier.find(keys[[0, 7, 8, 19]]).ge(0).all()
    assert tier.find(prefix_keys(torch.arange(1, 3))).eq(-1).all()
    new = torch.arange(50, 58)
    tier.load(keys[:8], new, k, v)
    assert all(torch.equal(x[new], w) for x, w in zip(k, want_k))
    assert all(torch.equal(x[new], w) for x, w in zip(v, want_v))
    assert tier.find(keys[:8]).eq(-1).all()  # recalled whole: gone from the tier
    assert tier.bytes_held == 12 * tier.row_bytes
    tier.load(keys[8:12], torch.arange(0, 4), k, v)  # part of a block: the block stays
    assert tier.find(keys[8:20]).ge(0).all()
    assert tier.stats["tier_tokens_moved_out"] == 20 and tier.stats["tier_tokens_recalled"] == 12


def test_unknown_keys_are_refused_before_anything_is_written():
    k, v = _pool()
    tier = _tier(16)
    keys = prefix_keys(torch.arange(10))
    tier.put(keys[:4], torch.arange(4), k, v)
    before = [x.clone() for x in k]
    with pytest.raises(KeyError, match="1 of 5"):
        tier.load(keys[:5], torch.arange(20, 25), k, v)
    assert all(torch.equal(a, b) for a, b in zip(k, before))


def test_the_byte_cap_drops_the_least_recently_used_blocks():
    k, v = _pool()
    tier = _tier(10)
    assert tier.capacity == 10
    keys = prefix_keys(torch.arange(40))
    for b in range(3):  # blocks of 4, 3 and 3 tokens fill the tier
        lo, hi = [0, 4, 7][b], [4, 7, 10][b]
        assert tier.put(keys[lo:hi], torch.arange(lo, hi), k, v)
    tier.load(keys[0:4], torch.arange(40, 44), k, v, keep=True)  # used: now the most recent
    assert tier.put(keys[10:14], torch.arange(10, 14), k, v)  # needs 4: drops 4..7 and 7..10
    assert tier.find(keys[0:4]).ge(0).all() and tier.find(keys[10:14]).ge(0).all()
    assert tier.find(keys[4:10]).eq(-1).all()
    assert tier.stats["tier_blocks_dropped"] == 2 and tier.stats["tier_tokens_dropped"] == 6
    assert not tier.put(keys[14:25], torch.arange(14, 25), k, v)  # 11 tokens: never fits
    assert tier.stats["tier_tokens_dropped"] == 17 and tier.bytes_held == 8 * tier.row_bytes


def test_positions_moved_out_again_replace_their_old_copy():
    k, v = _pool()
    tier = _tier(16)
    keys = prefix_keys(torch.arange(8))
    tier.put(keys[:6], torch.arange(6), k, v)
    tier.put(keys[2:8], torch.arange(20, 26), k, v)  # another request evicted them too
    assert tier.stats["tier_blocks_replaced"] == 1 and tier.bytes_held == 6 * tier.row_bytes
    tier.load(keys[2:8], torch.arange(40, 46), k, v)
    assert torch.equal(k[0][40:46], k[0][20:26])
    tier.clear()
    assert tier.bytes_held == 0 and not tier.blocks and not tier.where
