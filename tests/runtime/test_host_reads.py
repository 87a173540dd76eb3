"""The steady-state decode step reads nothing back from the device (a host sync on a GPU): the
batch's rows and lengths come from SGLang's own host copies, the plan's lists go over in one
non-blocking copy, and each request's tokens attended stay on the device until its report."""

from types import SimpleNamespace

import pytest
import torch

from dynsplit_sglang.core import DynSplitConfig
from dynsplit_sglang.runtime import requests
from dynsplit_sglang.runtime.batch import view_of
from dynsplit_sglang.runtime.compressor import to_device
from dynsplit_sglang.runtime.state import BatchView


class DeviceOnly(torch.Tensor):
    """A tensor that stands for a device tensor: reading it back to the host fails the test."""

    def tolist(self):
        raise AssertionError("read back from the device")

    def item(self):
        raise AssertionError("read back from the device")


def _mode(decode: bool):
    return SimpleNamespace(is_idle=lambda: False, is_decode=lambda: decode,
                           is_extend=lambda: not decode)


def test_a_decode_view_reads_sglangs_host_copies_not_the_device():
    rows, seq = [5, 2, 9], [40, 33, 71]
    fb = SimpleNamespace(
        forward_mode=_mode(True), batch_size=3, rids=None,
        req_pool_indices=torch.tensor(rows).as_subclass(DeviceOnly),
        req_pool_indices_cpu=torch.tensor(rows),
        seq_lens=torch.tensor(seq).as_subclass(DeviceOnly), seq_lens_cpu=torch.tensor(seq),
        input_ids=torch.tensor([1, 2, 3]), out_cache_loc=torch.tensor([7, 8, 9]))
    pool = SimpleNamespace(req_generation=torch.arange(16) * 10)
    v = view_of(fb, pool, DynSplitConfig())
    assert (v.rows, v.seq_lens, v.prefix_lens) == (rows, seq, [39, 32, 70])
    assert v.generations == [50, 20, 90] and v.is_decode
    # Without SGLang's host copy the device tensor is read (and this test would see it).
    fb.req_pool_indices_cpu = None
    with pytest.raises(AssertionError, match="read back"):
        view_of(fb, pool, DynSplitConfig())


def test_plan_lists_go_over_in_one_int64_copy():
    out = to_device([[3, 1], [4096, 512], [512, 64], [64, 16]], torch.device("cpu"))
    assert out.dtype == torch.int64 and out.tolist() == [[3, 1], [4096, 512], [512, 64], [64, 16]]
    assert to_device([[True, False]], torch.device("cpu"))[0].bool().tolist() == [True, False]


def test_tokens_attended_stay_on_the_device_until_the_report():
    layers, heads = 3, 2
    row = SimpleNamespace(reused=0, nblocks=0, fallback=False, peak_held=0)
    comp = SimpleNamespace(num_layers=layers + 1, first_compressed=1, kv_heads=heads,
                           kv_heads_total=heads, rows={0: row, 1: row})
    reqs = [requests.RequestCompression(), requests.RequestCompression()]
    view = BatchView([0, 1], [0, 0], [100, 200], [99, 199], torch.zeros(2), torch.zeros(2), True)
    steps = requests.SETTLE_EVERY * 2 + 7
    expected = [0, 0]
    for s in range(steps):
        per_row = torch.tensor([10 + s % 5, 20 + s % 3]).as_subclass(DeviceOnly)
        comp.rows_attended = lambda t=per_row: t
        requests.account(comp, view, reqs)  # must not read per_row back
        expected = [expected[0] + 10 + s % 5, expected[1] + 20 + s % 3]
        assert all(len(r.pending) <= requests.SETTLE_EVERY for r in reqs)
    for r in reqs:  # the report reads them (plain tensors now: the step is over)
        r.pending[:] = [t.as_subclass(torch.Tensor) for t in r.pending]
    reports = [r.report(DynSplitConfig()) for r in reqs]
    assert [x["tokens_attended"] for x in reports] == expected
    assert [x["tokens_dense"] for x in reports] == [steps * n * heads * layers for n in (100, 200)]
    assert all(x["decode_steps"] == steps and x["sparse_steps"] == steps for x in reports)
    assert all(not r.pending for r in reqs)
    # A dense decode (no device counts) adds what dense attention read, on the host.
    comp.rows_attended = lambda: None
    requests.account(comp, view, reqs)
    assert reqs[0].report(DynSplitConfig())["tokens_attended"] == expected[0] + 100 * heads * layers
