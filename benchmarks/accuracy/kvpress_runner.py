"""kvpress peers of the accuracy suite. Runs INSIDE the kvpress virtual environment
(``.cache/venv-kvpress``: kvpress pins transformers<5.3, SGLang 5.19), started by ``run.py``.

Input: a JSON file of samples (token ids, made by ``tasks.py`` in the main environment, so both
sides see identical tokens) and the presses/budgets to run. Output: one JSON line per sample on
stdout: the greedy output token ids of every (press, budget) and of full KV.

How a prompt is evaluated (the prefill is paid once for all presses and budgets):

1. One dense prefill of the whole prompt (context + question) with a forward hook on every
   attention layer. When a layer has run over the last chunk, the hook calls each press's own
   ``compress(module, hidden_states, keys, values, None, kwargs)`` (kvpress's code, unchanged)
   on that layer's full keys, with the values replaced by the token positions: the "values" it
   returns are the positions the press keeps. This is exactly what ``with press(model):`` does to
   the cache (kvpress's hook also compresses a layer after its prefill attention), once per press.
   Layers below ``--dense-layers`` are left uncompressed, as in the SGLang product.
   The prompt's prefix shared with the previous sample is reused from its KV cache (tasks share
   their haystack up to the first needle), as SGLang's radix cache does.
2. The first answer token comes from the prefill's logits (``--first-token dense``, the default,
   as the SGLang side serves every prompt, cached or not). With ``--first-token compressed``
   (a stricter, diagnostic rule) the prefill covers the prompt but its last token, the presses
   compress that, and the last token is the first decode step.
3. Greedy decode, all (press, budget) variants in one batch: each variant's cache holds only
   the kept positions of each layer (padded to the longest variant and masked); new tokens are
   appended and always attended. Positions continue at the prompt length (as kvpress's pipeline
   does). Full KV decodes separately, on the uncompressed cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MIN_LAST_CHUNK = 128  # SnapKV needs more than its 64-query window in the last prefill chunk


def make_press(name: str, budget: float):
    """The kvpress press for a method at a budget (fraction of the context kept), kvpress
    defaults otherwise: SnapKV window 64 / kernel 5, ChunkKV over SnapKV scores with chunks of
    20, StreamingLLM with 4 sink tokens. ``snapkv-paper`` is SnapKV with its paper's setting
    (observation window 32, max-pool kernel 7: Li et al., "SnapKV: LLM Knows What You are
    Looking for Before Generation", arXiv 2404.14469, section 4 / appendix settings)."""
    from kvpress import ChunkKVPress, SnapKVPress, StreamingLLMPress

    ratio = 1.0 - budget
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio)
    if name == "snapkv-paper":
        return SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7)
    if name == "chunkkv":
        return ChunkKVPress(press=SnapKVPress(compression_ratio=ratio), chunk_length=20)
    if name == "streamingllm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    raise ValueError(f"unknown press {name!r}")


class _Decode:
    """State read by the masked attention function during batched decode."""

    valid: dict[int, torch.Tensor] | None = None  # layer -> bool [B, Hkv, T0]


_DECODE = _Decode()
_ATTN = "kvpress_peer_masked"


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """SDPA; during batched decode, each (variant, KV head) attends only to its kept positions
    (plus every generated token). Prefill falls through to plain causal SDPA."""
    valid = None if _DECODE.valid is None else _DECODE.valid.get(module.layer_idx)
    b, hq, q_len, _ = query.shape
    hkv = key.shape[1]
    if valid is None or q_len != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    t = key.shape[2]
    if t > valid.shape[-1]:
        valid = torch.cat([valid, valid.new_ones(b, hkv, t - valid.shape[-1])], dim=-1)
    mask = valid.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=hq != hkv)
    return out.transpose(1, 2).contiguous(), None


