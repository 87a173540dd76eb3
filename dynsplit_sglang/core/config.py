"""Validated configuration of DynSplit-KV and the rigid baselines that share its interface."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .strategies import STRATEGIES, Strategy

DEFAULT_BUDGET = 1024
CANDIDATE_MODES = ("punct", "all", "sentence")  # dynsplit's candidate sets (core.delimiters)
EVICT_SCOPES = ("prompt", "chunk")  # when eviction decides (runtime/eviction.py)
EVICT_TIERS = ("none", "host")  # where evicted blocks go (runtime/cold.py)
SCORES = ("gauss", "bound")  # block scores (core.selection.score_blocks)
# Read only where the server evicts (evict=True): elsewhere setting them would change nothing.
EVICT_FIELDS = ("evict_scope", "evict_window", "evict_pool", "evict_keep", "evict_hold",
                "evict_tier", "evict_tier_mb")


# Every field is in exactly one of these (a test checks), so a new field is a decision: what a
# block's split depends on (cached blocks split with other values are never adopted), what its
# summary depends on, and what changes neither (which blocks are read, eviction, the budget).
SPLIT_FIELDS = ("strategy", "block_size", "tolerance", "alpha", "future_window", "sink",
                "candidates", "score_layers")
SUMMARY_FIELDS = ("score", "spread")
READ_FIELDS = ("budget", "budget_fraction", "recent", "dense_layers", "evict", "evict_scope",
               "evict_window", "evict_pool", "evict_keep", "evict_hold", "evict_tier",
               "evict_tier_mb", "refine", "min_sparse_len")


class ConfigError(ValueError):
    """An invalid DynSplit parameter; the message names the field and its valid range.

    ``field``, ``value`` and ``expected`` (when set) let each entry point name the field its own
    way: the command-line flag, or the request's override key."""

    def __init__(self, message: str, field: str | None = None, value: Any = None,
                 expected: str | None = None) -> None:
        super().__init__(message)
        self.field, self.value, self.expected = field, value, expected


# The fields a field's check compares against. When the field that fails was not given (it holds
# a default or the server's setting), the given ones among these are what the message names.
DEPENDS = {"budget": ("sink", "recent"), "tolerance": ("block_size",), "evict": ("strategy",),
           "evict_hold": ("evict_scope",), "evict_tier": ("evict_scope",)}


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages never echo much of the input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def culprits(e: ConfigError, given: Mapping[str, Any]) -> tuple[str, ...]:
    """The given fields that make ``e`` fail: its own field when given, else the given ones it
    is checked against (empty when none was given)."""
    if e.field in given:
        return (e.field,)
    return tuple(f for f in DEPENDS.get(e.field, ()) if f in given)


def describe(e: ConfigError, name, given: Mapping[str, Any], unset: str) -> str:
    """``e``'s message naming only what the user sent. ``name(field, value)`` spells a field the
    way its input does (a flag, a key); ``unset`` says what a field not given holds ("the
    default", "the server's")."""
    if e.field is None:
        return str(e)
    sent = culprits(e, given)
    if sent in ((), (e.field,)):
        return f"{name(e.field, e.value)} is invalid; expected {e.expected}"
    names = " and ".join(name(f, given[f]) for f in sent)
    if e.field == "evict":
        blocky = tuple(n for n, s in STRATEGIES.items() if s.has_blocks)
        return (f"{names} is invalid where eviction is on (--dynsplit-evict): evicting needs a "
                f"strategy with blocks, one of {blocky}")
    verb = "is" if len(sent) == 1 else "are"
    return (f"{names} {verb} invalid with {unset} {e.field} ({short(e.value)}); expected "
            f"{e.field} to be {e.expected}")


