"""What a strategy is: how a configuration splits a sequence into blocks, and what that needs.

A strategy is a small stateless object (in the manner of kvpress's presses); its parameters are
the fields of the DynSplitConfig it is handed. It declares:

* ``description``: one line for ``--kv-compression``'s help;

* ``needs_votes``: its split reads the importance scores, so the scored layers' queries vote
  during prefill (the runtime and the HF reference compute them only for such strategies);
* ``has_blocks``: False for a strategy that splits nothing (decode attends to sink + recent);
* ``candidate_mode(cfg)``: the delimiter set (``core.delimiters``) that marks its candidates, or
  None when it reads no token;
* ``lookahead(cfg)``: positions past a block's search window its decision may read;
* ``recent(cfg, budget)``: the recent window it attends at this budget.

``segment()`` walks block by block from a start position, asking ``next_block`` for the end of
the block starting there *and its horizon*: the last position the decision read. With
``complete=False`` a block whose horizon is not yet in view is not decided, so a prefix is split
the same whatever follows it, and the runtime records the horizon to decide which blocks of a
shared prefix another request may adopt (``runtime.rows``). The horizon is computed here only.
The last block of a complete segmentation is also decided by where the sequence ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..segmentation import Segmentation

if TYPE_CHECKING:
    from ..config import DynSplitConfig


class Strategy:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_votes: ClassVar[bool] = False
    has_blocks: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<strategy {self.name!r}>"

    def candidate_mode(self, cfg: DynSplitConfig) -> str | None:
        return None

    def lookahead(self, cfg: DynSplitConfig) -> int:
        return 0

    def recent(self, cfg: DynSplitConfig, budget: int) -> int:
        return cfg.recent

    def next_block(self, cfg: DynSplitConfig, start: int, length: int,
                   scores: torch.Tensor | None, candidates: torch.Tensor | None,
                   complete: bool) -> tuple[int, int] | None:
        """(end, horizon) of the block starting at `start` (< length), both inclusive positions;
        None when the decision is not final yet (only with complete=False).

        scores: float64 [length] on the CPU when needs_votes; candidates: bool [length] on the
        CPU when candidate_mode(cfg) is not None; otherwise None.
        """
        raise NotImplementedError

    def segment(
        self,
        cfg: DynSplitConfig,
        length: int,
        scores: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        start: int = 0,
        complete: bool = True,
    ) -> Segmentation:
        """Blocks of positions [start, length); see ``core.segmentation.segment``."""
        if length < 0 or start < 0 or start > max(length, 0):
            raise ValueError(f"segment: need 0 <= start <= length, got start={start}, "
                             f"length={length}")
        if not self.has_blocks:
            none = torch.zeros(0, dtype=torch.long)
            return Segmentation(none, start, start, none)
        if self.candidate_mode(cfg) is not None:
            if candidates is None or candidates.numel() < length:
                raise ValueError(f"segment({self.name}): candidates must cover {length} positions")
            candidates = candidates[:length].to("cpu", torch.bool)
        else:
            candidates = None
        if self.needs_votes:
            if scores is None or scores.numel() < length:
                raise ValueError(f"segment({self.name}): scores must cover every position")
            scores = scores[:length].to("cpu", torch.float64)
        else:
            scores = None
        ends: list[int] = []
        horizons: list[int] = []
        s = start
        while s < length:
            block = self.next_block(cfg, s, length, scores, candidates, complete)
            if block is None:
                break
            ends.append(block[0])
            horizons.append(block[1])
            s = block[0] + 1
        return Segmentation(torch.tensor(ends, dtype=torch.long), start,
                            ends[-1] + 1 if ends else start,
                            torch.tensor(horizons, dtype=torch.long))
