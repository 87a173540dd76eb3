"""Degenerate repetition in a model's output (`HHHH…`, `Uhuhuh…`, `VAR VAR VAR VAR`).

`repetition` works on pieces (the output's tokens, as the diagnosis tool has them); `text_pieces`
cuts a plain output string into word, space and punctuation pieces for records that keep only
the text (the suite's samples.jsonl), so a run can count degenerate outputs without a tokenizer.
Pure Python: the report imports it.
"""

from __future__ import annotations

import re

_LETTER_RUN = re.compile(r"([^\W\d_]{1,3}?)\1{3,}", re.IGNORECASE)
_PIECE = re.compile(r"\w+|\s+|[^\w\s]")


def repetition(pieces: list[str], reps: int = 4, digit_reps: int = 8) -> dict | None:
    """The first pattern of 1-3 tokens repeated `reps` times in a row (case-insensitive; a
    digits-only pattern needs `digit_reps`, as numbers repeat digits), or of 1-3 letters repeated
    4 times in the text (tokenizers merge such runs unevenly); None for normal text."""
    low = [p.lower() for p in pieces]
    for i in range(len(low)):
        for n in (1, 2, 3):
            unit = low[i:i + n]
            if len(unit) < n or not "".join(unit).strip():
                continue
            need = digit_reps if "".join(unit).strip().isdigit() else reps
            if low[i:i + n * need] == unit * need:
                return {"unit": "".join(pieces[i:i + n]), "token": i, "reps": need}
    m = _LETTER_RUN.search("".join(pieces))
    return {"unit": m.group(1), "char": m.start(), "reps": len(m.group(0)) // len(m.group(1))} \
        if m else None


def text_pieces(text: str) -> list[str]:
    """Word, whitespace and punctuation pieces: a tokenizer-free stand-in for token pieces."""
    return _PIECE.findall(text)


def degenerate(output) -> bool:
    """A record's output (a string, or a list of turn outputs) repeats degenerately."""
    turns = [output] if isinstance(output, str) else list(output)
    return any(repetition(text_pieces(t)) is not None for t in turns)
