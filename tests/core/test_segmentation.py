import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig, segment


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
