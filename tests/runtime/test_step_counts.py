"""StepState's per-forward counters of tokens attended: kept per layer or as a table, summed
when read."""

import torch

from dynsplit_sglang.runtime.state import BatchView, StepState


def _step() -> StepState:
    view = BatchView([0, 1], [0, 0], [10, 20], [9, 19], torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.long), True)
    return StepState(view, [])


def test_sum_and_peak_over_the_layers_equal_the_per_layer_counts():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randint(0, 500, (2, 3), generator=g) for _ in range(28)]
    step = _step()
    assert step.head_attended is None and step.row_attended is None
    for counts in layers:
        step.count_rows(counts)
    stacked = torch.stack(layers)
    assert torch.equal(step.head_attended, stacked.sum(0))
    assert torch.equal(step.head_peak, stacked.amax(0))
    assert torch.equal(step.row_attended, stacked.sum(0).sum(1))


def test_counts_added_after_a_read_join_the_folded_ones():
    step = _step()
    a, b = torch.tensor([[5, 1, 0], [2, 2, 2]]), torch.tensor([[1, 9, 0], [0, 0, 7]])
    step.count_rows(a)
    assert torch.equal(step.head_peak, a)
    step.count_rows(b)
    assert torch.equal(step.head_attended, a + b)
    assert torch.equal(step.head_peak, torch.maximum(a, b))
    assert torch.equal(step.head_attended, a + b)  # reading twice does not count twice


def test_one_tensor_counted_by_every_layer_counts_each_time():
    """Eviction counts the same kept-slot tensor in every layer."""
    step, kept = _step(), torch.tensor([[3, 3, 3], [4, 4, 4]])
    for _ in range(5):
        step.count_rows(kept)
    assert torch.equal(step.head_attended, kept * 5) and torch.equal(step.head_peak, kept)


def test_a_counts_table_is_read_as_it_stands_and_joins_the_per_layer_counts():
    """The decode wrapper's [L, B, Hkv] table, written in place as layers run: a read sees the
    rows written so far (zeros count nothing), a later read the rest, never twice."""
    step, table = _step(), torch.zeros(3, 2, 3, dtype=torch.long)
    step.counts_table = table
    table[0] = torch.tensor([[4, 0, 1], [2, 2, 2]])
    assert torch.equal(step.head_attended, table[0])
    table[1] = torch.tensor([[1, 8, 1], [0, 0, 9]])
    extra = torch.tensor([[10, 0, 0], [0, 0, 0]])
    step.count_rows(extra)  # a layer counted the other way
    total, peak = step.attended()
    assert torch.equal(total, table.sum(0) + extra)
    assert torch.equal(peak, torch.maximum(table.amax(0), extra))
    assert torch.equal(step.row_attended, (table.sum(0) + extra).sum(1))
