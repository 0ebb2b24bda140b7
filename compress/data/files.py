"""User data files: JSONL (one object per line) or CSV with a header row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from compress.data.sets import LabeledTexts, ScoredPairs, TaggedWords, TextSet
from compress.errors import UserError


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .csv file; a bad line is a UserError naming file:line."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the data file ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
        return rows
    if suffix == ".csv":
        try:
            return list(csv.DictReader(text.splitlines()))
        except csv.Error as exc:
            raise UserError(f"{path}: not valid CSV ({exc})") from None
    raise UserError(f"{path}: unsupported data file type {suffix!r}; use .jsonl or .csv")


def _field(path: Path, rows: list[dict[str, Any]], index: int, field: str) -> Any:
    row = rows[index]
    if field not in row:
        raise UserError(f"{path}: row {index + 1} has no field {field!r} (fields: {', '.join(map(str, row))})")
    return row[field]


def text_set(path: Path, text_field: str, limit: int | None) -> TextSet:
    rows = read_rows(path)[:limit]
    if not rows:
        raise UserError(f"{path}: the data file holds no rows")
    texts = tuple(str(_field(path, rows, i, text_field)) for i in range(len(rows)))
    return TextSet(path.name, texts)


def scored_pairs(path: Path, fields: tuple[str, str], score_field: str, limit: int | None) -> ScoredPairs:
    rows = read_rows(path)[:limit]
    if len(rows) < 3:
        raise UserError(f"{path}: an evaluation set of scored pairs needs at least 3 rows")
    index: dict[str, int] = {}
    pairs, scores = [], []
    for i in range(len(rows)):
        a, b = (str(_field(path, rows, i, f)) for f in fields)
        raw = _field(path, rows, i, score_field)
        try:
            scores.append(float(raw))
        except (TypeError, ValueError):
            raise UserError(f"{path}: row {i + 1}: {score_field}={raw!r} is not a number") from None
        pairs.append((index.setdefault(a, len(index)), index.setdefault(b, len(index))))
    return ScoredPairs(path.name, tuple(index), tuple(pairs), tuple(scores))


def labeled_set(
    path: Path, text_field: str, label_field: str, limit: int | None, text_pair_field: str | None = None
) -> LabeledTexts:
    """Texts (or text pairs) and class labels; labels may be any strings or numbers, mapped to 0..K-1 in
    sorted order."""
    rows = read_rows(path)[:limit]
    if not rows:
        raise UserError(f"{path}: the data file holds no rows")
    texts = tuple(str(_field(path, rows, i, text_field)) for i in range(len(rows)))
    pairs = None
    if text_pair_field is not None:
        pairs = tuple(str(_field(path, rows, i, text_pair_field)) for i in range(len(rows)))
    raw = [str(_field(path, rows, i, label_field)) for i in range(len(rows))]
    names = tuple(sorted(set(raw)))
    if len(names) < 2:
        raise UserError(f"{path}: {label_field} holds a single class ({names[0]!r}); a classifier needs two or more")
    index = {name: i for i, name in enumerate(names)}
    return LabeledTexts(path.name, texts, tuple(index[r] for r in raw), names, text_pairs=pairs)


def pair_texts(path: Path, text_field: str, text_pair_field: str, limit: int | None) -> TextSet:
    """The distinct texts of both columns of a file of text pairs, in order of first appearance."""
    rows = read_rows(path)[:limit]
    if not rows:
        raise UserError(f"{path}: the data file holds no rows")
    both = (str(_field(path, rows, i, f)) for i in range(len(rows)) for f in (text_field, text_pair_field))
    return TextSet(path.name, tuple(dict.fromkeys(both)))


def text_pairs(path: Path, text_field: str, text_pair_field: str, limit: int | None) -> list[tuple[str, str]]:
    """Each row's (text, second text), labels or not (unlabelled pairs a teacher labels)."""
    rows = read_rows(path)[:limit]
    if not rows:
        raise UserError(f"{path}: the data file holds no rows")
    return [
        (str(_field(path, rows, i, text_field)), str(_field(path, rows, i, text_pair_field))) for i in range(len(rows))
    ]


def word_texts(path: Path, words_field: str, limit: int | None) -> TextSet:
    """Each row's words joined by spaces (a token-classification file read as plain text)."""
    rows = read_rows(path)[:limit]
    if not rows:
        raise UserError(f"{path}: the data file holds no rows")
    return TextSet(path.name, tuple(" ".join(_words(path, rows, i, words_field)) for i in range(len(rows))))


def tagged_set(path: Path, words_field: str, tags_field: str, limit: int | None) -> TaggedWords:
    """Sentences as lists of words with one tag per word (.jsonl); tags may be strings or integers, mapped
    to 0..K-1 in sorted order (integers sorted as numbers)."""
    rows = read_rows(path)[:limit]
    if not rows:
        raise UserError(f"{path}: the data file holds no rows")
    sentences, raw = [], []
    for i in range(len(rows)):
        words = _words(path, rows, i, words_field)
        tags = _field(path, rows, i, tags_field)
        if not isinstance(tags, list) or any(isinstance(t, bool) or not isinstance(t, str | int) for t in tags):
            raise UserError(f"{path}: row {i + 1}: {tags_field} must be a list of tags (strings or integers)")
        if len(tags) != len(words):
            raise UserError(f"{path}: row {i + 1}: {len(words)} words but {len(tags)} tags")
        sentences.append(words)
        raw.append(tags)
    distinct = {t for tags in raw for t in tags}
    ordered = sorted(distinct) if all(isinstance(t, int) for t in distinct) else sorted(distinct, key=str)
    names = tuple(dict.fromkeys(str(t) for t in ordered))
    if len(names) < 2:
        raise UserError(f"{path}: {tags_field} holds a single tag ({names[0]!r}); a tagger needs two or more")
    index = {name: k for k, name in enumerate(names)}
    tag_rows = tuple(tuple(index[str(t)] for t in tags) for tags in raw)
    return TaggedWords(path.name, tuple(sentences), tag_rows, names)


def _words(path: Path, rows: list[dict[str, Any]], index: int, field: str) -> tuple[str, ...]:
    words = _field(path, rows, index, field)
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        where = f"{path}: row {index + 1}: {field}"
        if path.suffix.lower() != ".jsonl":
            raise UserError(f"{where}: words come as a JSON list per row; use a .jsonl file for token classification")
        raise UserError(f"{where} must be a non-empty list of words (non-blank strings)")
    return tuple(words)
