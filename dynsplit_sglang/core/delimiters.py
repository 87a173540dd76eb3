"""Candidate delimiter tokens: where a semantic block may end.

DD-Select scores candidates dynamically; this module only decides which vocabulary entries are
eligible. ``punct`` takes every token whose text holds punctuation, a newline or a code closer
(the paper reports delimiter preferences differ by up to 45% between code and prose, so code
closers are in); ``all`` makes every token a candidate and lets the score alone decide.
The ``sentence`` set is the fixed, predefined set used by the rigid ``delimiter`` baseline.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Protocol, Sequence

import torch

PUNCT_CHARS = frozenset(".,;:!?\n)]}\"'`>")
SENTENCE_CHARS = frozenset(".!?\n")
_CHARS = {"punct": PUNCT_CHARS, "sentence": SENTENCE_CHARS}
MODES = ("punct", "all", "sentence")  # what a strategy's candidate_mode may name

# Byte-level BPE renders newline and space as these glyphs in raw token strings.
_BPE_GLYPHS = {"Ċ": "\n", "Ġ": " ", "ĉ": "\t", "▁": " "}


class _Tokenizer(Protocol):
    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...


def _normalise(text: str) -> str:
    for glyph, plain in _BPE_GLYPHS.items():
        text = text.replace(glyph, plain)
    return text


def mask_from_texts(texts: Iterable[str | None], mode: str = "punct") -> torch.Tensor:
    """Boolean mask over the vocabulary given each token's text (None for special tokens)."""
    texts = list(texts)
    if mode == "all":
        return torch.ones(len(texts), dtype=torch.bool)
    chars = _CHARS.get(mode)
    if chars is None:
        raise ValueError(f"candidate mode {mode!r} is invalid; expected one of {MODES}")
    out = [t is not None and any(c in chars for c in _normalise(t)) for t in texts]
    return torch.tensor(out, dtype=torch.bool)


def token_texts(tokenizer: _Tokenizer) -> list[str | None]:
    """Raw text of every id in the tokenizer's vocabulary (added tokens included)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    toks = tokenizer.convert_ids_to_tokens(list(range(size)))
    return [None if (i in specials or t is None) else str(t) for i, t in enumerate(toks)]


def candidate_mask(tokenizer: _Tokenizer, mode: str = "punct") -> torch.Tensor:
    """Boolean mask [vocab] of candidate delimiter ids for this tokenizer."""
    return _cached_mask(tokenizer, mode)


@lru_cache(maxsize=16)
def _cached_mask(tokenizer: _Tokenizer, mode: str) -> torch.Tensor:
    return mask_from_texts(token_texts(tokenizer), mode)


def candidates_for(token_ids: torch.Tensor, vocab_mask: torch.Tensor) -> torch.Tensor:
    """Per-position candidate flags for a token sequence; ids outside the mask are not candidates."""
    ids = token_ids.to(torch.long)
    inside = (ids >= 0) & (ids < vocab_mask.numel())
    flags = torch.zeros_like(ids, dtype=torch.bool)
    flags[inside] = vocab_mask.to(ids.device)[ids[inside]]
    return flags
