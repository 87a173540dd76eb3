"""From SGLang 0.5.23's ModelRunner / ForwardBatch to the compressor's SGLang-free inputs."""

from __future__ import annotations

import logging
import os

from ..core.delimiters import MODES, candidate_mask
from ..settings import Settings
from . import hooks, requests
from .compressor import BatchView, Compressor
from .report import Reporter

logger = logging.getLogger(__name__)


def _vocab_masks(tokenizer_path: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return {mode: candidate_mask(tok, mode) for mode in MODES}


def _tp_all_reduce(t):
    from sglang.srt.distributed import get_tp_group

    return get_tp_group().all_reduce(t)


def _free_slot_ids(alloc):
    """The allocator's free slots (TokenToKVPoolAllocator: free_pages + release_pages, page 1)."""
    import torch

    parts = [getattr(alloc, a, None) for a in ("free_pages", "release_pages")]
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _allocator_hooks(model_runner) -> dict:
    hooks = {}
    rows = getattr(model_runner, "req_to_token_pool", None)
    if rows is not None and hasattr(rows, "free_slots"):
        every = range(rows.req_to_token.shape[0])
        hooks["live_rows"] = lambda: set(every) - set(rows.free_slots)
    alloc = getattr(model_runner, "token_to_kv_pool_allocator", None)
    if alloc is None:
        return hooks
    return {**hooks, "free_slots": alloc.free, "free_slot_ids": lambda: _free_slot_ids(alloc),
            "used_slots": lambda: alloc.size - alloc.available_size(),
            "alloc_slots": alloc.alloc, "available_slots": alloc.available_size}


def _memory_stats(comp: Compressor) -> dict:
    """What the block store holds and, when patches/memory.py sized the pool, what it reserved."""
    return {"store_bytes": comp.store_bytes, **hooks.memory_plan}


def build_compressor(model_runner, settings: Settings) -> Compressor:
    pool = model_runner.token_to_kv_pool
    req_to_token = model_runner.req_to_token_pool.req_to_token
    k0 = pool.get_key_buffer(pool.start_layer if hasattr(pool, "start_layer") else 0)
    num_layers = pool.layer_num
    sa = model_runner.server_args
    masks = _vocab_masks(sa.tokenizer_path or sa.model_path)
    comp = Compressor(
        settings.config,
        num_layers=num_layers,
        num_q_heads=model_runner.model_config.get_num_attention_heads(sa.tp_size),
        kv_heads=k0.shape[1],
        head_dim=k0.shape[2],
        dtype=k0.dtype,
        device=k0.device,
        num_slots=k0.shape[0],
        max_rows=req_to_token.shape[0],
        max_context=req_to_token.shape[1],
        req_to_token=req_to_token,
        key_buffer=pool.get_key_buffer,
        value_buffer=pool.get_value_buffer,
        vocab_masks=masks,
        reporter=Reporter(os.environ.get("DYNSPLIT_STATS_PATH"),
                          prometheus=bool(getattr(sa, "enable_metrics", False))),
        tp_size=sa.tp_size,
        all_reduce=_tp_all_reduce if sa.tp_size > 1 else None,
        kv_heads_total=model_runner.model_config.get_total_num_kv_heads(),
        **_allocator_hooks(model_runner),
    )
    comp.stats.update(_memory_stats(comp))
    logger.info(
        "dynsplit-sglang: %s compression on %d layers (%d dense), %d KV heads x %d, %d slots; %s",
        settings.method, num_layers, comp.first_compressed, k0.shape[1], k0.shape[2], k0.shape[0],
        settings.config.to_dict(),
    )
    return comp


def host_field(fb, name: str):
    """A ForwardBatch field as a host tensor: SGLang 0.5.23's own host copy (``<name>_cpu``)
    where the batch has one, else the device tensor (read back: a host sync on a GPU)."""
    cpu = getattr(fb, f"{name}_cpu", None)
    return getattr(fb, name) if cpu is None else cpu


def account_forward(compressor, fb) -> None:
    """After a forward's last layer: its numbers to each request's own counters, and the radix
    tree's copy of positions that eviction freed (before the scheduler acts again)."""
    reqs = requests.for_rids(fb.rids)
    step = compressor.step
    if not reqs or step is None:
        return
    requests.account(compressor, step.batch, reqs)
    if step.revised:
        revise = hooks.revise_tree
        for i in step.revised:
            req = reqs[i].req() if reqs[i].req is not None else None
            row = compressor.req_to_token[step.batch.rows[i]]
            if req is None or revise is None or not revise(req, row):
                raise RuntimeError("dynsplit-sglang: eviction freed positions of a prompt "
                                   "that the radix tree holds, and the tree cannot be revised")


def _prompt_ownership(reqs, seq: list[int]) -> tuple[list[bool], list[int]] | tuple[None, None]:
    """Per request of an extend: whether it ends the prompt, and where its own part starts
    (patches/eviction.py, through hooks); (None, None) unless every request's SGLang Req is
    known."""
    ownership = hooks.prompt_ownership
    live = [r.req() if r.req is not None else None for r in reqs or ()]
    if ownership is None or not live or any(r is None for r in live):
        return None, None
    final, owned = zip(*(ownership(r, n) for r, n in zip(live, seq)))
    return list(final), list(owned)


def _token_ids(reqs) -> list | None:
    """Each request's token ids through this extend (patches/eviction.py, through hooks)."""
    read = hooks.token_ids
    live = [r.req() for r in reqs]
    return None if read is None else [read(r) for r in live]


def view_of(fb, req_to_token_pool, base_config) -> BatchView | None:
    mode = fb.forward_mode
    if mode.is_idle() or fb.batch_size == 0:
        return None
    decode = mode.is_decode()
    if not decode and not mode.is_extend():
        return None
    reqs = requests.for_rids(fb.rids)
    rows = host_field(fb, "req_pool_indices").tolist()
    seq = host_field(fb, "seq_lens").tolist()
    if decode:
        prefix = [n - 1 for n in seq]
    else:
        prefix = list(fb.extend_prefix_lens_cpu)
    gens = req_to_token_pool.req_generation[rows].tolist()  # a host tensor (SGLang's own)
    configs = None if reqs is None or len(reqs) != fb.batch_size else \
        [r.resolve(base_config) for r in reqs]
    final = owned = ids = None
    if not decode and base_config.evict and base_config.evict_scope == "prompt":
        final, owned = _prompt_ownership(reqs, seq)
        if base_config.evict_tier != "none" and final is not None:
            ids = _token_ids(reqs)
    return BatchView(rows, gens, seq, prefix, fb.input_ids, fb.out_cache_loc, decode, configs,
                     final, owned, ids)


def graph_view_of(fb, req_to_token_pool) -> BatchView | None:
    """The real requests of a decode-graph replay: SGLang 0.5.23's ``build_replay_fb_view`` pads
    the batch to the captured size (``num_padding`` rows at the end, row 0, seq_len 1) and keeps
    the live ``out_cache_loc``; per-request settings come from each row's state (set when the
    request was prefilled), not from rids, which the view does not carry."""
    raw = fb.batch_size - (getattr(fb, "num_padding", 0) or 0)
    mode = getattr(fb, "actual_forward_mode", None) or fb.forward_mode
    if raw <= 0 or mode.is_idle():
        return None
    rows = host_field(fb, "req_pool_indices")[:raw].tolist()
    seq = host_field(fb, "seq_lens")[:raw].tolist()
    gens = req_to_token_pool.req_generation[rows].tolist()
    return BatchView(rows, gens, seq, [n - 1 for n in seq], fb.input_ids[:raw],
                     fb.out_cache_loc[:raw], True)
