"""Seeded train/validation/test splits of the reference sets, and seeded samples of a part.

Every shuffle uses numpy's PCG64 generator (`default_rng(seed)`): the same permutation on every machine for
a given seed and numpy version. Rows that must stay together (identical texts, the pairs of one premise,
the sentences of one text) are placed as a whole, so no part ever sees another part's example.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compress.data.sets import LabeledTexts, TaggedWords
from compress.errors import UserError

PARTS = ("train", "validation", "test")
EIGHTY_TEN_TEN = (0.8, 0.1, 0.1)


def stratified(
    data: LabeledTexts, seed: int, fractions: tuple[float, float, float] = EIGHTY_TEN_TEN
) -> dict[str, LabeledTexts]:
    """Seeded train/validation/test split, stratified per label; identical texts stay together.

    Every row lands in exactly one part. Per label, groups of identical texts are shuffled and cut at the
    rounded cumulative fractions, so each part's label count is within one row of its share when no text
    repeats. A group takes the label of its first row.
    """
    _check(seed, fractions)
    rng = np.random.default_rng(seed)
    groups = identical_groups(data.texts)
    parts: dict[str, list[int]] = {part: [] for part in PARTS}
    for label in range(len(data.label_names)):
        mine = [group for group in groups if data.labels[group[0]] == label]
        total = sum(len(group) for group in mine)
        bounds = (round(total * fractions[0]), round(total * (fractions[0] + fractions[1])))
        placed = 0
        for k in rng.permutation(len(mine)):
            parts[PARTS[sum(placed >= b for b in bounds)]].extend(mine[k])
            placed += len(mine[k])
    return {part: labeled_subset(data, sorted(rows), f"{data.name}/{part}") for part, rows in parts.items()}


def whole_groups(count: int, seed: int, fractions: tuple[float, float, float] = EIGHTY_TEN_TEN) -> list[str]:
    """The part of each of `count` groups (e.g. the 500 Brown texts): a seeded shuffle cut at the rounded
    cumulative fractions, so the parts hold round(count * fraction) groups."""
    _check(seed, fractions)
    bounds = (round(count * fractions[0]), round(count * (fractions[0] + fractions[1])))
    part_of = [""] * count
    for rank, k in enumerate(np.random.default_rng(seed).permutation(count)):
        part_of[int(k)] = PARTS[sum(rank >= b for b in bounds)]
    return part_of


def held_out_groups(groups: Sequence[Sequence[int]], size: int, seed: int) -> set[int]:
    """Rows of whole groups, taken in a seeded order while they fit, until exactly `size` rows (or the
    closest below it when no remaining group fits): a held-out part that never splits a group."""
    _check(seed, EIGHTY_TEN_TEN)
    chosen: set[int] = set()
    for k in np.random.default_rng(seed).permutation(len(groups)):
        group = groups[int(k)]
        if len(chosen) + len(group) <= size:
            chosen.update(group)
        if len(chosen) == size:
            break
    return chosen


def sample(count: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted row indices of a seeded sample of `limit` rows, or None when the limit keeps every row.

    A sample, not the first rows: the reference sets keep corpus order, which groups labels and genres.
    """
    if limit is None or limit >= count:
        return None
    return sorted(np.random.default_rng(seed).permutation(count)[:limit].tolist())


def identical_groups(texts: Sequence[str]) -> list[list[int]]:
    """Row indices grouped by identical text, in order of first appearance (deterministic)."""
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(text, []).append(i)
    return list(groups.values())


def labeled_subset(data: LabeledTexts, rows: Sequence[int], name: str) -> LabeledTexts:
    """The given rows of a labelled set (second texts and scores follow their rows)."""
    pairs, scores = data.text_pairs, data.scores
    return LabeledTexts(
        name,
        tuple(data.texts[i] for i in rows),
        tuple(data.labels[i] for i in rows),
        data.label_names,
        None if pairs is None else tuple(pairs[i] for i in rows),
        None if scores is None else tuple(scores[i] for i in rows),
    )


def tagged_subset(data: TaggedWords, rows: Sequence[int], name: str) -> TaggedWords:
    return TaggedWords(name, tuple(data.sentences[i] for i in rows), tuple(data.tags[i] for i in rows), data.tag_names)


def _check(seed: int, fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"split: fractions must be three non-negative numbers summing to 1, got {fractions}")
    if seed < 0:
        raise UserError(f"split: the seed must be a non-negative integer, got {seed}")
