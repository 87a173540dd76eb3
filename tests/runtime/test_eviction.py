"""--dynsplit-evict without SGLang: the victim choice (runtime.eviction), the importance it ranks
by (core.key_distinctiveness), the switch (config, flags, request ids, implied SGLang flags) and the
Compressor freeing slots in the simulated KV pool of tests/runtime/sim.py."""

import math
import random
import types

import pytest
import torch

from dynsplit_sglang.core import (ConfigError, DynSplitConfig, causal_lse, key_distinctiveness,
                                  window_heat)
from dynsplit_sglang.overrides import parse_request_id, request_id
from dynsplit_sglang.patches.server_args import eviction_args
from dynsplit_sglang.runtime.compressor import Compressor
from dynsplit_sglang.runtime.eviction import block_heat, pick_victims
from dynsplit_sglang.settings import Settings, strip_and_parse, validate_server_args

from .sim import HKV, HQ, LAYERS, VOCAB, D, SimPool, _feat, vocab_masks

# -- block_heat / pick_victims ------------------------------------------------------------------


def test_block_heat_is_the_max_over_each_block():
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(100, generator=g)
    starts = torch.tensor([0, 3, 10, 40, 97, 50])
    lens = torch.tensor([3, 7, 1, 12, 3, 20])
    got = block_heat(heat, starts, lens)
    want = torch.stack([heat[s:s + n].max() for s, n in zip(starts.tolist(), lens.tolist())])
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    # Padding of short blocks never leaks a neighbour's heat in (block 2 is one cold token
    # followed by hot ones).
    hot = torch.zeros(20)
    hot[5:] = 9.0
    assert block_heat(hot, torch.tensor([4, 0]), torch.tensor([1, 20])).tolist() == [0.0, 9.0]


def test_pick_victims_takes_the_coldest_until_the_excess_is_covered():
    heat = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3])
    lens = torch.tensor([10, 4, 8, 6, 5])
    # Coldest first: 1 (4), 3 (6), 4 (5), 0 (10), 2 (8).
    assert pick_victims(heat, lens, 1).tolist() == [1]
    assert pick_victims(heat, lens, 4).tolist() == [1]  # exactly covered: no extra block
    assert pick_victims(heat, lens, 5).tolist() == [1, 3]
    assert pick_victims(heat, lens, 10).tolist() == [1, 3]
    assert pick_victims(heat, lens, 11).tolist() == [1, 3, 4]
    assert pick_victims(heat, lens, 25).tolist() == [1, 3, 4, 0]
    assert pick_victims(heat, lens, 33).tolist() == [1, 3, 4, 0, 2]
    assert pick_victims(heat, lens, 1000).tolist() == [1, 3, 4, 0, 2]  # never covered: all


def test_pick_victims_ties_go_to_the_earlier_block():
    heat = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1])
    lens = torch.tensor([5, 5, 5, 5, 5])
    assert pick_victims(heat, lens, 12).tolist() == [1, 3, 4]
    assert pick_victims(heat, lens, 20).tolist() == [1, 3, 4, 0]


def test_pick_victims_matches_a_greedy_reference():
    rnd = random.Random(3)
    for _ in range(50):
        n = rnd.randrange(1, 30)
        heat = torch.tensor([rnd.choice([0.0, 0.25, 0.5, rnd.random()]) for _ in range(n)])
        lens = torch.tensor([rnd.randrange(1, 20) for _ in range(n)])
        excess = rnd.randrange(1, int(lens.sum()) + 10)
        order = sorted(range(n), key=lambda i: (float(heat[i]), i))
        want, covered = [], 0
        for i in order:
            if covered >= excess:
                break
            want.append(i)
            covered += int(lens[i])
        assert pick_victims(heat, lens, excess).tolist() == want


# -- key importance (core.key_distinctiveness) and the masked lse the votes use ----------------


