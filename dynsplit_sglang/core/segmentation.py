"""Splitting a sequence into blocks: DD-Select and the rigid baselines, one interface.

A segmentation is the tensor of block *end* positions (inclusive); block b spans
(ends[b-1], ends[b]]. Every strategy walks block by block from a start position:

* ``dynsplit``: the block ends at the best-scoring candidate in [s+C-Δ, s+C+Δ]; without a
  candidate there, at s+C (pure argmax; ties go to the position nearest the ideal end s+C, then
  the earlier one).
* ``delimiter``: same window, but a predefined sentence-delimiter set and no score: the candidate
  nearest s+C wins (SentenceKV-like rigid splitting, with the same length bounds).
* ``fixed``: every C tokens (Quest/ChunkKV-like).
* ``streaming``: no blocks; only sink and recent tokens are ever attended.

Causal stability: the decision for a block depends only on positions up to its window end
(+ the importance score's future window for ``dynsplit``). With ``complete=False`` only blocks
whose decision is already final are returned, so the caller can resume later and a prefix is
split identically whatever text follows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DynSplitConfig


@dataclass(frozen=True)
class Segmentation:
    """Blocks covering [start, next_start): block b spans [starts[b], ends[b]]."""

    ends: torch.Tensor  # int64 [nb], inclusive end position of each block
    start: int
    next_start: int  # where segmentation resumes

    @property
    def starts(self) -> torch.Tensor:
        return torch.cat([self.ends.new_tensor([self.start]), self.ends[:-1] + 1])[: self.ends.numel()]

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts + 1


def _window_pick(cands: torch.Tensor, score: torch.Tensor | None, lo: int, ideal: int) -> int:
    """Index (relative to lo) of the chosen candidate, or -1 if the window has none.

    Order of preference: highest score (``dynsplit`` only), then nearest to the ideal end, then
    the earlier position — a total order, so the choice is deterministic.
    """
    idx = torch.nonzero(cands, as_tuple=False).flatten()
    if idx.numel() == 0:
        return -1
    if score is not None:
        s = score[idx]
        idx = idx[s == s.max()]
    dist = (idx + lo - ideal).abs()
    return int(idx[dist == dist.min()][0])


def segment(
    cfg: DynSplitConfig,
    length: int,
    scores: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    start: int = 0,
    complete: bool = True,
) -> Segmentation:
    """Block ends for positions [start, length).

    scores: float [>= length] importance per position (``dynsplit`` only).
    candidates: bool [>= length] candidate-delimiter flag per position (``dynsplit``: the
    dynamic candidate set; ``delimiter``: the predefined sentence set).
    complete: the sequence ends at `length` (prompt fully known); otherwise return only the
    blocks whose boundary can no longer change as more tokens arrive.
    """
    if length < 0 or start < 0 or start > max(length, 0):
        raise ValueError(f"segment: need 0 <= start <= length, got start={start}, length={length}")
    strat = cfg.strategy
    if strat == "streaming":
        return Segmentation(torch.zeros(0, dtype=torch.long), start, start)
    if strat in ("dynsplit", "delimiter"):
        if candidates is None or candidates.numel() < length:
            raise ValueError(f"segment({strat}): candidates must cover {length} positions")
        if strat == "dynsplit" and (scores is None or scores.numel() < length):
            raise ValueError("segment(dynsplit): scores must cover every position")
        cands_cpu = candidates[:length].to("cpu", torch.bool)
        scores_cpu = scores[:length].to("cpu", torch.float64) if strat == "dynsplit" else None
    C, D = cfg.block_size, cfg.tolerance
    ends: list[int] = []
    s = start
    while s < length:
        ideal = s + C - 1  # last position of a block of exactly C tokens
        if strat == "fixed":
            if ideal >= length:
                if complete:
                    ends.append(length - 1)
                break
            ends.append(ideal)
            s = ideal + 1
            continue
        lo, hi = ideal - D, ideal + D
        horizon = hi + cfg.lookahead  # last position the decision may look at
        if horizon >= length and not complete:
            break
        if ideal >= length - 1:  # the rest fits in one block: the tail
            ends.append(length - 1)
            break
        hi_c = min(hi, length - 1)
        score_win = scores_cpu[lo:hi_c + 1] if scores_cpu is not None else None
        pick = _window_pick(cands_cpu[lo:hi_c + 1], score_win, lo, ideal)
        end = ideal if pick < 0 else lo + pick
        ends.append(end)
        s = end + 1
    return Segmentation(torch.tensor(ends, dtype=torch.long), start, ends[-1] + 1 if ends else start)
