"""In-memory data sets handed to stages: plain texts, texts with human-scored pairs, or labelled texts."""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError


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


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with one class label each (an index into `label_names`): a classification set."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        # Checked once here so every consumer (splits, batching, metrics) can trust the alignment.
        if len(self.texts) != len(self.labels):
            raise UserError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        if any(not 0 <= label < len(self.label_names) for label in self.labels):
            raise UserError(f"{self.name}: labels must lie in 0..{len(self.label_names) - 1} ({self.label_names})")