def _naive_distinctiveness(k):
    n, hkv, _ = k.shape
    out = torch.zeros(n, dtype=torch.float64)
    for h in range(hkv):
        unit = [k[i, h].double() / k[i, h].double().norm() for i in range(n)]
        mean = sum(unit) / n
        anchor = mean / mean.norm()
        for i in range(n):
            out[i] += (1.0 - float(unit[i] @ anchor)) / hkv
    return out


def test_key_distinctiveness_matches_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(40, 3, 8, generator=g) + torch.randn(1, 3, 8, generator=g) * 2
    got = key_distinctiveness(k)
    assert got.dtype == torch.float32 and got.shape == (40,)
    torch.testing.assert_close(got.double(), _naive_distinctiveness(k), atol=1e-6, rtol=1e-5)
    # Scale-free per key; a key along the common direction is the least distinctive.
    torch.testing.assert_close(key_distinctiveness(k * torch.rand(40, 1, 1, generator=g) * 5),
                               got, atol=1e-5, rtol=1e-4)
    common = torch.ones(1, 3, 8)
    ks = torch.cat([common.expand(10, 3, 8) + 0.1 * torch.randn(10, 3, 8, generator=g),
                    -common])  # the last key points the other way
    d = key_distinctiveness(ks)
    assert int(d.argmax()) == 10 and float(d[10]) > 1.5 and float(d[:10].max()) < 0.1


