"""Rigid SentenceKV-like baseline: DD-Select's window and length bounds, a predefined sentence
delimiter set and no score; the candidate nearest the ideal end wins, so a comparison with
``dynsplit`` isolates the *choice* of delimiter."""

from __future__ import annotations

from .window import WindowStrategy


class Delimiter(WindowStrategy):
    name = "delimiter"
    description = "blocks ending at sentence delimiters"

    def candidate_mode(self, cfg):
        return "sentence"
