"""DynSplit-KV in pure PyTorch: no SGLang import here (a test enforces it).

Pipeline: candidate delimiters → importance scores during prefill → segmentation (DD-Select or a
rigid baseline) → uniform mapping (fixed-shape block table + min/max key summaries) → per-step
block scoring and selection under a token budget → sparse decode attention.
"""

from .attention import dense_decode_attention, sparse_decode_attention
from .config import CANDIDATE_MODES, STRATEGIES, ConfigError, DynSplitConfig
from .delimiters import candidate_mask, candidates_for, mask_from_texts
from .importance import (ImportanceAccumulator, causal_lse, key_distinctiveness, importance_scores,
                         layer_votes)
from .mapping import (
    BlockTable,
    block_summaries,
    contiguous_slots,
    summarize,
    summarize_ragged,
)
from .segmentation import Segmentation, segment
from .selection import (
    Selection,
    SelectionPlan,
    plan_selection,
    select,
    positions_to_slots,
    score_blocks,
    score_blocks_ragged,
    select_positions,
)

__all__ = [
    "BlockTable", "CANDIDATE_MODES", "ConfigError", "DynSplitConfig", "ImportanceAccumulator",
    "STRATEGIES", "Segmentation", "Selection", "SelectionPlan", "plan_selection", "select", "block_summaries", "candidate_mask",
    "candidates_for", "causal_lse", "key_distinctiveness", "contiguous_slots", "dense_decode_attention",
    "importance_scores", "layer_votes", "mask_from_texts", "positions_to_slots", "score_blocks",
    "score_blocks_ragged", "segment", "select_positions", "sparse_decode_attention", "summarize",
    "summarize_ragged",
]
