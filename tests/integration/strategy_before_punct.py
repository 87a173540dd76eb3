"""A strategy that exists for the tests only: registered by tests/integration/test_strategies.py,
which runs it through every registered strategy's checks, a real server included.

A block ends right before punctuation: at the position e of the search window
[s+C-1-Δ, s+C-1+Δ] whose *next* token is a ``punct`` candidate, nearest the ideal end s+C-1
(the earlier on a tie), else at the ideal end. Seeing token e+1 is a one-token lookahead, so the
horizon is one past the window.
"""

from dynsplit_sglang.core.strategies import Strategy, register


class BeforePunct(Strategy):
    name = "before_punct"
    description = "blocks ending right before punctuation (a test strategy)"

    def candidate_mode(self, cfg):
        return "punct"

    def lookahead(self, cfg):
        return 1

    def next_block(self, cfg, start, length, scores, candidates, complete):
        ideal = start + cfg.block_size - 1
        lo, hi = ideal - cfg.tolerance, ideal + cfg.tolerance
        horizon = hi + self.lookahead(cfg)
        if horizon >= length and not complete:
            return None
        if ideal >= length - 1:
            return length - 1, horizon
        ends = [e for e in range(lo, min(hi, length - 2) + 1) if candidates[e + 1]]
        if not ends:
            return ideal, horizon
        return min(ends, key=lambda e: (abs(e - ideal), e)), horizon


register(BeforePunct())
