"""Data for training, calibration and evaluation: reference sets (fetched on first use) and user files."""

from __future__ import annotations

import numpy as np

from compress.data import spam
from compress.data.files import labeled_set, scored_pairs, text_set
from compress.data.reference import REFERENCE_SETS
from compress.data.sets import LabeledTexts, ScoredPairs, TextSet
from compress.data.spec import FileSet, ReferenceSet
from compress.errors import UserError

__all__ = ["LabeledTexts", "ScoredPairs", "TextSet", "load_evaluation", "load_labeled", "load_texts"]


def load_texts(spec: ReferenceSet | FileSet, split_seed: int = 0) -> TextSet:
    """Plain texts (calibration, language modelling): a reference set's documents, or a file's text column."""
    if isinstance(spec, ReferenceSet):
        if spec.reference == "spam-assassin":
            part = load_labeled(spec, split_seed)
            return TextSet(part.name, part.texts)
        data: TextSet | ScoredPairs = REFERENCE_SETS[spec.reference]()
        return TextSet(data.name, data.texts[: spec.limit])
    return text_set(spec.path, spec.text_field, spec.limit)


def load_labeled(spec: ReferenceSet | FileSet, split_seed: int = 0) -> LabeledTexts:
    """Texts with class labels: a split of spam-assassin, or a file's text and label columns."""
    if isinstance(spec, ReferenceSet):
        if spec.reference != "spam-assassin" or spec.split is None:
            raise UserError(f"data: reference set {spec.reference!r} has no class labels; use spam-assassin")

        part = spam.split(spam.load_spam(), split_seed)[spec.split]
        if spec.limit is None or spec.limit >= len(part.texts):
            return part
        # A seeded sample, not the first rows: the split keeps corpus order, which groups the labels.
        keep = sorted(np.random.default_rng(split_seed).permutation(len(part.texts))[: spec.limit].tolist())
        return LabeledTexts(
            part.name, tuple(part.texts[i] for i in keep), tuple(part.labels[i] for i in keep), part.label_names
        )
    if spec.label_field is None:
        raise UserError(f"data: {spec.path} needs label_field for a classification task")
    return labeled_set(spec.path, spec.text_field, spec.label_field, spec.limit)


def load_evaluation(spec: ReferenceSet | FileSet) -> ScoredPairs:
    """The embedding task's evaluation set: texts and human-scored pairs over them."""
    if isinstance(spec, ReferenceSet):
        if spec.reference == "spam-assassin":
            raise UserError("data.evaluation: spam-assassin has no scored pairs; use lee for the embedding task")
        pairs: TextSet | ScoredPairs = REFERENCE_SETS[spec.reference]()
        if not isinstance(pairs, ScoredPairs):
            raise UserError(f"data.evaluation: reference set {spec.reference!r} has no scored pairs; use lee")
        if spec.limit is None:
            return pairs
        return ScoredPairs(pairs.name, pairs.texts, pairs.pairs[: spec.limit], pairs.scores[: spec.limit])
    if spec.pair_fields is None or spec.score_field is None:
        raise UserError("data.evaluation: an embedding evaluation file needs pair_fields and score_field")
    return scored_pairs(spec.path, spec.pair_fields, spec.score_field, spec.limit)
