"""Extend attention of SGLang 0.5.23's torch_native backend without the redundant full-length query.

Target: ``sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.
_run_sdpa_forward_extend`` (SGLang 0.5.23), the backend a CPU host serves with.

The original builds, per request, a query of the *whole* sequence length (prefix rows left
uninitialised), runs a [seq, seq] causal attention and keeps the rows of the new tokens. A request
whose prompt comes from the radix cache then pays a full prompt's attention for a one-token extend:
on 2 cores, nine requests on a cached 4k prompt took ~60 s instead of ~1 s, which undoes the point
of the prefix cache (and of splitting a shared prefix once). The replacement attends with the new
queries only, the causal mask offset by the cached prefix: the same rows of the same softmax, so the
outputs are equal (tests/test_native_extend.py compares both on random caches). Cases it does not
need (encoder lengths, cross-attention, sliding windows, non-causal) go to the original unchanged.

Applied in every SGLang process, compression on or off, so a dense baseline gets the same fix.
``DYNSPLIT_NATIVE_EXTEND=original`` keeps SGLang's method.
"""

from __future__ import annotations

import os

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

TARGET = (
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend"
)
ENV = "DYNSPLIT_NATIVE_EXTEND"
# Set by patches.eviction under --dynsplit-evict: prefix positions whose slot is 0 were evicted
# and are left out of the keys (the causal offset is then the number of live prefix keys).
MASK_EVICTED = False


def prefix_offset_extend(
    original,
    self,
    query,
    output,
    k_cache,
    v_cache,
    req_to_token,
    req_pool_indices,
    seq_lens,
    extend_prefix_lens,
    extend_seq_lens,
    encoder_lens=None,
    scaling=None,
    enable_gqa=False,
    causal=False,
    is_cross_attn=False,
    sliding_window_size=None,
):
    windowed = sliding_window_size is not None and sliding_window_size > -1
    if encoder_lens is not None or is_cross_attn or not causal or windowed:
        return original(
            self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
            extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal,
            is_cross_attn, sliding_window_size,
        )
    q_all = query.movedim(0, 1)  # [heads, tokens, dim]
    # One host sync for the three length vectors instead of three per request.
    lens = torch.stack([extend_seq_lens, extend_prefix_lens, seq_lens]).tolist()
    start = 0
    for i, (n, p, length) in enumerate(zip(*lens)):
        q = q_all[:, start : start + n]
        slots = req_to_token[req_pool_indices[i], :length]
        if MASK_EVICTED and p > 0:
            live = slots[:p] != 0
            slots = torch.cat([slots[:p][live], slots[p:]])
            p, length = slots.numel() - n, slots.numel()
        k = k_cache[slots].movedim(0, 1)
        v = v_cache[slots].movedim(0, 1)
        if not (q.dtype == k.dtype == v.dtype):
            k, v = k.to(q.dtype), v.to(q.dtype)
        if p == 0:
            o = sdpa(q[None], k[None], v[None], is_causal=True, scale=scaling, enable_gqa=enable_gqa)
        elif n == 1:  # the last position sees every key: no mask needed
            o = sdpa(q[None], k[None], v[None], scale=scaling, enable_gqa=enable_gqa)
        else:  # row i is position p + i: it sees keys 0 .. p + i
            mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=p)
            o = sdpa(q[None], k[None], v[None], attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)
        output[start : start + n] = o[0].movedim(0, 1)
        start += n
    return output


def register() -> list[str]:
    """Replace the method once; return the target's name (empty when turned off)."""
    if os.environ.get(ENV, "").lower() == "original":
        return []
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend as cls

    current = cls._run_sdpa_forward_extend
    if getattr(current, "__dynsplit_wraps__", None) is None:

        def _run_sdpa_forward_extend(self, *args, **kwargs):
            return prefix_offset_extend(current, self, *args, **kwargs)

        _run_sdpa_forward_extend.__dynsplit_wraps__ = current
        cls._run_sdpa_forward_extend = _run_sdpa_forward_extend
    return [TARGET]


def applied() -> bool:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend as cls

    return hasattr(cls._run_sdpa_forward_extend, "__dynsplit_wraps__")