class SharedPrefill:
    """Forward hooks that let every (press, budget) pick its kept positions from one prefill."""

    def __init__(self, model, variants: dict[str, object], dense_layers: int):
        self.model = model
        self.variants = variants
        self.dense_layers = dense_layers
        self.total_len = None
        self.kept: dict[str, dict[int, torch.Tensor]] = {}
        lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
        self.layers = lm.layers
        for press in variants.values():
            press.post_init_from_model(model)
        self.hooks = []
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb  # as kvpress's BasePress.__call__ does
            self.hooks.append(layer.self_attn.register_forward_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs, output):
        if self.total_len is None:
            return output
        cache_position = kwargs["cache_position"]
        if int(cache_position[-1]) + 1 != self.total_len:  # not the last prefill chunk
            return output
        layer = module.layer_idx
        if layer < self.dense_layers:
            return output
        cache = kwargs["past_key_values"]
        keys = cache.layers[layer].keys  # [1, Hkv, L, D]
        _, hkv, length, d = keys.shape
        pos = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1)
        pos = pos.expand(1, hkv, length, d).to(keys.dtype)
        hidden = kwargs["hidden_states"]
        with torch.no_grad():
            for name, press in self.variants.items():
                _, kept = press.compress(module, hidden, keys, pos, None, kwargs)
                self.kept[name][layer] = kept[0, :, :, 0].round().long()  # [Hkv, n_kept]
        return output

    def prefill(self, ids: torch.Tensor, cache, start: int):
        """Prefill ids[start:] on a cache holding ids[:start]; returns the last logits."""
        self.total_len = ids.shape[1]
        self.kept = {name: {} for name in self.variants}
        try:
            pos = torch.arange(start, ids.shape[1]).view(1, -1)
            out = self.model(input_ids=ids[:, start:], past_key_values=cache, position_ids=pos,
                             cache_position=pos[0], use_cache=True, logits_to_keep=1)
        finally:
            self.total_len = None
        return out.logits[0, -1]


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def decode_variants(model, cache, kept: dict[str, dict[int, torch.Tensor]], first_token: int,
                    length: int, max_new: int, eos: set[int], n_layers: int) -> dict[str, list[int]]:
    """Greedy decode of all variants in one batch on per-variant gathered caches."""
    from transformers import DynamicCache

    names = list(kept)
    if not names or max_new <= 1:
        return {n: [first_token] for n in names}
    b = len(names)
    vcache = DynamicCache()
    valid = {}
    for li in range(n_layers):
        k_full, v_full = cache.layers[li].keys[:, :, :length], cache.layers[li].values[:, :, :length]
        _, hkv, _, d = k_full.shape
        if li not in kept[names[0]]:  # dense layer
            vcache.update(k_full.expand(b, -1, -1, -1).contiguous(),
                          v_full.expand(b, -1, -1, -1).contiguous(), li)
            continue
        width = max(kept[n][li].shape[-1] for n in names)
        idx = torch.zeros(b, hkv, width, dtype=torch.long)
        ok = torch.zeros(b, hkv, width, dtype=torch.bool)
        for j, n in enumerate(names):
            k = kept[n][li].sort(dim=-1).values
            idx[j, :, : k.shape[-1]] = k
            ok[j, :, : k.shape[-1]] = True
        gather = idx[..., None].expand(b, hkv, width, d)
        vcache.update(torch.gather(k_full.expand(b, -1, -1, -1), 2, gather),
                      torch.gather(v_full.expand(b, -1, -1, -1), 2, gather), li)
        valid[li] = ok
    out = [[first_token] for _ in names]
    done = [first_token in eos for _ in names]
    tok = torch.full((b, 1), first_token, dtype=torch.long)
    _DECODE.valid = valid
    try:
        for step in range(1, max_new):
            pos = torch.full((b, 1), length + step - 1, dtype=torch.long)
            logits = model(input_ids=tok, past_key_values=vcache, position_ids=pos,
                           use_cache=True).logits[:, -1]
            nxt = logits.argmax(-1)
            for j in range(b):
                if not done[j]:
                    out[j].append(int(nxt[j]))
                    done[j] = int(nxt[j]) in eos
            if all(done):
                break
            tok = nxt.view(b, 1)
    finally:
        _DECODE.valid = None
    return dict(zip(names, out))


def decode_full(model, cache, first_token: int, length: int, max_new: int, eos: set[int]):
    """Greedy decode on the uncompressed cache (cropped back to the prompt afterwards)."""
    out = [first_token]
    tok = first_token
    for step in range(1, max_new):
        if tok in eos:
            break
        pos = torch.tensor([[length + step - 1]])
        logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, position_ids=pos,
                       cache_position=pos[0], use_cache=True).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
    cache.crop(length)
    return out


