"""Every registered strategy through the same checks: the segmentation's properties, the
compressor in the simulated pool, and the session's real server.

The registry holds the package's strategies, the test-only ``before_punct``
(strategy_before_punct.py) registered here with ``strategies.load``, and whatever
DYNSPLIT_STRATEGIES names when pytest starts (a strategy of one's own is checked the same way).
``load`` also exports the module in DYNSPLIT_STRATEGIES: the session's servers start after
collection, inherit it, and serve ``before_punct`` like a built-in strategy.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsplit_sglang.core import DynSplitConfig, candidates_for, segment
from dynsplit_sglang.core.delimiters import MODES, candidate_mask
from dynsplit_sglang.launcher import post_json
from dynsplit_sglang.core.strategies import STRATEGIES, load, load_env
from dynsplit_sglang.overrides import parse_request_id, request_id
from dynsplit_sglang.settings import strip_and_parse

from .client import flush, generate, stats, text
from .conftest import COMPRESSION_ARGS

load(str(Path(__file__).with_name("strategy_before_punct.py")))
load_env()
NAMES = tuple(STRATEGIES)


def test_the_test_only_strategy_is_registered():
    assert "before_punct" in NAMES and {"dynsplit", "fixed", "delimiter", "streaming"} <= set(NAMES)


# -- declarations and the places that read the registry ------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_settings_and_overrides_accept_it(name):
    strategy = STRATEGIES[name]
    cfg = DynSplitConfig(strategy=name)
    assert cfg.strategy_impl is strategy and strategy.name == name
    assert strategy.candidate_mode(cfg) in MODES + (None,)
    assert cfg.lookahead == strategy.lookahead(cfg) >= 0
    assert 1 <= cfg.recent_for(1024) <= 1024 - cfg.sink
    assert strip_and_parse(["--kv-compression", name])[1].config.strategy == name
    assert parse_request_id(request_id(strategy=name), DynSplitConfig()).strategy == name
    if strategy.candidate_mode(cfg) is not None:
        with pytest.raises(ValueError, match="candidates"):
            segment(cfg, 10, torch.zeros(10), None)
    if strategy.needs_votes:
        with pytest.raises(ValueError, match="scores"):
            segment(cfg, 10, None, torch.ones(10, dtype=torch.bool))


# -- the segmentation's properties ----------------------------------------------------------------


def _inputs(length, seed, rate):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, generator=g), torch.rand(length, generator=g) < rate


CFG_PARAMS = st.fixed_dictionaries({
    "block_size": st.integers(2, 40),
    "tol_frac": st.floats(0, 0.99),
    "future_window": st.integers(1, 24),
})


def _cfg(name, p):
    c = p["block_size"]
    return DynSplitConfig(strategy=name, block_size=c, tolerance=int(p["tol_frac"] * c),
                          future_window=p["future_window"], budget=4096)


def _check_blocks(seg, cfg, start, length, complete):
    """Contiguous blocks from `start` whose lengths fit the fixed-length format, and horizons
    that cover each block and, for an unfinished sequence, are in view."""
    assert seg.horizons.shape == seg.ends.shape
    if not cfg.strategy_impl.has_blocks:
        assert seg.ends.numel() == 0 and seg.next_start == start
        return
    lens = seg.lengths
    if seg.ends.numel():
        assert int(seg.starts[0]) == start
        assert torch.equal(seg.starts[1:], seg.ends[:-1] + 1)  # contiguous, no overlap
        assert bool((lens[:-1] >= cfg.min_block_len).all())
        assert bool((lens <= cfg.max_block_len).all()) and int(lens[-1]) >= 1
        assert bool((seg.horizons >= seg.ends).all())  # a decision reads its own block
    if complete:
        assert seg.next_start == length  # full coverage
    else:
        assert seg.next_start <= length
        assert bool((lens >= cfg.min_block_len).all())
        assert bool((seg.horizons < length).all())  # decided with everything it reads in view


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100, deadline=None)
@given(p=CFG_PARAMS, length=st.integers(0, 400), seed=st.integers(0, 2**16),
       rate=st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_blocks_partition_the_sequence_within_the_format(name, p, length, seed, rate):
    cfg = _cfg(name, p)
    scores, cands = _inputs(length, seed, rate)
    seg = segment(cfg, length, scores, cands)
    _check_blocks(seg, cfg, 0, length, True)
    again = segment(cfg, length, scores.clone(), cands.clone())  # deterministic
    assert torch.equal(again.ends, seg.ends) and torch.equal(again.horizons, seg.horizons)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100, deadline=None)
@given(p=CFG_PARAMS, prefix=st.integers(0, 300), extra=st.integers(0, 200),
       seed=st.integers(0, 2**16), seed2=st.integers(0, 2**16),
       rate=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_decisions_read_nothing_past_their_horizon(name, p, prefix, extra, seed, seed2, rate):
    """Blocks decided on a prefix reappear unchanged, horizons included, in every continuation
    of it; resuming where the prefix stopped gives the rest."""
    cfg = _cfg(name, p)
    scores, cands = _inputs(prefix, seed, rate)
    s2, c2 = _inputs(extra, seed2, rate)
    scores, cands = torch.cat([scores, s2]), torch.cat([cands, c2])
    partial = segment(cfg, prefix, scores[:prefix], cands[:prefix], complete=False)
    _check_blocks(partial, cfg, 0, prefix, False)
    full = segment(cfg, prefix + extra, scores, cands)
    n = partial.ends.numel()
    assert torch.equal(full.ends[:n], partial.ends)
    assert torch.equal(full.horizons[:n], partial.horizons)
    resumed = segment(cfg, prefix + extra, scores, cands, start=partial.next_start)
    _check_blocks(resumed, cfg, partial.next_start, prefix + extra, True)
    assert torch.equal(torch.cat([partial.ends, resumed.ends]), full.ends)
    assert torch.equal(torch.cat([partial.horizons, resumed.horizons]), full.horizons)
    if cfg.strategy_impl.has_blocks:  # only a bounded look-ahead at the end is undecided
        assert prefix - partial.next_start <= 2 * cfg.max_block_len + cfg.lookahead
    # A block is final as soon as its horizon is in view: cut the sequence right after it. (The
    # last block of a complete split is also decided by where the sequence ends.)
    in_view = torch.nonzero(full.horizons[:-1] < prefix + extra).flatten().tolist()
    for b in in_view[:: max(1, len(in_view) // 4)]:
        cut = int(full.horizons[b]) + 1
        early = segment(cfg, cut, scores[:cut], cands[:cut], complete=False)
        assert torch.equal(early.ends[: b + 1], full.ends[: b + 1])
        assert torch.equal(early.horizons[: b + 1], full.horizons[: b + 1])


# -- the compressor in the simulated pool ---------------------------------------------------------


SIM_CFG = DynSplitConfig(budget=96, sink=4, recent=16, block_size=12, tolerance=4,
                         future_window=8, dense_layers=1, score_layers=0)


def _tokens(n, seed):
    rnd = random.Random(seed)
    return [rnd.randrange(64) for _ in range(n)]


@pytest.mark.parametrize("name", NAMES)
def test_compressor_adopts_a_shared_prefix_and_splits_as_if_alone(name):
    from runtime.sim import SimPool  # tests/runtime/sim.py

    cfg = SIM_CFG.replace(strategy=name)
    a = _tokens(300, 1)
    b = a[:250] + _tokens(70, 2)
    alone = SimPool(cfg)  # B on a fresh pool
    alone.new_row(1)
    alone.prefill(1, b)
    out_alone = alone.decode([1], [b + [5]])
    pool = SimPool(cfg)  # A first, then B matches A's first 250 tokens in the radix tree
    pool.new_row(0)
    for start, end in ((0, 130), (130, 250), (250, 300)):  # chunked: A decides on prefixes
        pool._forward([0], [a[:end]], [start], decode=False)
    pool.decode([0], [a + [7]])
    built_by_a = pool.comp.stats["blocks_built"]
    pool.new_row(1)
    pool.prefill(1, b, shared_len=250, shared_slots=pool.req_to_token[0])
    out_shared = pool.decode([1], [b + [5]])
    assert pool.blocks(1) == alone.blocks(1)
    assert all((x is None and y is None) or torch.equal(x, y)
               for x, y in zip(out_shared, out_alone))
    reused = pool.comp.stats["blocks_reused"]
    if not STRATEGIES[name].has_blocks:
        assert pool.blocks(1) == [] and pool.comp.stats["blocks_built"] == 0 and reused == 0
        return
    assert reused >= 250 // cfg.max_block_len - 2
    # Only the blocks past the reused ones were built for B.
    assert pool.comp.stats["blocks_built"] - built_by_a == len(pool.blocks(1)) - reused


# -- the session's server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_server_serves_it_from_a_shared_prefix_as_if_alone(sglang_server, tokenizer, tiny_model,
                                                          name):
    """Through the server's rid override: a prompt's settled blocks are those of the core's
    segmentation, a request sharing its prefix adopts them and answers as it does alone, and a
    budget covering the context is dense."""
    server, strategy = sglang_server, STRATEGIES[name]
    cfg = strip_and_parse(COMPRESSION_ARGS)[1].config.replace(strategy=name)
    prefix = text(250, 31)
    first, second = prefix + " " + text(30, 32), prefix + " " + text(30, 33)
    rid = lambda: request_id(strategy=name)  # noqa: E731
    flush(server)
    s0 = stats(server)
    ids = tokenizer(first)["input_ids"]
    post_json(server.base_url + "/generate", {  # a prefill alone: no decode step closes it
        "input_ids": ids, "rid": rid(), "sampling_params": {"max_new_tokens": 1}})
    s1 = stats(server)
    shared, meta = generate(server, [second], [rid()], max_new=16)
    s2 = stats(server)
    assert meta[0]["cached_tokens"] > 200  # the radix tree served the prefix
    flush(server)
    alone, _ = generate(server, [second], [rid()], max_new=16)
    assert shared == alone
    built = s1.get("blocks_built", 0) - s0.get("blocks_built", 0)
    reused = s2.get("blocks_reused", 0) - s1.get("blocks_reused", 0)
    mode = strategy.candidate_mode(cfg)
    if strategy.needs_votes:  # the server's votes are its own; the count is the model's
        assert built > 20
    else:
        cands = candidates_for(torch.tensor(ids), candidate_mask(tokenizer, mode)) if mode else None
        assert built == segment(cfg, len(ids), None, cands, complete=False).ends.numel()
    assert (reused > 20) if strategy.has_blocks else (built == 0 and reused == 0)
    # Within the budget at every decode step of this request (its own report: the server's
    # max_tokens_attended also counts earlier tests' larger per-request budgets).
    report = meta[0]["dynsplit"]
    model = json.loads((tiny_model / "config.json").read_text())
    heads_x_layers = model["num_key_value_heads"] * model["num_hidden_layers"]  # none dense
    assert report["strategy"] == name and report["sparse_steps"] == report["decode_steps"] == 15
    assert report["tokens_attended"] <= 64 * heads_x_layers * report["decode_steps"]
    covered, _ = generate(server, [second], [request_id(strategy=name, budget=4096)])
    dense, _ = generate(server, [second], [request_id(strategy="none")])
    assert covered == dense
    # The scheduler took the override (it logs one it cannot parse, and runs the default).
    assert f"strategy={name!r} is invalid" not in server.log_path.read_text(errors="replace")
