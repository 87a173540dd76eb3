"""Pure-core evaluation of a compression method on an HF transformers model (no SGLang).

The reference the parity test (``tests/accuracy/test_parity.py``) holds the SGLang path to:
dense prefill (the scored layers vote, as in ``dynsplit_sglang.hf_reference``), the prompt split
once by ``core.segment`` (complete, as SGLang closes the prompt at its first decode step), the
first answer token from the prefill logits, then greedy decode where every layer from
``dense_layers`` on attends through the core: ``summarize`` (min/max keys of the prompt blocks)
→ ``score_blocks`` → ``plan_selection``/``select`` → ``sparse_decode_attention``.

Returns the output token ids, the tokens attended (summed over decode steps, compressed layers
and KV heads: the quantity SGLang's ``tokens_attended`` counter adds up) and the blocks kept at
each step (for inspection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dynsplit_sglang import core
from dynsplit_sglang.core import DynSplitConfig, segment
from dynsplit_sglang.hf_reference import capture_importance, prompt_candidates

_ATTN = "dynsplit_core_eval"


@dataclass
class _Request:
    cfg: DynSplitConfig
    table: core.BlockTable
    prompt_len: int
    summaries: dict = field(default_factory=dict)  # layer -> (center, radius) [NB, Hkv, D]
    tokens_attended: int = 0
    kept: list = field(default_factory=list)  # per step and compressed layer: bool [Hkv, NB]
    trace: object = None  # optional callback, see generate(trace=...)
    pin: float = 0.0  # experimental, see generate(pin=...)
    pinned: dict = field(default_factory=dict)  # layer -> bool [Hkv, NB]
    sticky: float = 0.0  # experimental, see generate(sticky=...)
    last_kept: dict = field(default_factory=dict)  # layer -> bool [Hkv, NB] of the step before
    neighbor: bool = False  # experimental, see generate(neighbor=...)
    oracle: bool = False  # diagnostic, see generate(oracle=...)
    refine: float = 1.0  # see generate(refine=...)


_active: _Request | None = None


def _core_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    req = _active
    layer = module.layer_idx
    if req is None or query.shape[2] != 1 or query.shape[0] != 1 or layer < req.cfg.dense_layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    cfg = req.cfg
    seq = key.shape[2]  # tokens in the sequence including the current one
    budget = cfg.decode_budget(seq)
    if seq <= budget:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    k = key[0].transpose(0, 1)  # [T, Hkv, D]: post-RoPE, as in SGLang's pool
    v = value[0].transpose(0, 1)
    q = query[0, :, 0]  # [Hq, D]
    nb = req.table.capacity
    if layer not in req.summaries:
        center, radius = core.summarize(k[None, : req.prompt_len], req.table, cfg.max_block_len,
                                        cfg.summary_spread)
        # Stored in the KV dtype, as SGLang's block store keeps them (a gauss center is a mean,
        # not one of the keys, so the rounding matters at near ties).
        req.summaries[layer] = (center[0].to(k.dtype), radius[0].to(k.dtype))
    center, radius = req.summaries[layer]
    index = torch.arange(nb)[None].masked_fill(req.table.lens == 0, -1)
    if req.oracle:
        scores = _true_max(req, q, k)[None]
    else:
        scores = core.score_blocks(q[None], center, radius, index,
                                   cfg.summary_spread is not None)
    plan = core.plan_selection(req.table, torch.tensor([seq]), budget, cfg.sink,
                               cfg.recent_for(budget), capacity=budget,
                               max_block_len=cfg.max_block_len)
    if req.neighbor:
        scores = _with_predecessor(scores, plan.clip_len > 0)
    if req.pin > 0:
        if layer not in req.pinned:
            req.pinned[layer] = _pin_blocks(req, q, k, plan)
        scores = torch.where(req.pinned[layer][None], scores + _PIN_BONUS, scores)
    if req.sticky > 0 and layer in req.last_kept:
        held = _greedy_prefix(scores[0], req.last_kept[layer] & (plan.clip_len[0][None] > 0),
                              req.table.lens[0].long(), req.sticky * int(plan.block_budget[0]))
        scores = torch.where(held[None], scores + _PIN_BONUS, scores)
    if req.refine > 1:  # the core's two-stage selection (core.select_refined), as served:
        # the kept blocks are then chosen by their exact scores, which the trace shows
        cand_plan = core.candidate_plan(plan, req.refine)
        scores = core.exact_block_scores(q[None], k, torch.arange(seq)[None],
                                         core.select(scores, cand_plan), cand_plan)
    sel = core.select(scores, plan)
    req.last_kept[layer] = sel.blocks[0]
    req.tokens_attended += int(sel.counts.sum())
    req.kept.append(sel.blocks[0])
    slots = core.positions_to_slots(sel.positions, torch.arange(seq)[None])
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    if req.trace is not None:
        req.trace(step=seq - req.prompt_len - 1, layer=layer, q=q, k=k, scale=scale,
                  scores=scores[0], kept=sel.blocks[0], plan=plan)
    out = core.sparse_decode_attention(q[None], k, v, slots, scale)  # [1, Hq, D]
    return out[:, None], None  # [B, q_len, Hq, D]


_PIN_BONUS = 1e6  # above any block score: pinned blocks are taken first, in their score order


def _pin_blocks(req: _Request, q, k, plan) -> torch.Tensor:
    """bool [Hkv, NB]: per KV head, the selectable blocks (outside the sink and the recent
    window) with the largest true max q·k over the group's query heads at this first compressed
    step, in that order while their whole lengths fit req.pin of the block budget.
    Experimental (sweep.py's pin=): a question-aware prior that stays selected at every later
    step, for the steps whose query is diffuse (the separator after a value)."""
    return _greedy_prefix(_true_max(req, q, k), plan.clip_len[0][None] > 0,
                          req.table.lens[0].long(),
                          req.pin * int(plan.block_budget[0]))


def _true_max(req: _Request, q, k) -> torch.Tensor:
    """float32 [Hkv, NB]: per KV head and prompt block, the largest q·k over the block's keys
    and the group's query heads (the oracle block score; -inf for table padding)."""
    hkv, nb = k.shape[1], req.table.capacity
    logit = torch.einsum("hgd,thd->htg", q.view(hkv, q.shape[0] // hkv, -1).float(),
                         k[:req.prompt_len].float()).amax(-1)
    lens = req.table.lens[0].long()
    block = torch.repeat_interleave(torch.arange(nb), lens)  # position -> block: blocks tile
    return torch.full((hkv, nb), -torch.inf).scatter_reduce(
        1, block[None].expand(hkv, -1), logit, "amax")


def _with_predecessor(scores, selectable) -> torch.Tensor:
    """[B, Hkv, NB]: each block scores at least as its selectable predecessor, so the block
    after a matched one (a needle's value after its key phrase) is taken with it."""
    prev = scores[..., :-1].masked_fill(~selectable[:, None, :-1], -torch.inf)
    out = scores.clone()
    out[..., 1:] = torch.maximum(scores[..., 1:], prev)
    return out


def _greedy_prefix(priority, allowed, lens, cap) -> torch.Tensor:
    """bool [Hkv, NB]: per KV head, the allowed blocks in descending priority while their
    whole lengths (summed) fit cap tokens."""
    allowed = allowed.expand_as(priority)
    best = priority.float().masked_fill(~allowed, -torch.inf)
    order = best.argsort(dim=-1, descending=True, stable=True)
    ok = torch.isfinite(best.gather(1, order))  # a prefix of the order, as fits below
    fill = torch.cumsum(lens[order] * ok, -1)  # a greedy prefix: whole blocks while they fit
    keep = ok & (fill <= cap)
    return torch.zeros_like(allowed).scatter(1, order, keep)


AttentionInterface.register(_ATTN, _core_attention)
# Without a registered mask function transformers gives a custom attention no causal mask.
AttentionMaskInterface.register(_ATTN, sdpa_mask)


@torch.inference_mode()
def prefill(model, input_ids: list[int], cfg: DynSplitConfig | None = None):
    """Dense prefill; returns (cache, last logits, importance scores or None)."""
    ids = torch.tensor([input_ids])
    cache = DynamicCache()
    scores = None
    if cfg is not None and cfg.strategy_impl.needs_votes:
        with capture_importance(model, cfg) as acc:
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        scores = acc.scores(len(input_ids))
    else:
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1], scores


def segmentation(tokenizer, input_ids: list[int], cfg: DynSplitConfig, scores=None):
    """The prompt's blocks as SGLang closes them (complete segmentation of [0, L))."""
    cands = prompt_candidates(tokenizer, torch.tensor(input_ids), cfg)
    return segment(cfg, len(input_ids), scores, cands)


@torch.inference_mode()
def generate(model, tokenizer, input_ids: list[int], cfg: DynSplitConfig, max_new_tokens: int,
             prefilled=None, first_token: str = "dense", trace=None,
             forced: list[int] | None = None, pin: float = 0.0, sticky: float = 0.0,
             neighbor: bool = False, oracle: bool = False, refine: float | None = None) -> dict:
    """Greedy answer of one request under cfg through the pure core.

    first_token: "dense" (as SGLang serves every prompt, cached or not: the first answer token
    from the prefill's own logits) or "compressed" (a diagnostic, stricter rule: the prompt's
    last token is fed as the first decode step over the prompt's other tokens split and closed,
    so a selection error shows at the first answer token too).
    prefilled: (cache, logits, scores) of a dense prefill of this whole prompt to reuse (the
    cache is cropped back afterwards; scores: the importance scores when cfg's strategy needs
    votes; they come from every prompt query, as the server's prefill of the prompt votes).
    trace: called at every compressed decode step of every compressed layer with step (the
    decode forward's index, 0 first), layer, q [Hq, D], k [T, Hkv, D] (every key, the current
    token's included), scale, scores [Hkv, NB] (those the kept blocks were chosen by: with
    refine > 1 the candidates' exact max q·k, -inf for the other blocks), kept [Hkv, NB] and
    the SelectionPlan; for inspection only (benchmarks/accuracy/diagnose.py), results are the same with or without.
    forced: teacher forcing (benchmarks/accuracy/sweep.py): feed these tokens instead of the
    model's own and return, per forced token, its log-probability and whether it was the argmax
    (a paired, continuous fidelity measure: forced = full KV's own greedy answer).
    pin: experimental, not in the server: this fraction of each layer's block budget goes, at
    every step, to the blocks the first compressed step's query attends most (_pin_blocks).
    sticky: experimental, not in the server: at every step after the first, up to this fraction
    of each layer's block budget goes to the blocks that layer kept at the step before (in this
    step's score order), so a step whose query is diffuse (the separator after a value) keeps
    what the steps before it looked at.
    neighbor: experimental, not in the server: a block scores at least as the block before it
    (_with_predecessor).
    oracle: diagnostic, not a method: blocks are scored by their true max q·k (_true_max) at
    every step, so what a selection at this budget could do at best can be told apart from
    what the score loses.
    refine: cfg.refine unless given (the server's two-stage selection: the score picks
    candidate blocks for refine times the block budget, and their exact max q·k picks the
    budget among them, core.select_refined; 1 = the score alone)."""
    global _active
    if first_token not in ("compressed", "dense"):
        raise ValueError(f"first_token={first_token!r}: expected 'compressed' or 'dense'")
    length = len(input_ids)
    if prefilled is None:
        prefilled = prefill(model, input_ids, cfg)
    cache, logits, scores = prefilled
    closed = length - 1 if first_token == "compressed" else length  # the prompt's split part
    seg = segmentation(tokenizer, input_ids[:closed], cfg,
                       None if scores is None else scores[:closed])
    table = core.BlockTable.from_ends([seg.ends])
    req = _Request(cfg, table, closed, trace=trace, pin=pin, sticky=sticky,
                   neighbor=bool(neighbor), oracle=bool(oracle),
                   refine=cfg.refine if refine is None else refine)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = [] if first_token == "compressed" else [int(logits.argmax())]
    if forced is not None:
        max_new_tokens = len(forced)
        logprobs, match = ([float(logits.log_softmax(-1)[forced[0]])], [out == forced[:1]]) \
            if out else ([], [])
        out = list(forced[:len(out)])
    prev_impl = model.config._attn_implementation
    model.set_attn_implementation(_ATTN)
    _active = req
    dense_last = [(layer.keys[:, :, closed:length].clone(), layer.values[:, :, closed:length].clone())
                  for layer in cache.layers]  # restored below: `prefilled` stays reusable
    cache.crop(closed)
    try:
        while len(out) < max_new_tokens and not (out and out[-1] in eos):
            at = closed + len(out) - (first_token == "dense")  # position of the token fed
            token = out[-1] if out else input_ids[-1]
            pos = torch.tensor([[at]])
            lg = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                       position_ids=pos, cache_position=pos[0], use_cache=True).logits[0, -1]
            if forced is not None:
                nxt = forced[len(out)]
                logprobs.append(float(lg.float().log_softmax(-1)[nxt]))
                match.append(int(lg.argmax()) == nxt)
                out.append(nxt)
            else:
                out.append(int(lg.argmax()))
    finally:
        _active = None
        model.set_attn_implementation(prev_impl)
        cache.crop(closed)
        for i, (k, v) in enumerate(dense_last):
            cache.update(k, v, i)
    extra = {} if forced is None else {"forced_logprobs": logprobs, "forced_match": match}
    return {"output_ids": out, "tokens_attended": req.tokens_attended, **extra,
            "block_starts": table.starts[0, : int(table.counts[0])].tolist(),
            "block_lens": table.lens[0, : int(table.counts[0])].tolist(), "kept": req.kept}
