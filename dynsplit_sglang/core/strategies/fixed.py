"""Quest/ChunkKV-like baseline: a block every C tokens. A block's decision reads nothing past
its own end, which is its horizon. The runtime also freezes generated tokens this way, for every
strategy."""

from __future__ import annotations

from .base import Strategy


class Fixed(Strategy):
    name = "fixed"
    description = "fixed-length blocks of C tokens"

    def next_block(self, cfg, start, length, scores, candidates, complete):
        end = start + cfg.block_size - 1
        if end >= length:  # a short tail, once the sequence is complete
            return (length - 1, length - 1) if complete else None
        return end, end
