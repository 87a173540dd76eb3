"""DynSplit-KV in pure PyTorch: no SGLang import here (a test enforces it).

Pipeline: candidate delimiters → importance scores during prefill → segmentation (DD-Select or a
rigid baseline) → uniform mapping (fixed-shape block table + a center and radius per block:
the gauss score, or Quest's min/max box) → per-step block scoring and two-stage selection
under a token budget → sparse decode attention.
"""

from .attention import dense_decode_attention, sparse_decode_attention
from .config import CANDIDATE_MODES, ConfigError, DynSplitConfig
from .delimiters import candidate_mask, candidates_for, mask_from_texts
from .importance import (ImportanceAccumulator, causal_lse, key_distinctiveness, importance_scores,
                         layer_votes, window_heat)
from .mapping import (
    BlockTable,
    block_summaries,
    block_summaries_layers,
    contiguous_slots,
    summarize,
    summarize_ragged,
)
from .segmentation import Segmentation, segment
from .strategies import STRATEGIES, Strategy, register
from .selection import (
    Selection,
    SelectionPlan,
    candidate_plan,
    exact_block_scores,
    plan_selection,
    select,
    positions_to_slots,
    score_blocks,
    score_blocks_ragged,
    select_positions,
    select_refined,
)

__all__ = [
    "block_summaries", "block_summaries_layers", "BlockTable", "candidate_mask", "candidate_plan",
    "CANDIDATE_MODES", "candidates_for",
    "causal_lse", "ConfigError", "contiguous_slots", "dense_decode_attention", "DynSplitConfig",
    "exact_block_scores",
    "importance_scores", "ImportanceAccumulator", "key_distinctiveness", "layer_votes",
    "mask_from_texts", "plan_selection", "positions_to_slots", "register", "score_blocks",
    "score_blocks_ragged", "segment", "Segmentation", "select", "select_positions",
    "select_refined", "Selection",
    "SelectionPlan", "sparse_decode_attention", "STRATEGIES", "Strategy", "summarize",
    "summarize_ragged", "window_heat",
]
