"""In-memory data sets handed to stages: plain texts, or texts with human-scored pairs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextSet:
    """Texts with no labels: calibration text, or the documents of a pair set."""

    name: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class ScoredPairs:
    """Texts plus pairs of indices into them, each with a human similarity score."""

    name: str
    texts: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    scores: tuple[float, ...]