def _require(ok: bool, field: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"dynsplit config: {field}={value!r} is invalid; expected {valid}",
                          field, value, valid)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class DynSplitConfig:
    """Every knob of the method.

    The budget is the number of K/V tokens each KV head of each compressed layer attends to at a
    decode step, sink and recent window included. Give it either as tokens (``budget``) or as a
    fraction of the context (``budget_fraction``), not both; with neither, DEFAULT_BUDGET tokens.
    """

    strategy: str = "dynsplit"
    budget: int | None = None  # default: DEFAULT_BUDGET tokens when no fraction is given
    budget_fraction: float | None = None
    block_size: int = 16  # C: the target block length
    tolerance: int = 4  # Δ: block lengths stay in [C-Δ, C+Δ]
    alpha: float = 1.0  # weight of the distant-context penalty in the importance score
    future_window: int = 16  # |F_i|: queries after a candidate that vote on it
    sink: int = 4
    recent: int = 64
    candidates: str = "punct"
    dense_layers: int = 2
    score_layers: int = 4  # layers (evenly spaced) averaged in the importance score; 0 = all
    evict: bool = False  # free the KV slots of the least important blocks (server-wide)
    # "prompt": once the request's whole prompt is in, over its own part, by the attention of
    # its last evict_window queries (SnapKV's observation window, max-pooled over evict_pool
    # positions); "chunk": after every prefill chunk, by key distinctiveness (query-agnostic).
    evict_scope: str = "prompt"
    evict_window: int = 32
    evict_pool: int = 7
    # Scope "prompt": the first evict_keep positions of a prompt stay whole, as a shared prefix
    # does (a client marks what other requests will share, e.g. an agent's system and tools).
    evict_keep: int = 0
    # Scope "prompt": 0 holds the whole prompt until it is in (the peak of a request alone is its
    # prompt). h >= 1 bounds it while the prompt is prefilled: after every chunk the own part
    # keeps at most h times its budget at the length so far, ranked by key distinctiveness
    # (query-agnostic); the prompt's end still decides the rest with the question's window.
    evict_hold: float = 0.0
    # Where evicted blocks go: "none" frees them for good; "host" keeps their K/V in a cold tier
    # of evict_tier_mb MiB (least recently used dropped past it), and a request that extends
    # the prompt (a next turn) brings back what its question needs (runtime/cold.py).
    evict_tier: str = "none"
    evict_tier_mb: int = 1024
    # Block score: "gauss" estimates a block's largest q·k from its keys' mean and spread
    # (mean + spread·sqrt(2 ln n)·std along q); "bound" is Quest's min/max upper bound.
    score: str = "gauss"
    spread: float = 1.5  # gauss only: how many expected-maximum deviations above the mean
    # Two-stage selection: the score picks candidate blocks for `refine` times the block budget,
    # and their exact max q·k (their keys read) picks the budget among them; 1 = the score
    # alone. The estimate's error, not the split, is what loses accuracy (docs/accuracy.md).
    refine: float = 2.0
    # Decode attends densely while the context is shorter than this: below it a compressed
    # step costs more than the keys it skips (docs/design.md, "When compression pays").
    min_sparse_len: int = 0

    def __post_init__(self) -> None:
        if self.budget is None and self.budget_fraction is None:
            object.__setattr__(self, "budget", DEFAULT_BUDGET)
        _require(self.strategy in STRATEGIES, "strategy", self.strategy,
                 f"one of {tuple(STRATEGIES)}")
        _require(
            (self.budget is None) != (self.budget_fraction is None),
            "budget",
            (self.budget, self.budget_fraction),
            "exactly one of budget (tokens) or budget_fraction (of the context)",
        )
        _require(_is_int(self.block_size) and 2 <= self.block_size <= 4096, "block_size",
                 self.block_size, "an integer in [2, 4096]")
        _require(_is_int(self.tolerance) and 0 <= self.tolerance < self.block_size, "tolerance",
                 self.tolerance, f"an integer in [0, block_size-1] = [0, {self.block_size - 1}]")
        _require(_is_number(self.alpha) and 0 <= self.alpha <= 100, "alpha", self.alpha,
                 "a finite number in [0, 100]")
        _require(_is_int(self.future_window) and 1 <= self.future_window <= 256, "future_window",
                 self.future_window, "an integer in [1, 256]")
        _require(_is_int(self.sink) and 0 <= self.sink <= 1024, "sink", self.sink,
                 "an integer in [0, 1024]")
        _require(_is_int(self.recent) and 1 <= self.recent <= 65536, "recent", self.recent,
                 "an integer in [1, 65536] (the current token is always attended)")
        _require(self.candidates in CANDIDATE_MODES, "candidates", self.candidates,
                 f"one of {CANDIDATE_MODES}")
        _require(_is_int(self.dense_layers) and 0 <= self.dense_layers <= 1024, "dense_layers",
                 self.dense_layers, "an integer in [0, 1024]")
        _require(_is_int(self.score_layers) and 0 <= self.score_layers <= 1024, "score_layers",
                 self.score_layers, "an integer in [0, 1024] (0 = all layers)")
        _require(isinstance(self.evict, bool), "evict", self.evict, "true or false")
        _require(self.evict_scope in EVICT_SCOPES, "evict_scope", self.evict_scope,
                 f"one of {EVICT_SCOPES}")
        _require(_is_int(self.evict_window) and 1 <= self.evict_window <= 4096, "evict_window",
                 self.evict_window, "an integer in [1, 4096]")
        _require(_is_int(self.evict_pool) and self.evict_pool % 2 == 1
                 and 1 <= self.evict_pool <= 255, "evict_pool", self.evict_pool,
                 "an odd integer in [1, 255]")
        _require(_is_int(self.evict_keep) and 0 <= self.evict_keep <= 1 << 24, "evict_keep",
                 self.evict_keep, "an integer in [0, 16777216]")
        _require(_is_number(self.evict_hold) and (self.evict_hold == 0 or
                 1 <= self.evict_hold <= 64), "evict_hold", self.evict_hold,
                 "0 (hold the whole prompt) or a number in [1, 64]")
        _require(not (self.evict_hold and self.evict_scope != "prompt"), "evict_hold",
                 self.evict_hold, f"0 with evict_scope={self.evict_scope} (it applies to scope "
                 "prompt)")
        _require(self.evict_tier in EVICT_TIERS, "evict_tier", self.evict_tier,
                 f"one of {EVICT_TIERS}")
        _require(not (self.evict_tier != "none" and self.evict_scope != "prompt"), "evict_tier",
                 self.evict_tier, f"none with evict_scope={self.evict_scope} (a next turn "
                 "decides again at its prompt's end: scope prompt)")
        _require(_is_int(self.evict_tier_mb) and 1 <= self.evict_tier_mb <= 1 << 20,
                 "evict_tier_mb", self.evict_tier_mb, "an integer in [1, 1048576] (MiB)")
        _require(self.score in SCORES, "score", self.score, f"one of {SCORES}")
        _require(_is_number(self.spread) and 0 < self.spread <= 16, "spread", self.spread,
                 "a finite number in (0, 16]")
        _require(_is_number(self.refine) and 1 <= self.refine <= 64, "refine", self.refine,
                 "a number in [1, 64] (1 = the block score alone)")
        _require(_is_int(self.min_sparse_len) and 0 <= self.min_sparse_len <= 1 << 24,
                 "min_sparse_len", self.min_sparse_len, "an integer in [0, 16777216]")
        _require(not (self.evict and not self.strategy_impl.has_blocks), "evict", self.evict,
                 f"false with strategy={self.strategy} (it has no blocks to evict)")
        if self.budget is not None:
            _require(_is_int(self.budget) and self.budget >= self.sink + self.recent, "budget",
                     self.budget, f"an integer >= sink + recent = {self.sink + self.recent}")
        else:
            f = self.budget_fraction
            _require(_is_number(f) and 0 < f <= 1, "budget_fraction", f, "a number in (0, 1]")

    # -- derived quantities -------------------------------------------------------------------

    @property
    def strategy_impl(self) -> Strategy:
        """The registered strategy named by `strategy` (core.strategies)."""
        return STRATEGIES[self.strategy]

    @property
    def summary_spread(self) -> float | None:
        """What block summaries are built with: None for the min/max box, else the spread."""
        return None if self.score == "bound" else float(self.spread)

    def block_identity(self, decode: bool = False) -> tuple:
        """What a cached block must have been built with to be adopted: its split (the
        SPLIT_FIELDS; generated tokens are frozen into fixed blocks of C whatever the strategy,
        so ``decode`` blocks match any split) and its summary."""
        split = ("decode",) if decode else tuple(getattr(self, f) for f in SPLIT_FIELDS)
        return split + (self.summary_spread,)

    @property
    def max_block_len(self) -> int:
        """Capacity S of one block in the fixed-length format (C + Δ)."""
        return self.block_size + self.tolerance

    @property
    def min_block_len(self) -> int:
        """The shortest block but a sequence's last (C - Δ): it sizes the block tables."""
        return max(1, self.block_size - self.tolerance)

    @property
    def lookahead(self) -> int:
        """Tokens past a block's search window needed before its boundary is final."""
        return self.strategy_impl.lookahead(self)

    def decode_budget(self, context_len: int) -> int:
        """What a decode step attends per KV head: the token budget, or the whole context
        below min_sparse_len."""
        return context_len if context_len < self.min_sparse_len else self.token_budget(context_len)

    def token_budget(self, context_len: int) -> int:
        """Tokens attended (or, with eviction, kept) per KV head at this context length
        (≥ sink + recent)."""
        if self.budget is not None:
            return self.budget
        want = int(math.floor(self.budget_fraction * context_len))
        return max(want, self.sink + self.recent)

    def recent_for(self, budget: int) -> int:
        """The recent window at this budget: `recent`, unless the strategy spends the budget
        otherwise (StreamingLLM: everything but the sink)."""
        return self.strategy_impl.recent(self, budget)

    def scored_layers(self, num_layers: int) -> list[int]:
        """Layers whose attention votes in the importance score, evenly spaced over the model."""
        if self.score_layers == 0 or self.score_layers >= num_layers:
            return list(range(num_layers))
        n = self.score_layers
        return sorted({int(round((j + 0.5) * num_layers / n - 0.5)) for j in range(n)})

    # -- (de)serialisation --------------------------------------------------------------------

    def replace(self, **changes: Any) -> "DynSplitConfig":
        if "budget_fraction" in changes and changes["budget_fraction"] is not None:
            changes.setdefault("budget", None)
        if "budget" in changes and changes["budget"] is not None:
            changes.setdefault("budget_fraction", None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DynSplitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"dynsplit config: unknown field(s) {unknown}; valid fields are {sorted(names)}"
            )
        return cls().replace(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "DynSplitConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"dynsplit config: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError("dynsplit config: JSON must be an object of field: value")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
