"""In-memory data sets handed to stages: plain texts, human-scored pairs, labelled texts (or pairs), tagged words."""

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
    # A pair task (NLI, paraphrase, a cross-encoder): the second text of each example, aligned with texts.
    text_pairs: tuple[str, ...] | None = None
    # Scored pairs (a reranker's relevance): a graded score per example, for ranking metrics; optional.
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Checked once here so every consumer (splits, batching, metrics) can trust the alignment.
        if len(self.texts) != len(self.labels):
            raise UserError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        for extra, what in ((self.text_pairs, "second texts"), (self.scores, "scores")):
            if extra is not None and len(extra) != len(self.texts):
                raise UserError(f"{self.name}: {len(self.texts)} texts but {len(extra)} {what}")
        if any(not 0 <= label < len(self.label_names) for label in self.labels):
            raise UserError(f"{self.name}: labels must lie in 0..{len(self.label_names) - 1} ({self.label_names})")


@dataclass(frozen=True)
class TaggedWords:
    """Sentences as words, one tag per word (an index into `tag_names`): a token-classification set."""

    name: str
    sentences: tuple[tuple[str, ...], ...]
    tags: tuple[tuple[int, ...], ...]
    tag_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.sentences) != len(self.tags):
            raise UserError(f"{self.name}: {len(self.sentences)} sentences but {len(self.tags)} tag rows")
        for i, (words, tags) in enumerate(zip(self.sentences, self.tags, strict=True)):
            if len(words) != len(tags) or not words:
                raise UserError(f"{self.name}: sentence {i + 1} has {len(words)} words but {len(tags)} tags")
            if any(not 0 <= t < len(self.tag_names) for t in tags):
                raise UserError(f"{self.name}: tags must lie in 0..{len(self.tag_names) - 1}")
