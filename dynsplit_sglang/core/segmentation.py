"""Splitting a sequence into blocks: one interface for DD-Select and the rigid baselines.

A segmentation is the tensor of block *end* positions (inclusive); block b spans
(ends[b-1], ends[b]]. Each block also carries its *horizon*, the last position its decision read.
The registered strategies (``core.strategies``) decide where blocks end:

* ``dynsplit``: the block ends at the best-scoring candidate in [s+C-1-Δ, s+C-1+Δ]; without a
  candidate there, at s+C-1 (pure argmax; ties go to the position nearest the ideal end s+C-1,
  then the earlier one).
* ``delimiter``: same window, but a predefined sentence-delimiter set and no score: the candidate
  nearest s+C-1 wins (SentenceKV-like rigid splitting, with the same length bounds).
* ``fixed``: every C tokens (Quest/ChunkKV-like).
* ``streaming``: no blocks; only sink and recent tokens are ever attended.

Causal stability: the decision for a block depends only on positions up to its horizon (the
window end, + the importance score's future window for ``dynsplit``). With ``complete=False``
only blocks whose horizon is in view are returned, so the caller can resume later and a prefix is
split identically whatever text follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import DynSplitConfig


@dataclass(frozen=True)
class Segmentation:
    """Blocks covering [start, next_start): block b spans [starts[b], ends[b]]."""

    ends: torch.Tensor  # int64 [nb], inclusive end position of each block
    start: int
    next_start: int  # where segmentation resumes
    horizons: torch.Tensor  # int64 [nb], last position each block's decision read

    @property
    def starts(self) -> torch.Tensor:
        return torch.cat([self.ends.new_tensor([self.start]), self.ends[:-1] + 1])[: self.ends.numel()]

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts + 1


def segment(cfg: DynSplitConfig, length: int, scores: torch.Tensor | None = None,
            candidates: torch.Tensor | None = None, start: int = 0,
            complete: bool = True) -> Segmentation:
    """Block ends and horizons for positions [start, length), by cfg's strategy.

    scores: float [>= length] importance per position (strategies that need votes).
    candidates: bool [>= length] candidate-delimiter flag per position, from the set the
    strategy's ``candidate_mode`` names.
    complete: the sequence ends at `length` (prompt fully known); otherwise return only the
    blocks whose boundary can no longer change as more tokens arrive.
    """
    return cfg.strategy_impl.segment(cfg, length, scores, candidates, start, complete)
