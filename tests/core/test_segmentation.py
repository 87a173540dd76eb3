import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsplit_sglang.core import DynSplitConfig, segment


def _inputs(length, seed, cand_rate):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(length, generator=g)
    cands = torch.rand(length, generator=g) < cand_rate
    return scores, cands


def _check_partition(seg, start, length, lo, hi, complete):
    lens = seg.lengths
    if seg.ends.numel():
        assert int(seg.starts[0]) == start
        assert torch.equal(seg.starts[1:], seg.ends[:-1] + 1)  # contiguous, no overlap
        assert bool((lens[:-1] >= lo).all()) and bool((lens[:-1] <= hi).all())
        assert 1 <= int(lens[-1]) <= hi
    if complete:
        assert seg.next_start == length  # full coverage
    else:
        assert seg.next_start <= length
        assert bool((lens >= lo).all())


cfg_params = st.fixed_dictionaries({
    "block_size": st.integers(2, 40),
    "tol_frac": st.floats(0, 0.99),
    "strategy": st.sampled_from(["dynsplit", "fixed", "delimiter"]),
    "future_window": st.integers(1, 24),
})


def _cfg(p):
    c = p["block_size"]
    return DynSplitConfig(strategy=p["strategy"], block_size=c,
                          tolerance=int(p["tol_frac"] * c) if p["strategy"] != "fixed" else 0,
                          future_window=p["future_window"], budget=4096)


@settings(max_examples=150, deadline=None)
@given(p=cfg_params, length=st.integers(0, 400), seed=st.integers(0, 2**16),
       rate=st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_blocks_partition_the_sequence_within_bounds(p, length, seed, rate):
    cfg = _cfg(p)
    scores, cands = _inputs(length, seed, rate)
    seg = segment(cfg, length, scores, cands)
    C, D = cfg.block_size, cfg.tolerance
    _check_partition(seg, 0, length, C - D, C + D, True)
    assert torch.equal(segment(cfg, length, scores, cands).ends, seg.ends)  # deterministic


@settings(max_examples=150, deadline=None)
@given(p=cfg_params, prefix=st.integers(0, 300), extra=st.integers(0, 200),
       seed=st.integers(0, 2**16), seed2=st.integers(0, 2**16),
       rate=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_causal_stability_whatever_follows_the_prefix(p, prefix, extra, seed, seed2, rate):
    """Blocks finalised on a prefix reappear unchanged in every continuation of it."""
    cfg = _cfg(p)
    scores, cands = _inputs(prefix, seed, rate)
    s2, c2 = _inputs(extra, seed2, rate)
    partial = segment(cfg, prefix, scores, cands, complete=False)
    _check_partition(partial, 0, prefix, cfg.block_size - cfg.tolerance,
                     cfg.block_size + cfg.tolerance, False)
    full = segment(cfg, prefix + extra, torch.cat([scores, s2]), torch.cat([cands, c2]))
    n = partial.ends.numel()
    assert torch.equal(full.ends[:n], partial.ends)
    # Resuming where the prefix stopped gives the same continuation as one pass.
    resumed = segment(cfg, prefix + extra, torch.cat([scores, s2]), torch.cat([cands, c2]),
                      start=partial.next_start)
    assert torch.equal(torch.cat([partial.ends, resumed.ends]), full.ends)
    # Only a bounded look-ahead at the end of the prefix is left undecided.
    assert prefix - partial.next_start <= 2 * (cfg.block_size + cfg.tolerance) + cfg.lookahead


def test_dynsplit_picks_the_best_scoring_candidate_in_the_window():
    cfg = DynSplitConfig(block_size=10, tolerance=3)
    scores = torch.zeros(40)
    cands = torch.zeros(40, dtype=torch.bool)
    cands[[7, 9, 12]] = True  # window of the first block: positions 6..12
    scores[[7, 9, 12]] = torch.tensor([0.1, 0.5, 0.9])
    assert int(segment(cfg, 40, scores, cands).ends[0]) == 12
    scores[12] = -1.0
    assert int(segment(cfg, 40, scores, cands).ends[0]) == 9


def test_no_candidate_in_window_falls_back_to_the_ideal_end():
    cfg = DynSplitConfig(block_size=10, tolerance=3)
    ends = segment(cfg, 35, torch.zeros(35), torch.zeros(35, dtype=torch.bool)).ends
    assert ends.tolist() == [9, 19, 29, 34]


def test_every_position_a_candidate_ties_go_to_the_ideal_end():
    cfg = DynSplitConfig(block_size=8, tolerance=2)
    ends = segment(cfg, 24, torch.zeros(24), torch.ones(24, dtype=torch.bool)).ends
    assert ends.tolist() == [7, 15, 23]


def test_delimiter_baseline_ignores_scores_and_takes_nearest_delimiter():
    cfg = DynSplitConfig(strategy="delimiter", block_size=10, tolerance=3)
    cands = torch.zeros(30, dtype=torch.bool)
    cands[[6, 11]] = True
    scores = torch.zeros(30)
    scores[6] = 100.0
    assert int(segment(cfg, 30, scores, cands).ends[0]) == 11  # |11-9| < |6-9|


def test_fixed_and_streaming():
    assert segment(DynSplitConfig(strategy="fixed", block_size=4, tolerance=0), 10).ends.tolist() \
        == [3, 7, 9]
    seg = segment(DynSplitConfig(strategy="streaming"), 100)
    assert seg.ends.numel() == 0 and seg.next_start == 0


def test_edge_cases_empty_and_shorter_than_one_block():
    cfg = DynSplitConfig()
    assert segment(cfg, 0, torch.zeros(0), torch.zeros(0, dtype=torch.bool)).ends.numel() == 0
    assert segment(cfg, 5, torch.zeros(5), torch.ones(5, dtype=torch.bool)).ends.tolist() == [4]
    partial = segment(cfg, 5, torch.zeros(5), torch.ones(5, dtype=torch.bool), complete=False)
    assert partial.ends.numel() == 0 and partial.next_start == 0


def test_missing_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="scores"):
        segment(DynSplitConfig(), 10, None, torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidates"):
        segment(DynSplitConfig(strategy="delimiter"), 10)
    with pytest.raises(ValueError, match="start"):
        segment(DynSplitConfig(strategy="fixed", tolerance=0), 10, start=11)
