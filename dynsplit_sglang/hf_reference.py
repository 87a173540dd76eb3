"""DynSplit-KV on a Hugging Face transformers model, outside SGLang.

The reference path for checks that need a real model without a server: it runs a dense prefill,
lets the scored layers vote on delimiter importance from their post-RoPE queries and keys (the
same inputs the SGLang backend sees), and segments the prompt. Used by the real-model tests,
the scoring-overhead measurement and the accuracy parity check.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .core import DynSplitConfig, ImportanceAccumulator, Segmentation, candidates_for, segment
from .core.delimiters import candidate_mask

_CAPTURE = "dynsplit_capture"
_active: "_Capture | None" = None


@dataclass
class _Capture:
    cfg: DynSplitConfig
    layers: set[int]
    acc: ImportanceAccumulator
    q_start: int = 0


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    cap = _active
    layer = getattr(module, "layer_idx", None)
    if cap is not None and layer in cap.layers and query.shape[0] == 1:
        scale = kwargs.get("scaling") or 1.0 / math.sqrt(query.shape[-1])
        # [1, H, L, D] → [L, H, D]; key holds every position up to the end of this chunk.
        cap.acc.add_layer(query[0].transpose(0, 1), key[0].transpose(0, 1), cap.q_start, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_CAPTURE, _capturing_attention)


@contextlib.contextmanager
def capture_importance(model, cfg: DynSplitConfig, q_start: int = 0):
    """Within the block, the model's prefill feeds an ImportanceAccumulator (yielded)."""
    global _active
    n_layers = model.config.num_hidden_layers
    cap = _Capture(cfg, set(cfg.scored_layers(n_layers)), ImportanceAccumulator(cfg), q_start)
    prev_impl = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    _active = cap
    try:
        yield cap.acc
    finally:
        _active = None
        model.set_attn_implementation(prev_impl)


@torch.inference_mode()
def prefill_and_segment(model, tokenizer, input_ids: torch.Tensor, cfg: DynSplitConfig):
    """Dense prefill of one prompt ([L] ids); returns (Segmentation, scores, candidate flags)."""
    ids = input_ids.view(1, -1)
    length = ids.shape[1]
    scores = None
    if cfg.strategy_impl.needs_votes:
        with capture_importance(model, cfg) as acc:
            model(ids, logits_to_keep=1)
        scores = acc.scores(length)
    cands = prompt_candidates(tokenizer, ids[0], cfg)
    seg: Segmentation = segment(cfg, length, scores, cands)
    return seg, scores, cands


def prompt_candidates(tokenizer, input_ids: torch.Tensor, cfg: DynSplitConfig):
    """Candidate flags [L] of a prompt under cfg's strategy (None if it reads no candidate)."""
    mode = cfg.strategy_impl.candidate_mode(cfg)
    return candidates_for(input_ids, candidate_mask(tokenizer, mode)) if mode else None
