"""Each request's own compression: its configuration and its counters, free of SGLang types.

A ``RequestCompression`` is made once per request (``of``) from what SGLang's request carries
(``sampling_params.custom_params["dynsplit"]``, or the rid alias), already validated at admission
(``patches/admission.py``), and lives as long as the request. The attention backend adds each
forward's numbers to it (``account``); the scheduler's output streamer reports it in the
response's ``meta_info["dynsplit"]`` (``patches/report.py``).

Token counts are summed over the compressed layers and the model's KV heads (under tensor
parallelism: over every rank's, the same figures as one process gives): "dense" is what dense
attention would have read at the same decode steps.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import overrides
from ..core import ConfigError, DynSplitConfig

logger = logging.getLogger(__name__)

# rid -> the live request's RequestCompression. The Req holds it (patches/report.py), so an
# entry lives exactly as long as its request; ForwardBatch copies (SGLang's runners rebuild the
# batch with dataclasses.replace) keep the rids, not extra attributes.
LIVE: "weakref.WeakValueDictionary[str, RequestCompression]" = weakref.WeakValueDictionary()
SETTLE_EVERY = 64  # decode forwards whose device counts a request keeps before summing them


@dataclass
class RequestCompression:
    given: dict | None = None  # the overrides as sent (None: the server's settings)
    source: str = "server"  # "server", "custom_params" or "rid"
    from_text: bool = False  # rid values are text
    error: str | None = None  # set only if admission was bypassed and the override is invalid
    config: DynSplitConfig | None = None  # resolved against the server's settings, once
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("tokens_attended", "tokens_dense", "decode_steps", "sparse_steps"), 0))
    blocks_built: int = 0
    blocks_reused: int = 0
    prefill_peak_slots: int = 0  # eviction only (RowState.peak_held)
    tier: dict | None = None  # the cold tier only: tokens moved out and recalled
    fallback: bool = False
    # Tokens attended, still on the device: one 0-dim view per decode forward (indexing makes
    # no kernel); read once, when the report is built (no host sync per step).
    pending: list = field(default_factory=list)
    # SGLang's Req (a weak reference, set by patches/report.py): its tree path tells eviction
    # where the request's own part starts.
    req: Any = None

    def resolve(self, base: DynSplitConfig) -> DynSplitConfig | None:
        """This request's configuration; None means the server's."""
        if self.given is None or self.error is not None:
            return None
        if self.config is None:
            try:
                where = overrides.RID_WHERE if self.from_text else "custom_params.dynsplit"
                self.config = overrides.check(self.given, base, where, from_text=self.from_text)
            except ConfigError as e:  # logged once per request, and reported in meta_info
                self.error = str(e)
                logger.error("dynsplit-sglang: %s (not validated at admission); the request "
                             "runs with the server's settings", e)
                return None
        return self.config

    def settle(self) -> None:
        """Fold the device counts into counts["tokens_attended"] (a host read)."""
        if self.pending:
            self.counts["tokens_attended"] += int(torch.stack(self.pending).sum())
            self.pending.clear()

    def report(self, base: DynSplitConfig) -> dict:
        self.settle()
        cfg = self.resolve(base) or base
        strategy = "none" if (self.given or {}).get("strategy") == "none" else cfg.strategy
        out = {"strategy": strategy, "budget": cfg.budget, "budget_fraction": cfg.budget_fraction,
               "source": self.source, **self.counts, "blocks_built": self.blocks_built,
               "blocks_reused": self.blocks_reused, "dense_fallback": self.fallback}
        if self.prefill_peak_slots:
            out["prefill_peak_slots"] = self.prefill_peak_slots
        if self.tier is not None:
            out.update(self.tier)
        if self.error:
            out["error"] = self.error
        return out


def of(custom_params, rid) -> RequestCompression:
    """What a request asks for (checked at admission, where both forms at once are refused)."""
    given = custom_params.get(overrides.KEY) if isinstance(custom_params, dict) else None
    if given is not None:
        return RequestCompression(given, "custom_params")
    try:
        from_rid = overrides.from_request_id(rid)
    except ConfigError as e:
        return RequestCompression({}, "rid", True, error=str(e))
    if from_rid is not None:
        return RequestCompression(from_rid, "rid", from_text=True)
    return RequestCompression()


def for_rids(rids) -> list[RequestCompression] | None:
    """The batch's requests in batch order (None unless every one is known)."""
    found = [LIVE.get(rid) for rid in rids or ()]
    return found if found and all(r is not None for r in found) else None


def account(compressor, view, requests: list[RequestCompression]) -> None:
    """Add the forward that just ran (all layers) to its requests' counters."""
    if len(requests) != len(view.rows):
        return
    dense = None
    # An extend (one token over a cached prompt included) is the prompt's forward; decode
    # steps are the response's tokens after its first.
    if view.is_decode:
        layers = compressor.num_layers - compressor.first_compressed
        dense = [n * compressor.kv_heads_total * layers for n in view.seq_lens]
        attended = compressor.rows_attended()  # [B] on the device, or None (dense decode)
    for i, (row, req) in enumerate(zip(view.rows, requests)):
        st = compressor.rows.get(row)
        if st is None:
            continue
        req.blocks_reused = st.reused
        req.blocks_built = st.nblocks - st.reused
        req.prefill_peak_slots = st.peak_held
        if getattr(compressor, "cold", None) is not None:
            req.tier = {"tier_tokens_moved_out": st.tier_out, "tier_tokens_recalled": st.tier_in,
                        "tier_recall_ms": round(st.tier_ms, 2)}
        req.fallback = st.fallback
        if dense is not None:
            c = req.counts
            c["decode_steps"] += 1
            c["sparse_steps"] += int(attended is not None)
            c["tokens_dense"] += dense[i]
            if attended is None:
                c["tokens_attended"] += dense[i]
            else:
                req.pending.append(attended[i])
                if len(req.pending) >= SETTLE_EVERY:  # bounded: a long answer holds no history
                    req.pending[:] = [torch.stack(req.pending).sum()]
