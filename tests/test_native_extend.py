"""patches.native_extend: torch_native's extend attention, without the redundant query, is unchanged."""

import pytest
import torch

pytest.importorskip("sglang")

from dynsplit_sglang.patches import native_extend  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402

HEADS, KV_HEADS, DIM, POOL = 6, 2, 16, 512


def _original():
    method = TorchNativeAttnBackend._run_sdpa_forward_extend
    return getattr(method, "__dynsplit_wraps__", method)


def _batch(prefix_and_new, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(POOL, KV_HEADS, DIM, generator=g).to(dtype)
    v_cache = torch.randn(POOL, KV_HEADS, DIM, generator=g).to(dtype)
    req_to_token = torch.zeros(len(prefix_and_new) + 1, 256, dtype=torch.int64)
    free = torch.randperm(POOL - 1, generator=g) + 1  # scattered slots, slot 0 is padding
    used = 0
    for r, (p, n) in enumerate(prefix_and_new):
        req_to_token[r + 1, : p + n] = free[used : used + p + n]
        used += p + n
    tokens = sum(n for _, n in prefix_and_new)
    return dict(
        query=torch.randn(tokens, HEADS, DIM, generator=g).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        req_to_token=req_to_token,
        req_pool_indices=torch.arange(1, len(prefix_and_new) + 1),
        seq_lens=torch.tensor([p + n for p, n in prefix_and_new]),
        extend_prefix_lens=torch.tensor([p for p, _ in prefix_and_new]),
        extend_seq_lens=torch.tensor([n for _, n in prefix_and_new]),
    )


def _run(fn, b, **kw):
    out = torch.full_like(b["query"], float("nan"))
    return fn(
        None, b["query"], out, b["k_cache"], b["v_cache"], b["req_to_token"], b["req_pool_indices"],
        b["seq_lens"], b["extend_prefix_lens"], b["extend_seq_lens"], scaling=DIM**-0.5,
        enable_gqa=True, **kw,
    )


CASES = {
    "fresh prompt": [(0, 37)],
    "one-token extend on a cached prefix": [(120, 1)],
    "chunk after a cached prefix": [(64, 23)],
    "mixed batch": [(0, 5), (97, 1), (30, 40), (0, 1), (150, 9)],
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES)
def test_equal_to_sglang_original(case, dtype, tol):
    b = _batch(CASES[case], dtype)
    want = _run(_original(), b, causal=True)
    got = _run(lambda *a, **k: native_extend.prefix_offset_extend(_original(), *a, **k), b, causal=True)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_uncovered_cases_go_to_the_original():
    calls = []

    def spy(*args):
        calls.append(args)
        return args[2]

    b = _batch([(10, 3)], torch.float32)
    redirected = lambda *a, **k: native_extend.prefix_offset_extend(spy, *a, **k)  # noqa: E731
    _run(redirected, b, causal=False)
    assert len(calls) == 1
    _run(redirected, b, causal=True, sliding_window_size=4)
    assert len(calls) == 2
    _run(redirected, b, causal=True)
    assert len(calls) == 2


def test_registered_by_the_plugin():
    from dynsplit_sglang import plugin

    assert native_extend.TARGET in plugin.register()
    assert native_extend.applied()
