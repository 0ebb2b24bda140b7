"""Data for calibration and evaluation: reference sets (fetched on first use) and user files."""

from __future__ import annotations

from compress.data.files import scored_pairs, text_set
from compress.data.reference import REFERENCE_SETS
from compress.data.sets import ScoredPairs, TextSet
from compress.errors import UserError
from compress.recipe import FileSet, ReferenceSet

__all__ = ["ScoredPairs", "TextSet", "load_evaluation", "load_texts"]


def load_texts(spec: ReferenceSet | FileSet) -> TextSet:
    """Plain texts (for calibration): a reference set's documents, or a file's text column."""
    if isinstance(spec, ReferenceSet):
        data: TextSet | ScoredPairs = REFERENCE_SETS[spec.reference]()
        texts = data.texts[: spec.limit]
        return TextSet(data.name, texts)
    return text_set(spec.path, spec.text_field, spec.limit)


def load_evaluation(spec: ReferenceSet | FileSet) -> ScoredPairs:
    """The embedding task's evaluation set: texts and human-scored pairs over them."""
    if isinstance(spec, ReferenceSet):
        pairs: TextSet | ScoredPairs = REFERENCE_SETS[spec.reference]()
        if not isinstance(pairs, ScoredPairs):
            raise UserError(f"data.evaluation: reference set {spec.reference!r} has no scored pairs; use lee")
        if spec.limit is None:
            return pairs
        return ScoredPairs(pairs.name, pairs.texts, pairs.pairs[: spec.limit], pairs.scores[: spec.limit])
    if spec.pair_fields is None or spec.score_field is None:
        raise UserError("data.evaluation: an embedding evaluation file needs pair_fields and score_field")
    return scored_pairs(spec.path, spec.pair_fields, spec.score_field, spec.limit)
