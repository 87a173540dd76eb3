"""StreamingLLM baseline: no blocks; the whole budget goes to the sink and the recent window."""

from __future__ import annotations

from .base import Strategy


class Streaming(Strategy):
    name = "streaming"
    description = "sink + recent window only (StreamingLLM)"
    has_blocks = False

    def recent(self, cfg, budget):
        return max(budget - cfg.sink, 1)
