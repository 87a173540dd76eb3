"""The compressor's inputs and state, free of SGLang types.

``BatchView`` is what a forward tells the compressor; ``RowState`` lives as long as a request
holds its row; ``StepState`` lives for one forward: ``Compressor.begin_forward`` builds it and
every later call of that forward reads it (SGLang's ``ForwardMetadata`` plays this part for an
attention backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import DynSplitConfig


@dataclass
class BatchView:
    """What a forward tells the compressor; lists are per request, in batch order."""

    rows: list[int]
    generations: list[int]
    seq_lens: list[int]  # tokens in the sequence once this forward has run
    prefix_lens: list[int]  # tokens already in the cache before it
    input_ids: torch.Tensor  # the new tokens, requests concatenated
    out_cache_loc: torch.Tensor  # their slots
    is_decode: bool
    configs: list[DynSplitConfig] | None = None  # per-request overrides (None = the default)
    # Eviction over the whole prompt (evict_scope "prompt"): whether this extend ends each
    # request's prompt, and where its own part starts (before it: positions another request
    # holds in the radix tree). None: not known, so no such eviction runs.
    final: list[bool] | None = None
    owned_from: list[int] | None = None
    # With a cold tier: each request's token ids through its seq_len (SGLang's own list; the
    # position keys of what eviction moves out and a next turn recalls). None otherwise.
    token_ids: list | None = None


@dataclass
class RowState:
    generation: int
    cfg: DynSplitConfig
    shared_len: int  # slots [0, shared_len) were matched in the radix tree: owned by others
    shared_votes: torch.Tensor  # own votes for candidates just before shared_len
    next_start: int = 0  # where segmentation resumes
    nblocks: int = 0
    prompt_done: bool = False
    fallback: bool = False  # metadata did not fit: attend densely
    evict_unknown: bool = False  # whole-prompt eviction could not run: its Req was not known
    reused: int = 0  # blocks adopted from the radix-shared prefix
    # Eviction: the most slots the row referenced at the end of a prefill chunk, before that
    # chunk's eviction (its shared prefix included): the request's peak while it prefills.
    peak_held: int = 0
    local: list[int] = field(default_factory=list)  # entries only this row references
    # The cold tier: whether this request's recall ran (its first extend), tokens it moved
    # there and brought back.
    recall_checked: bool = False
    tier_out: int = 0
    tier_in: int = 0
    tier_ms: float = 0.0  # host time of this request's recall
    # With evict_hold: its tier blocks, ranked with the pool's at the prompt's end (cold.ColdRow)
    cold: object = None


@dataclass
class StepState:
    """One forward's state."""

    batch: BatchView
    rows: list[RowState]  # per request, in batch order
    votes: list[torch.Tensor] = field(default_factory=list)  # extend: [new tokens, w_f] each
    sparse: bool = False  # decode: some request is longer than its budget (the wrapper is planned)
    kept: tuple[torch.Tensor, torch.Tensor] | None = None  # eviction: slots that still hold K/V
    window: dict[int, torch.Tensor] = field(default_factory=dict)  # batch index -> window heat
    noted_keys: bool = False  # some row scored its new keys' distinctiveness (store.heat)
    revised: list[int] = field(default_factory=list)  # batch indices that evicted tree positions
    # Tokens attended, on the device, summed when read (once or twice per forward): per layer
    # as the layers give them ([B, Hkv] each: eviction's path), or all the layers at once
    # ([L, B, Hkv], zero until a layer writes its row: the decode wrapper's layer_counts).
    layer_counts: list[torch.Tensor] = field(default_factory=list)
    counts_table: torch.Tensor | None = None

    def count_rows(self, counts: torch.Tensor) -> None:
        """One layer's tokens attended ([B, Hkv], on the device). The tensor is the layer's
        own (or the same kept-slot count in every layer), so it is kept, not copied."""
        self.layer_counts.append(counts)

    def attended(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(head_attended, head_peak) of the counts so far, None if none."""
        parts = [torch.stack(self.layer_counts)] if self.layer_counts else []
        if self.counts_table is not None:
            parts.append(self.counts_table)
        if not parts:
            return None
        counts = parts[0] if len(parts) == 1 else torch.cat(parts)
        return counts.sum(0), counts.amax(0)

    @property
    def head_attended(self) -> torch.Tensor | None:
        """[B, Hkv] K/V tokens attended, summed over the compressed layers."""
        both = self.attended()
        return None if both is None else both[0]

    @property
    def head_peak(self) -> torch.Tensor | None:
        """[B, Hkv] the most one layer attended."""
        both = self.attended()
        return None if both is None else both[1]

    @property
    def row_attended(self) -> torch.Tensor | None:
        """[B] K/V tokens each request attended over the compressed layers."""
        total = self.head_attended
        return None if total is None else total.sum(1)