def _naive_lse(q, k, q_start, scale, key_ok):
    lq, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    lse = torch.empty(lq, hkv, g, dtype=torch.float64)
    for t in range(lq):
        visible = [j for j in range(q_start + t + 1) if bool(key_ok[j])]
        for h in range(hq):
            logits = torch.stack([q[t, h].double() @ k[j, h // g].double() for j in visible])
            lse[t, h // g, h % g] = torch.logsumexp(logits * scale, 0)
    return lse


@pytest.mark.parametrize("q_start,lq", [(0, 40), (25, 30), (50, 300)])
def test_causal_lse_leaves_evicted_keys_out(q_start, lq):
    g = torch.Generator().manual_seed(q_start + lq)
    hq, hkv, d = 4, 2, 8
    q = torch.randn(lq, hq, d, generator=g)
    k = torch.randn(q_start + lq, hkv, d, generator=g)
    key_ok = torch.rand(q_start + lq, generator=g) > 0.3
    key_ok[0] = True  # every query sees at least one key
    scale = 1 / math.sqrt(d)
    lse = causal_lse(q, k, q_start, scale, key_ok)
    assert lse.shape == (lq, hkv, hq // hkv)
    torch.testing.assert_close(lse.double(), _naive_lse(q, k, q_start, scale, key_ok),
                               atol=1e-5, rtol=1e-5)
    # Masking a key = removing it: what an evicted slot's garbage K holds does not matter.
    k2 = k.clone()
    k2[~key_ok] = 100.0
    torch.testing.assert_close(causal_lse(q, k2, q_start, scale, key_ok), lse)


def _naive_window_heat(q, k, q_start, scale, key_ok, pool):
    lq, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    n = q_start + lq
    att = torch.zeros(hkv, n, dtype=torch.float64)
    for t in range(lq):
        visible = [j for j in range(q_start + t + 1) if bool(key_ok[j])]
        for h in range(hq):
            logits = torch.stack([q[t, h].double() @ k[j, h // g].double() for j in visible])
            att[h // g, visible] += torch.softmax(logits * scale, 0) / (lq * g)
    pooled = torch.stack([att[:, max(0, j - pool // 2):j + pool // 2 + 1].amax(dim=1)
                          for j in range(n)], dim=1)
    return pooled.amax(dim=0)


@pytest.mark.parametrize("q_start,lq,pool", [(0, 8, 1), (60, 8, 7), (90, 32, 3)])
def test_window_heat_matches_a_naive_reference(q_start, lq, pool):
    g = torch.Generator().manual_seed(q_start + lq + pool)
    hq, hkv, d = 4, 2, 8
    q = torch.randn(lq, hq, d, generator=g)
    k = torch.randn(q_start + lq, hkv, d, generator=g)
    key_ok = torch.rand(q_start + lq, generator=g) > 0.3
    key_ok[0] = True
    scale = 1 / math.sqrt(d)
    got = window_heat(q, k, q_start, scale, key_ok, pool)
    assert got.dtype == torch.float32 and got.shape == (q_start + lq,)
    ref = _naive_window_heat(q, k, q_start, scale, key_ok, pool)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    if pool == 1:  # without pooling an evicted key gets nothing, and the mass is each query's
        assert float(got[~key_ok].abs().max()) == 0.0


def test_block_heat_mean_is_attention_per_token():
    heat = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.2])
    starts, lens = torch.tensor([0, 4, 6]), torch.tensor([4, 2, 1])
    torch.testing.assert_close(block_heat(heat, starts, lens, mean=True),
                               torch.tensor([0.25, 0.5, 0.2]))
    torch.testing.assert_close(block_heat(heat, starts, lens), torch.tensor([1.0, 0.5, 0.2]))


# -- the switch ----------------------------------------------------------------------------------


def test_config_evict_is_a_bool_and_not_for_streaming():
    assert DynSplitConfig().evict is False
    assert DynSplitConfig(evict=True).evict is True
    with pytest.raises(ConfigError, match="evict"):
        DynSplitConfig(evict=True, strategy="streaming")
    for bad in ("yes", 1, None, "true"):
        with pytest.raises(ConfigError, match="evict"):
            DynSplitConfig(evict=bad)
    assert DynSplitConfig.from_dict({"evict": True, "strategy": "fixed"}).evict is True
    assert DynSplitConfig.from_json('{"evict": true}').evict is True


def test_flag_parses_to_evict():
    rest, s = strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-evict", "--port", "1"])
    assert rest == ["--port", "1"]
    assert s.config.evict is True and s.enabled
    _, s = strip_and_parse(["--kv-compression", "dynsplit"])
    assert s.config.evict is False
    _, s = strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-config", '{"evict": true}'])
    assert s.config.evict is True
    assert Settings.from_mapping(dict(kv_compression="fixed", evict=True)).config.evict is True
    with pytest.raises(ConfigError):  # streaming has no blocks to evict
        strip_and_parse(["--kv-compression", "streaming", "--dynsplit-evict"])
    with pytest.raises(ConfigError):  # a DynSplit flag without --kv-compression
        strip_and_parse(["--dynsplit-evict"])


def test_evict_cannot_be_set_per_request():
    with pytest.raises(ConfigError, match="evict"):
        request_id(evict=True)
    with pytest.raises(ConfigError, match="evict"):
        request_id(evict=False)
    base = DynSplitConfig(evict=True)
    with pytest.raises(ConfigError, match="evict"):
        parse_request_id("dynsplit:evict=False:abc", base)
    # Other overrides keep the server's evict.
    assert parse_request_id(request_id(budget=300), base).evict is True


def _settings(*argv):
    return strip_and_parse(["--kv-compression", "dynsplit", *argv])[1]


def test_eviction_args_are_added_only_when_evicting_and_not_given():
    on = _settings("--dynsplit-evict")
    assert eviction_args(on, ["--port", "1"]) == ["--radix-cache-backend", "dynsplit-evict",
                                                   "--disable-overlap-schedule"]
    assert eviction_args(on, ["--disable-overlap-schedule"]) == ["--radix-cache-backend",
                                                                 "dynsplit-evict"]
    assert eviction_args(on, ["--radix-cache-backend", "radix"]) == ["--disable-overlap-schedule"]
    assert eviction_args(on, ["--radix-cache-backend", "dynsplit-evict",
                              "--disable-overlap-schedule"]) == []
    # Eviction off: the server's arguments are left alone (the existing suite runs this way).
    assert eviction_args(_settings(), []) == []
    assert eviction_args(_settings("--dynsplit-budget", "256"), []) == []
    assert eviction_args(None, []) == []
    assert eviction_args(Settings(), []) == []


def test_server_args_validation_under_eviction():
    on = _settings("--dynsplit-evict")
    good = types.SimpleNamespace(attention_backend="torch_native", disable_overlap_schedule=True,
                                 radix_cache_backend="dynsplit-evict")
    validate_server_args(on, good)
    validate_server_args(_settings(), types.SimpleNamespace(attention_backend="torch_native"))
    for bad in (dict(disable_overlap_schedule=False), dict(radix_cache_backend="radix"),
                dict(attention_backend="triton")):
        with pytest.raises(ConfigError, match="dynsplit-evict"):
            validate_server_args(on, types.SimpleNamespace(**{**vars(good), **bad}))


# -- the Compressor in the simulated pool ------------------------------------------------------


class EvictPool(SimPool):
    """SimPool whose Compressor evicts: freed slots go back on the free list (reused first,
    like a LIFO allocator) and are recorded."""

    def __init__(self, cfg, slots=8192, rows=16, max_ctx=2048):
        super().__init__(cfg.replace(evict=False), slots, rows, max_ctx)
        self.total = slots - 1
        self.freed: list[int] = []
        self.double_frees: list[int] = []  # slots freed while already free
        self.comp = Compressor(cfg, LAYERS, HQ, HKV, D, torch.float32, "cpu", slots, rows,
                               max_ctx, self.req_to_token, lambda l: self.k[l], vocab_masks(),
                               free_slots=self._free, used_slots=self._used)

    def _used(self):
        return self.total - len(self.free)

    def _free(self, slots):
        got = slots.tolist()
        self.double_frees += sorted(set(got) & set(self.free))
        self.double_frees += [s for s in got if got.count(s) > 1]
        self.freed += got
        self.free.extend(got)


def _tokens(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(VOCAB) for _ in range(n)]


CFG = DynSplitConfig(budget=96, sink=4, recent=16, block_size=12, tolerance=4, future_window=8,
                     dense_layers=1, score_layers=0, evict=True)
CHUNK_CFG = CFG.replace(evict_scope="chunk")
SCOPES = pytest.mark.parametrize("cfg", [CFG, CHUNK_CFG], ids=["prompt", "chunk"])


def _dense_over(pool, row, positions, token, pos):
    """Decode attention of `token` at position `pos` over K/V of these positions of the row, as
    the simulation's model computes it: [LAYERS] of [1, Hq, D]."""
    outs = []
    slots = pool.req_to_token[row, positions].long()
    g = HQ // HKV
    for layer in range(LAYERS):
        q = _feat(torch.tensor([token]), torch.tensor([pos]), layer, "q", HQ * D).view(HQ, D)
        k, v = pool.k[layer][slots], pool.v[layer][slots]  # [n, Hkv, D]
        o = torch.empty(1, HQ, D)
        for h in range(HQ):
            w = torch.softmax((k[:, h // g] @ q[h]) * pool.scale, dim=0)
            o[0, h] = w @ v[:, h // g]
        outs.append(o)
    return outs


@SCOPES
def test_extend_evicts_to_the_budget_and_decode_reads_only_kept_positions(cfg):
    pool = EvictPool(cfg)
    toks = _tokens(400, 1)
    pool.new_row(0)
    pool.prefill(0, toks)
    slots = pool.req_to_token[0, :400]
    live = slots != 0
    kept = int(live.sum())
    assert kept <= CFG.token_budget(400)
    assert kept < 400 - 200  # it really evicted
    # What was zeroed is what was freed: each slot once, never the padding slot.
    assert len(pool.freed) == len(set(pool.freed)) == 400 - kept
    assert pool.double_frees == []
    assert 0 not in pool.freed
    assert set(pool.freed).isdisjoint(set(slots[live].tolist()))
    assert set(pool.freed) <= set(pool.free)  # back in the allocator
    # Sink and recent window are never evicted.
    assert bool(live[:CFG.sink].all()) and bool(live[-CFG.recent:].all())
    st = pool.comp.stats
    assert st["slots_evicted"] == 400 - kept
    assert st["blocks_evicted"] >= 1
    assert st["peak_slots_in_use"] == 400  # the chunk's slots are held before eviction
    # Whole blocks: each live block has all its positions, each evicted position is in a block
    # that was dropped from the row (length 0).
    for s, n in pool.blocks(0):
        if n:
            assert bool(live[s:s + n].all())
    # The evicted slots' importance and block registrations are gone.
    freed = torch.tensor(pool.freed)
    assert bool((pool.comp.store.heat[freed] == 0).all())
    assert bool((pool.comp.store.end_entry[freed] == -1).all())

    # One decode step: every layer (dense first layer included) attends to exactly the kept
    # positions plus the new token.
    budget = CFG.token_budget(401)
    assert kept + 1 <= budget  # so that no compressed layer needs to drop anything
    outs = pool.decode([0], [toks + [5]])
    assert all(o is not None for o in outs)  # SGLang's dense path would read evicted slots
    positions = torch.cat([torch.nonzero(live).flatten(), torch.tensor([400])])
    ref = _dense_over(pool, 0, positions, 5, 400)
    for layer, (o, r) in enumerate(zip(outs, ref)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4, msg=f"layer {layer}")


@pytest.mark.parametrize("chunks", [[128, 256, 400], [100, 400]])
def test_chunked_prefill_evicts_each_chunk_only_among_its_new_tokens(chunks):
    pool = EvictPool(CHUNK_CFG)
    toks = _tokens(400, 2)
    pool.new_row(0)
    start = 0
    for end in chunks:
        before = pool.req_to_token[0, :start].clone()
        pool._forward([0], [toks[:end]], [start], decode=False)
        # Earlier chunks are what the radix tree already holds: untouched.
        assert torch.equal(pool.req_to_token[0, :start], before)
        live = pool.req_to_token[0, :end] != 0
        assert bool(live[:CFG.sink].all()) and bool(live[end - CFG.recent:end].all())
        start = end
    kept = int((pool.req_to_token[0, :400] != 0).sum())
    assert pool.comp.stats["slots_evicted"] == 400 - kept > 0
    assert pool.comp.stats["peak_slots_in_use"] < 400  # chunks: never the whole prompt at once
    # A later chunk may be written into slots an earlier one freed (LIFO free list): freed
    # again only after being handed out again, and never one that is still referenced.
    assert pool.double_frees == []
    assert set(pool.free).isdisjoint(set(pool.req_to_token[0, :400][
        pool.req_to_token[0, :400] != 0].tolist()))


@SCOPES
def test_freed_slots_are_reused_without_stale_reads(cfg):
    pool = EvictPool(cfg, slots=1024)
    a, b = _tokens(400, 3), _tokens(300, 4)
    pool.new_row(0)
    pool.prefill(0, a)
    freed_by_a = set(pool.freed)
    assert freed_by_a
    pool.new_row(1)
    pool.prefill(1, b)  # the LIFO free list hands A's freed slots to B
    b_slots = set(pool.req_to_token[1, :300].tolist()) | set(pool.freed[len(freed_by_a):])
    assert freed_by_a & b_slots
    assert pool.double_frees == []
    # A decodes over its own kept positions only, whatever B wrote into the freed slots.
    live_a = pool.req_to_token[0, :400] != 0
    outs = pool.decode([0, 1], [a + [6], b + [7]])
    pos_a = torch.cat([torch.nonzero(live_a).flatten(), torch.tensor([400])])
    ref_a = _dense_over(pool, 0, pos_a, 6, 400)
    live_b = pool.req_to_token[1, :300] != 0
    pos_b = torch.cat([torch.nonzero(live_b).flatten(), torch.tensor([300])])
    ref_b = _dense_over(pool, 1, pos_b, 7, 300)
    assert int(live_a.sum()) + 1 <= CFG.token_budget(401)
    assert int(live_b.sum()) + 1 <= CFG.token_budget(301)
    for o, ra, rb in zip(outs, ref_a, ref_b):
        torch.testing.assert_close(o[:1], ra, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o[1:], rb, atol=1e-5, rtol=1e-4)
    assert pool.comp.stats["max_decode_batch"] == 2


@SCOPES
def test_compressed_shared_prefix_is_reused_as_is(cfg):
    pool = EvictPool(cfg)
    a = _tokens(400, 5)
    pool.new_row(0)
    pool.prefill(0, a)
    pool.decode([0], [a + [1]])
    prefix = pool.req_to_token[0, :400].clone()  # what the radix tree holds, zeros included
    reused0 = pool.comp.stats["blocks_reused"]
    b = a + _tokens(60, 6)
    pool.new_row(1)
    pool.prefill(1, b, shared_len=400, shared_slots=prefix)
    # The shared prefix is read-only for B: no eviction there, no slot of it freed again.
    assert torch.equal(pool.req_to_token[1, :400], prefix)
    assert set(pool.freed).isdisjoint(set(prefix[prefix != 0].tolist()))
    reused = pool.comp.stats["blocks_reused"] - reused0
    live_blocks_a = sum(1 for s, n in pool.blocks(0) if n and s + n <= 400)
    assert reused >= live_blocks_a - 4  # the kept blocks are adopted across the evicted gaps
    live = pool.req_to_token[1, :460] != 0
    for s, n in pool.blocks(1):
        if n:
            assert bool(live[s:s + n].all())  # no adopted block covers an evicted position
    assert bool(live[460 - CFG.recent:].all())


# -- scope "prompt": the whole prompt, its own part, ranked by the prompt's last queries --------


def _window_reference(pool, toks, cfg):
    """core.window_heat of the simulated model's last queries, maxed over the scored layers,
    over the row's keys as they are at the end of the prompt (nothing evicted yet)."""
    n = len(toks)
    w = min(cfg.evict_window, n)
    t, pos = torch.tensor(toks), torch.arange(n)
    heat = None
    for layer in cfg.scored_layers(LAYERS):
        q = _feat(t[-w:], pos[-w:], layer, "q", HQ * D).view(-1, HQ, D)
        k = _feat(t, pos, layer, "k", HKV * D).view(-1, HKV, D)
        h = window_heat(q, k, n - w, pool.scale, pool=cfg.evict_pool)
        heat = h if heat is None else torch.maximum(heat, h)
    return heat


@pytest.mark.parametrize("chunks,owned", [([400], 0), ([150, 300, 400], 0), ([150, 300, 400], 40)])
def test_prompt_scope_decides_once_over_the_own_part_by_the_window(chunks, owned):
    cfg = CFG.replace(score_layers=2, evict_window=16)
    pool = EvictPool(cfg)
    toks = _tokens(400, 7)
    pool.new_row(0)
    start = 0
    for end in chunks:
        final = end == 400
        pool._forward([0], [toks[:end]], [start], decode=False, final=[final],
                      owned=[owned])
        if not final:  # nothing is decided before the prompt's end
            assert pool.freed == [] and bool((pool.req_to_token[0, :end] != 0).all())
            assert pool.comp.step.revised == []
        start = end
    row = pool.req_to_token[0, :400]
    live = row != 0
    kept = int(live.sum())
    # The own part keeps what the whole budget leaves it, or at least its own budget.
    allowed = max(cfg.token_budget(400) - owned, cfg.token_budget(400 - owned))
    assert int(live[owned:].sum()) <= allowed
    assert pool.comp.stats["slots_evicted"] == 400 - kept > 0
    assert pool.comp.stats["peak_slots_in_use"] == 400  # the whole prompt, before deciding
    assert bool(live[:max(owned, cfg.sink)].all()) and bool(live[-cfg.recent:].all())
    # Positions of earlier chunks were freed: the forward says the tree must be revised.
    first_freed = int(torch.nonzero(~live).flatten().min())
    cached = chunks[-2] if len(chunks) > 1 else 0  # what the tree held before the last chunk
    assert pool.comp.step.revised == ([0] if first_freed < cached else [])
    # The kept blocks are the greedy choice by window attention per token.
    heat = _window_reference(pool, toks, cfg)
    blocks = [(s, n) for s, n in _segmented(pool, 0)]
    lo, hi = max(owned, cfg.sink), 400 - cfg.recent
    cand = [(s, n) for s, n in blocks if s >= lo and s + n <= hi]
    score = [float(heat[s:s + n].mean()) for s, n in cand]
    order = sorted(range(len(cand)), key=lambda j: (score[j], j))
    excess, dropped = min(400 - cfg.token_budget(400), 400 - owned - allowed), set()
    for j in order:
        if excess <= 0:
            break
        dropped.add(cand[j])
        excess -= cand[j][1]
    want = torch.ones(400, dtype=torch.bool)
    for s, n in dropped:
        want[s:s + n] = False
    assert torch.equal(live, want)


def _segmented(pool, row):
    """The row's blocks as segmented (evicted ones included: their length is zeroed, so the
    start of the next block tells it)."""
    st = pool.comp.store
    row_state = pool.comp.rows[row]
    n = row_state.nblocks
    starts = st.row_start[row, :n].tolist()
    ends = starts[1:] + [row_state.next_start]  # segmentation resumes where the last one ends
    out = []
    for s, e, ln in zip(starts, ends, st.row_len[row, :n].tolist()):
        out.append((s, ln if ln else e - s))
    return out


def test_prompt_scope_without_knowing_the_prompt_end_evicts_nothing():
    pool = EvictPool(CFG)
    toks = _tokens(400, 8)
    pool.new_row(0)
    pool._forward([0], [toks], [0], decode=False, final=[False])
    assert pool.freed == [] and pool.comp.stats["slots_evicted"] == 0
    assert pool.comp.stats["evict_skipped_rows"] == 0  # a chunk before the end: not skipped


def test_prompt_scope_with_unknown_requests_says_so(caplog):
    """Without the SGLang Req (final is None) nothing can be evicted; the request is counted
    once and a warning names the counter, so the user does not silently get dense memory."""
    pool = EvictPool(CFG)
    pool.new_row(0)
    with caplog.at_level("WARNING"):
        toks = _tokens(400, 10)
        for k in range(2):  # two chunks of one request: counted once
            pool._forward([0], [toks[:200 * (k + 1)]], [200 * k], decode=False, known=False)
    assert pool.freed == [] and pool.comp.stats["slots_evicted"] == 0
    assert pool.comp.stats["evict_skipped_rows"] == 1
    assert "counter evict_skipped_rows" in caplog.text


def test_prompt_scope_keeps_the_prefix_the_request_marks_as_shared():
    cfg = CFG.replace(budget=None, budget_fraction=0.5)
    toks = _tokens(400, 9)
    plain, marked = EvictPool(cfg), EvictPool(cfg.replace(evict_keep=150))
    for pool in (plain, marked):
        pool.new_row(0)
        pool.prefill(0, toks)
    live = marked.req_to_token[0, :400] != 0
    assert bool(live[:150].all())  # the marked prefix: whole
    assert not bool((plain.req_to_token[0, :150] != 0).all())  # unmarked, it lost blocks there
    assert int(live[150:].sum()) <= cfg.token_budget(250)  # the rest: its own budget


def _greedy_keep(blocks, score_of, lo, hi, excess, length):
    """The live mask the greedy choice leaves: candidate blocks in [lo, hi), the lowest
    score_of(start, len) first, until `excess` tokens are dropped."""
    cand = [(s, n) for s, n in blocks if s >= lo and s + n <= hi]
    score = [score_of(s, n) for s, n in cand]
    want = torch.ones(length, dtype=torch.bool)
    for j in sorted(range(len(cand)), key=lambda j: (score[j], j)):
        if excess <= 0:
            break
        s, n = cand[j]
        want[s:s + n] = False
        excess -= n
    return want


def _distinctiveness_reference(toks, cfg):
    """core.key_distinctiveness of the simulated model's keys, maxed over the scored layers."""
    t, pos = torch.tensor(toks), torch.arange(len(toks))
    return torch.stack([key_distinctiveness(_feat(t, pos, layer, "k", HKV * D).view(-1, HKV, D))
                        for layer in cfg.scored_layers(LAYERS)]).amax(dim=0)


@pytest.mark.parametrize("hold", [1.0, 1.5])
def test_prompt_scope_with_hold_bounds_the_peak_chunk_by_chunk(hold):
    """evict_hold: every chunk before the prompt's end leaves the own part at most hold x its
    budget at that length, blocks ranked by their most distinctive key (query-agnostic); the
    end still decides down to the budget with the window. The peak is about the held part plus
    one chunk, not the prompt."""
    cfg = CFG.replace(score_layers=2, evict_window=16, budget=None, budget_fraction=0.25,
                      evict_hold=hold)
    pool = EvictPool(cfg)
    toks = _tokens(480, 11)
    pool.new_row(0)
    chunks, start = [120, 240, 360, 480], 0
    for end in chunks:
        final = end == 480
        before = pool.req_to_token[0, :start] != 0
        pool._forward([0], [toks[:end]], [start], decode=False, final=[final], owned=[0])
        live = pool.req_to_token[0, :end] != 0
        assert bool(live[:start][~before].logical_not().all())  # nothing evicted comes back
        assert bool(live[:cfg.sink].all()) and bool(live[end - cfg.recent:].all())
        keep = cfg.token_budget(end) if final else int(hold * cfg.token_budget(end))
        blocks = _segmented(pool, 0)
        if start == 0:  # the first chunk: nothing evicted before, so the reference applies
            heat = _distinctiveness_reference(toks[:end], cfg)
            want = _greedy_keep(blocks, lambda s, n: float(heat[s:s + n].max()), cfg.sink,
                                end - cfg.recent, end - keep, end)
            assert torch.equal(live, want)
        # At most `keep` slots, or no whole candidate block is left to drop.
        if int(live.sum()) > keep:
            assert not any(n and s >= cfg.sink and s + n <= end - cfg.recent
                           and bool(live[s:s + n].all()) for s, n in blocks)
        start = end
    live = pool.req_to_token[0, :480] != 0
    assert int(live.sum()) <= cfg.token_budget(480)
    assert pool.comp.stats["slots_evicted"] == 480 - int(live.sum())
    assert pool.double_frees == []
    peak = pool.comp.stats["peak_slots_in_use"]
    assert peak < 480  # never the whole prompt at once
    assert pool.comp.rows[0].peak_held == peak  # the row alone: its peak is the pool's
    assert peak <= int(hold * cfg.token_budget(360)) + 120 + 40  # held + a chunk + unsettled tail
    # Decode reads only the kept positions.
    outs = pool.decode([0], [toks + [5]])
    positions = torch.cat([torch.nonzero(live).flatten(), torch.tensor([480])])
    for o, r in zip(outs, _dense_over(pool, 0, positions, 5, 480)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)


def test_evict_hold_is_validated_and_per_request():
    assert DynSplitConfig(evict=True, evict_hold=1.5).evict_hold == 1.5
    for bad in (0.5, -1, 65, float("nan"), "2"):
        with pytest.raises(ConfigError, match="evict_hold"):
            DynSplitConfig(evict=True, evict_hold=bad)
    with pytest.raises(ConfigError, match="evict_hold"):
        DynSplitConfig(evict=True, evict_scope="chunk", evict_hold=1.0)
    base = DynSplitConfig(evict=True)
    assert parse_request_id(request_id(evict_hold=2), base).evict_hold == 2
    with pytest.raises(ConfigError, match="evict_hold"):
        parse_request_id(request_id(evict_hold=2), base.replace(evict_scope="chunk"))
    _, s = strip_and_parse(["--kv-compression", "dynsplit", "--dynsplit-evict",
                            "--dynsplit-evict-hold", "1.25"])
    assert s.config.evict_hold == 1.25
