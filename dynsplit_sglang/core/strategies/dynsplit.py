"""DD-Select (the paper's method): the block ends at the best-scoring candidate of its window.

Scores are the delimiter importance votes of the scored layers (``core.importance``); a score
needs the ``future_window`` queries after its position, hence the lookahead. Candidates are the
``cfg.candidates`` set (``punct`` or ``all``).
"""

from __future__ import annotations

from .window import WindowStrategy


class DynSplit(WindowStrategy):
    name = "dynsplit"
    description = "DynSplit-KV (variable-length semantic blocks, query-aware selection)"
    needs_votes = True

    def candidate_mode(self, cfg):
        return cfg.candidates

    def lookahead(self, cfg):
        return cfg.future_window
