"""The search-window walk that DD-Select and the rigid ``delimiter`` baseline share.

From a block start s the ideal end is s+C-1; the block ends at the candidate ``pick`` prefers in
[s+C-1-Δ, s+C-1+Δ], or at the ideal end when the window has none. The decision reads the window
and ``lookahead`` positions past it: that is the block's horizon. When the rest of the sequence
fits in one block, it is the tail.
"""

from __future__ import annotations

import torch

from .base import Strategy


class WindowStrategy(Strategy):
    def pick(self, candidates: torch.Tensor, scores: torch.Tensor | None, lo: int,
             ideal: int) -> int:
        """Index (relative to lo) of the chosen candidate, or -1 if the window has none.

        Order of preference: highest score (when the strategy reads scores), then nearest to
        the ideal end, then the earlier position — a total order, so the choice is deterministic.
        """
        idx = torch.nonzero(candidates, as_tuple=False).flatten()
        if idx.numel() == 0:
            return -1
        if scores is not None:
            s = scores[idx]
            idx = idx[s == s.max()]
        dist = (idx + lo - ideal).abs()
        return int(idx[dist == dist.min()][0])

    def next_block(self, cfg, start, length, scores, candidates, complete):
        ideal = start + cfg.block_size - 1  # last position of a block of exactly C tokens
        lo, hi = ideal - cfg.tolerance, ideal + cfg.tolerance
        horizon = hi + self.lookahead(cfg)
        if horizon >= length and not complete:
            return None
        if ideal >= length - 1:  # the rest fits in one block: the tail
            return length - 1, horizon
        hi_c = min(hi, length - 1)
        window = scores[lo:hi_c + 1] if scores is not None else None
        pick = self.pick(candidates[lo:hi_c + 1], window, lo, ideal)
        return (ideal if pick < 0 else lo + pick), horizon
