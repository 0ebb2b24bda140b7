"""Data for training, calibration and evaluation: reference sets (fetched on first use) and user files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compress.data import bbc, brown, snli, spam, splits
from compress.data.files import labeled_set, pair_texts, scored_pairs, tagged_set, text_pairs, text_set, word_texts
from compress.data.reference import REFERENCE_SETS
from compress.data.sets import LabeledTexts, ScoredPairs, TaggedWords, TextSet
from compress.data.spec import FileSet, ReferenceSet
from compress.errors import UserError

__all__ = [
    "LabeledTexts",
    "ScoredPairs",
    "TaggedWords",
    "TextSet",
    "load_evaluation",
    "load_labeled",
    "load_tagged",
    "load_texts",
    "load_unlabeled",
]

# The reference sets with class labels: seed -> their train / validation / test parts.
_LABELED: dict[str, Callable[[int], dict[str, LabeledTexts]]] = {
    "spam-assassin": lambda seed: spam.split(spam.load_spam(), seed),
    "bbc-news": bbc.split,
    "snli": snli.split,
}


def load_texts(spec: ReferenceSet | FileSet, split_seed: int = 0) -> TextSet:
    """Plain texts (calibration, distillation, language modelling): a reference set's documents (of a split
    set: its part's texts; snli: the part's distinct premises and hypotheses; brown-pos: its sentences, words
    joined by spaces), or a file's text column (both columns of a pair file; the joined words of a tagged one).
    `limit` counts texts, a seeded sample of a split set's part."""
    if isinstance(spec, FileSet):
        if spec.words_field is not None:
            return word_texts(spec.path, spec.words_field, spec.limit)
        if spec.text_pair_field is not None:
            return pair_texts(spec.path, spec.text_field, spec.text_pair_field, spec.limit)
        return text_set(spec.path, spec.text_field, spec.limit)
    if spec.reference == "brown-pos":
        tagged = load_tagged(spec, split_seed)
        return TextSet(tagged.name, tuple(" ".join(words) for words in tagged.sentences))
    if spec.reference in _LABELED:
        part = _part(spec, split_seed)
        texts = part.texts
        if part.text_pairs is not None:  # premise, its hypotheses, the next premise, ...: each sentence once
            pairs = zip(part.texts, part.text_pairs, strict=True)
            texts = tuple(dict.fromkeys(text for pair in pairs for text in pair))
        rows = splits.sample(len(texts), spec.limit, split_seed)
        return TextSet(part.name, texts if rows is None else tuple(texts[i] for i in rows))
    data: TextSet | ScoredPairs = REFERENCE_SETS[spec.reference]()
    return TextSet(data.name, data.texts[: spec.limit])


def load_labeled(spec: ReferenceSet | FileSet, split_seed: int = 0) -> LabeledTexts:
    """Texts (or text pairs) with class labels: a part of spam-assassin, bbc-news or snli (`limit`: a seeded
    sample of it), or a file's text, second-text and label columns."""
    if isinstance(spec, FileSet):
        if spec.label_field is None:
            raise UserError(f"data: {spec.path} needs label_field for a classification task")
        return labeled_set(spec.path, spec.text_field, spec.label_field, spec.limit, spec.text_pair_field)
    if spec.reference not in _LABELED:
        hint = " (it tags words: a token-classification set)" if spec.reference == "brown-pos" else ""
        raise UserError(
            f"data: reference set {spec.reference!r} has no class labels{hint}; use spam-assassin, bbc-news or snli"
        )
    part = _part(spec, split_seed)
    rows = splits.sample(len(part.texts), spec.limit, split_seed)
    return part if rows is None else splits.labeled_subset(part, rows, part.name)


def load_tagged(spec: ReferenceSet | FileSet, split_seed: int = 0) -> TaggedWords:
    """Sentences of words with one tag each (token classification): a part of brown-pos (`limit`: a seeded
    sample of its sentences), or a .jsonl file's words and tags fields."""
    if isinstance(spec, FileSet):
        if spec.words_field is None or spec.tags_field is None:
            raise UserError(
                f"data: {spec.path} needs words_field and tags_field for token classification "
                "(a .jsonl row per sentence: a list of words and a list of as many tags)"
            )
        return tagged_set(spec.path, spec.words_field, spec.tags_field, spec.limit)
    if spec.reference != "brown-pos" or spec.split is None:
        raise UserError(f"data: reference set {spec.reference!r} has no word tags; use brown-pos")
    part = brown.split(split_seed)[spec.split]
    rows = splits.sample(len(part.sentences), spec.limit, split_seed)
    return part if rows is None else splits.tagged_subset(part, rows, part.name)


def load_unlabeled(spec: ReferenceSet | FileSet, kind: str, split_seed: int = 0) -> list[Any]:
    """Examples without labels, for a teacher to label (distillation's transfer set), as the model takes them:
    texts (kind text), (text, text) pairs (kind pair: snli's pairs or a file's two text columns) or sentences
    of words (kind words: a tagged set's sentences, or any text split at spaces). Labels present are unused."""
    if kind == "pair":
        if isinstance(spec, FileSet) and spec.text_pair_field is not None:
            return text_pairs(spec.path, spec.text_field, spec.text_pair_field, spec.limit)
        if isinstance(spec, ReferenceSet) and spec.reference == "snli":
            part = load_labeled(spec, split_seed)
            assert part.text_pairs is not None
            return list(zip(part.texts, part.text_pairs, strict=True))
        where = spec.path if isinstance(spec, FileSet) else spec.reference
        raise UserError(
            f"data.transfer: {where} holds single texts; a classifier of text pairs learns from pairs "
            "(snli, or a file with text_pair_field)"
        )
    if kind == "words":
        if (isinstance(spec, FileSet) and spec.tags_field is not None) or (
            isinstance(spec, ReferenceSet) and spec.reference == "brown-pos"
        ):
            return list(load_tagged(spec, split_seed).sentences)
        return [tuple(text.split()) for text in load_texts(spec, split_seed).texts if text.split()]
    return list(load_texts(spec, split_seed).texts)


def load_evaluation(spec: ReferenceSet | FileSet) -> ScoredPairs:
    """The embedding task's evaluation set: texts and human-scored pairs over them."""
    if isinstance(spec, ReferenceSet):
        pairs = None if spec.split is not None else REFERENCE_SETS[spec.reference]()
        if not isinstance(pairs, ScoredPairs):
            raise UserError(f"data.evaluation: reference set {spec.reference!r} has no scored pairs; use lee")
        if spec.limit is None:
            return pairs
        return ScoredPairs(pairs.name, pairs.texts, pairs.pairs[: spec.limit], pairs.scores[: spec.limit])
    if spec.pair_fields is None or spec.score_field is None:
        raise UserError("data.evaluation: an embedding evaluation file needs pair_fields and score_field")
    return scored_pairs(spec.path, spec.pair_fields, spec.score_field, spec.limit)


def _part(spec: ReferenceSet, split_seed: int) -> LabeledTexts:
    """The part of a labelled reference set the spec names (the validator makes `split` present)."""
    if spec.split is None:
        raise UserError(f"data: reference set {spec.reference!r} needs split (train, validation or test)")
    return _LABELED[spec.reference](split_seed)[spec.split]
