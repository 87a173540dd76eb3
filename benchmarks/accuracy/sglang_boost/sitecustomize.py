"""Benchmark-side speed fix for SGLang 0.5.23's CPU attention backend, loaded into the server's
processes through PYTHONPATH by ``run.py`` (``--no-fast-extend`` turns it off).

``TorchNativeAttnBackend._run_sdpa_forward_extend`` attends with a *redundant* full-length query
per request (a [seq, seq] causal attention, then keeps the rows of the new tokens). For a request
whose prompt comes from the radix cache, the 1-token extend then costs a whole prompt's attention:
on 2 cores, 9 requests on a cached 4k prompt took ~60 s instead of ~1 s, which defeats paying the
prefill once. This replacement attends with the new queries only (causal mask offset by the
cached prefix); same math, identical outputs on the checked prompts (see the results' meta).
Anything it does not cover (cross-attention, encoder lengths, sliding windows, non-causal) goes to
the original. The module is patched when SGLang imports it, in every process.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "sglang.srt.layers.attention.torch_native_backend"


def _patch(mod):
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    cls = mod.TorchNativeAttnBackend
    orig = cls._run_sdpa_forward_extend

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token,
                                 req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                                 encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
                                 is_cross_attn=False, sliding_window_size=None):
        if (encoder_lens is not None or is_cross_attn or not causal
                or (sliding_window_size is not None and sliding_window_size > -1)):
            return orig(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                        seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens, scaling,
                        enable_gqa, causal, is_cross_attn, sliding_window_size)
        q_all = query.movedim(0, 1)  # [H, tokens, D]
        start = 0
        for i in range(seq_lens.shape[0]):
            n, p, length = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
            q = q_all[:, start:start + n]
            toks = req_to_token[req_pool_indices[i], :length]
            k = k_cache[toks].movedim(0, 1)
            v = v_cache[toks].movedim(0, 1)
            if not (q.dtype == k.dtype == v.dtype):
                k, v = k.to(q.dtype), v.to(q.dtype)
            if p == 0:
                o = sdpa(q[None], k[None], v[None], is_causal=True, scale=scaling,
                         enable_gqa=enable_gqa)
            elif n == 1:
                o = sdpa(q[None], k[None], v[None], scale=scaling, enable_gqa=enable_gqa)
            else:
                mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=p)
                o = sdpa(q[None], k[None], v[None], attn_mask=mask, scale=scaling,
                         enable_gqa=enable_gqa)
            output[start:start + n] = o[0].movedim(0, 1)
            start += n
        return output

    cls._run_sdpa_forward_extend = _run_sdpa_forward_extend
    cls._dynsplit_bench_fast_extend = True


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = patched_exec
        return spec


sys.meta_path.insert(0, _Finder())