def self_check(model, pre: SharedPrefill, ids: torch.Tensor) -> dict:
    """Check the shared prefill against kvpress's own path: for every variant, the keys that
    ``with press(model): model(ids)`` leaves in the cache of each compressed layer are exactly the
    keys at the positions the shared prefill picked (as multisets; kvpress keeps top-k order)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    pre.prefill(ids, cache, 0)
    worst = 0.0
    for name, press in pre.variants.items():
        ref = DynamicCache()
        with press(model):
            model(input_ids=ids, past_key_values=ref, use_cache=True, logits_to_keep=1)
        for li, kept in pre.kept[name].items():
            mine = cache.layers[li].keys[0].gather(
                1, kept.sort(-1).values[..., None].expand(-1, -1, cache.layers[li].keys.shape[-1]))
            theirs = ref.layers[li].keys[0]
            if mine.shape != theirs.shape:
                raise AssertionError(f"{name} layer {li}: kept {tuple(mine.shape)} vs kvpress "
                                     f"{tuple(theirs.shape)}")
            dist = torch.cdist(theirs.double(), mine.double(),
                               compute_mode="donot_use_mm_for_euclid_dist")  # [Hkv, n, n]
            w = max(float(dist.min(-1).values.max()), float(dist.min(-2).values.max()))
            if w > 1e-3: print(name, li, w, file=sys.stderr)
            worst = max(worst, w)
    if worst > 1e-3:
        raise AssertionError(f"shared prefill differs from kvpress's own path (max dist {worst})")
    return {"self_check": "ok", "max_key_distance": worst, "variants": list(pre.variants)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--samples", required=True, help="JSON list of samples (tasks.Sample dicts)")
    ap.add_argument("--presses", nargs="+", default=["snapkv", "chunkkv", "streamingllm"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--full-every", type=int, default=1,
                    help="full-KV decode on every k-th sample (0 = never)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--first-token", choices=("compressed", "dense"), default="dense",
                    help="where the first answer token comes from (see the module docstring)")
    ap.add_argument("--self-check", action="store_true",
                    help="compare the shared prefill with kvpress's own path on the first "
                         "sample, print the result and exit")
    args = ap.parse_args(argv)

    import kvpress  # noqa: F401  (patches transformers' attention functions on import)
    import transformers
    from importlib.metadata import version
    from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    AttentionInterface.register(_ATTN, _masked_attention)
    # A custom attention name gets NO mask from transformers unless a mask function is registered
    # for it: SDPA would then apply a top-left causal mask to a prefill chunk that follows a cached
    # prefix (wrong). Give it SDPA's mask.
    AttentionMaskInterface.register(_ATTN, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.set_attn_implementation(_ATTN)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    n_layers = model.config.num_hidden_layers
    samples = json.loads(open(args.samples).read())
    print(json.dumps({"hello": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "dense_layers": args.dense_layers}}), flush=True)

    variants = {f"{p}@{b:g}": make_press(p, b) for b in args.budgets for p in args.presses}
    pre = SharedPrefill(model, variants, args.dense_layers)
    if args.self_check:
        with torch.inference_mode():
            print(json.dumps(self_check(model, pre, torch.tensor([samples[0]["input_ids"]]))),
                  flush=True)
        return 0
    prev_ids: list[int] = []
    cache = None
    with torch.inference_mode():
        for s in samples:
            t0 = time.perf_counter()
            # Compressed first token: prefill all but the last prompt token, which is then fed
            # as the first decode step (its output is the first answer token).
            feed_last = args.first_token == "compressed"
            ids_list = s["input_ids"][:-1] if feed_last else s["input_ids"]
            length = len(ids_list)
            ids = torch.tensor([ids_list])
            start = min(_lcp(prev_ids, ids_list), length - MIN_LAST_CHUNK) if cache is not None else 0
            if start <= 0:
                cache, start = DynamicCache(), 0
            else:
                cache.crop(start)
            logits = pre.prefill(ids, cache, start)
            t_prefill = time.perf_counter() - t0
            first = s["input_ids"][-1] if feed_last else int(logits.argmax())
            max_new = s["max_new_tokens"] + feed_last
            outs = decode_variants(model, cache, pre.kept, first, length, max_new, eos, n_layers)
            if args.full_every and samples.index(s) % args.full_every == 0:
                outs["full@1"] = decode_full(model, cache, first, length, max_new, eos)
            if feed_last:  # drop the fed prompt token
                outs = {n: o[1:] for n, o in outs.items()}
            kept_tokens = {n: int(sum(k.shape[-1] for k in pre.kept[n].values()) /
                                  max(1, len(pre.kept[n])))
                           for n in pre.kept}
            prev_ids = ids_list
            print(json.dumps({"sample": s["id"], "outputs": outs, "prefilled": length - start,
                              "kept_per_layer": kept_tokens,
                              "prefill_s": round(t_prefill, 2),
                              "total_s": round(time.perf_counter() - t0, 2)}), flush=True)
    for h in pre.hooks:
        h.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
