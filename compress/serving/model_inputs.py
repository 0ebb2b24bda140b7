"""What a predict request holds, and how the server turns it into the model's input arrays.

Standalone (numpy and tokenizers only, imported when used): the runtime images copy it beside server.py,
which imports it. What a request carries follows the bundle's input_kind:

    text    {"texts": ["...", ...]} or {"text": "..."}
    pair    {"pairs": [["first", "second"], ...]}                  (NLI, paraphrase, a cross-encoder)
    words   {"words": [["The", "cat", ...], ...]}, or texts split on whitespace    (a tagger)

Tokenized as the pipeline does (compress/models/hf.py encode, through transformers' fast tokenizer, which
calls the same tokenizers library): a pair is one sequence ([CLS] first [SEP] second [SEP]) cut longest
first; words are pre-split (each word tokenized on its own) and a tagger reads each word at its first
sub-token. A request the model cannot take is a BadRequest with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

if __package__:  # imported by the packaged server.py: compress.serving
    from compress.serving.bundle_check import BundleError, first_line
else:  # beside server.py in the runtime images
    from bundle_check import BundleError, first_line  # type: ignore[import-not-found,no-redef]

FIELDS = {"text": ("texts", "text"), "pair": ("pairs",), "words": ("words", "texts", "text")}
WANTS = {
    "text": '{"texts": ["...", ...]}',
    "pair": '{"pairs": [["first text", "second text"], ...]}',
    "words": '{"words": [["The", "cat", ...], ...]} (or "texts", split on whitespace)',
}
TAKES = {"text": "single texts", "pair": "text pairs", "words": "sentences of words"}
COUNTED = {"texts": "texts", "text": "texts", "pairs": "pairs", "words": "sentences"}
KNOWN = ("texts", "text", "pairs", "words", "truncate")
WARM_UP: dict[str, Any] = {"text": "warm up", "pair": ("warm up", "warm up"), "words": ("warm", "up")}
FIELD = {"text": "texts", "pair": "pairs", "words": "words"}  # what an example is called in a 413
# One encoded example: token ids, token type ids, and (words) the word index of each token (None: special).
Row = tuple[list[int], list[int], list[int | None] | None]


class BadRequest(Exception):
    """A client error: the HTTP status and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """A checked predict request: the examples in the model's kind (a text, a (first, second) pair, or a
    tuple of words), whether over-long ones may be cut, and whether the words came as texts split here."""

    examples: list[Any]
    truncate: bool
    field: str
    split: bool = False


def _unprocessable(message: str) -> BadRequest:
    return BadRequest(HTTPStatus.UNPROCESSABLE_ENTITY, message)


def parse_request(request: Any, kind: str, max_items: int) -> Request:
    """The examples of a predict request for a model of this input kind, or a BadRequest saying what is wrong."""
    if not isinstance(request, dict):
        raise _unprocessable(f"the body must be a JSON object: {WANTS[kind]}")
    unknown = sorted(set(request) - set(KNOWN))
    if unknown:
        raise _unprocessable(f"unknown field {unknown[0]!r}; send {' (or '.join(FIELDS[kind][:2])}) and truncate")
    given = [k for k in KNOWN[:4] if k in request]
    wrong = [k for k in given if k not in FIELDS[kind]]
    if wrong:
        raise _unprocessable(f'this model takes {TAKES[kind]}, not "{wrong[0]}": send {WANTS[kind]}')
    if len(given) != 1:
        choices = " or ".join(f'"{k}"' for k in FIELDS[kind])
        raise _unprocessable(f"send exactly one of {choices}: {WANTS[kind]}")
    field = given[0]
    items = [request["text"]] if field == "text" else request[field]
    if not isinstance(items, list) or not items:
        raise _unprocessable(f'"{field}" must be a non-empty list: {WANTS[kind]}')
    check_count(len(items), COUNTED[field], max_items)
    truncate = request.get("truncate", False)
    if not isinstance(truncate, bool):
        raise _unprocessable('"truncate" must be true or false')
    field = "texts" if field == "text" else field
    if field == "pairs":
        return Request([_pair(item, i) for i, item in enumerate(items)], truncate, field)
    if field == "words":
        return Request([_words(item, i) for i, item in enumerate(items)], truncate, field)
    texts = [check_text(item, f"texts[{i}]") for i, item in enumerate(items)]
    if kind == "words":
        return Request([tuple(t.split()) for t in texts], truncate, field, split=True)
    return Request(texts, truncate, field)


def check_count(count: int, what: str, limit: int) -> None:
    """A request of more than --max-texts examples is a 413."""
    if count > limit:
        raise BadRequest(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{count} {what} in one request; the limit is {limit} (--max-texts)"
        )


def check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _unprocessable(f"{where} is {type(value).__name__}, not a string")
    if not value.strip():
        raise _unprocessable(f"{where} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"): no text, and no tokenizer takes it
        raise _unprocessable(f"{where} is not valid Unicode (a lone surrogate)") from None
    return value


def _pair(item: Any, i: int) -> tuple[str, str]:
    if not isinstance(item, list) or len(item) != 2:
        raise _unprocessable(f'pairs[{i}] must be a list of two strings: ["first text", "second text"]')
    return check_text(item[0], f"pairs[{i}][0]"), check_text(item[1], f"pairs[{i}][1]")


def _words(item: Any, i: int) -> tuple[str, ...]:
    if not isinstance(item, list) or not item:
        raise _unprocessable(f'words[{i}] must be a non-empty list of strings: ["The", "cat", ...]')
    return tuple(check_text(word, f"words[{i}][{j}]") for j, word in enumerate(item))


class ByteEncoder:
    """edge-compress's byte tokenizer (zoo models; single texts only): pad 0, [CLS] 1, [SEP] 2, byte b as b + 3."""

    pad_id = 0

    def rows(self, examples: list[Any], kind: str) -> list[Row]:  # noqa: ARG002 (bundles check: text only)
        rows: list[Row] = []
        for text in examples:
            ids = [1, *(b + 3 for b in str(text).encode("utf-8")), 2]
            rows.append((ids, [0] * len(ids), None))
        return rows

    def cut(self, examples: list[Any], kind: str, limit: int) -> list[Row]:
        return [([*ids[: limit - 1], ids[-1]], types[:limit], words) for ids, types, words in self.rows(examples, kind)]


class TokenizerEncoder:
    """A Hugging Face tokenizer.json (the checkpoint's own) through the tokenizers library: one copy that never
    truncates (to count a request's tokens) and one that cuts at max_length longest first, as transformers'
    `truncation=True` does. Neither is changed after loading, so request threads may share them."""

    def __init__(self, folder: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        try:
            self.full = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.cutting = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            pad = config.get("pad_token", "[PAD]")
            side = str(config.get("truncation_side", "right"))
            self.full.no_truncation()
            self.full.no_padding()
            self.cutting.enable_truncation(max_length, stride=0, strategy="longest_first", direction=side)
            self.cutting.no_padding()
        except Exception as exc:  # tokenizers raises its own Exception type; a config that is no JSON object
            raise BundleError(f"{folder}: the tokenizer cannot be read ({first_line(exc)})") from None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.full.token_to_id(str(pad))
        if pad_id is None:
            raise BundleError(f"{folder}: the tokenizer has no padding token {pad!r}")
        self.pad_id = int(pad_id)

    def rows(self, examples: list[Any], kind: str) -> list[Row]:
        return _rows(self.full, examples, kind)

    def cut(self, examples: list[Any], kind: str, limit: int) -> list[Row]:  # noqa: ARG002 (set when loaded)
        return _rows(self.cutting, examples, kind)


def _rows(tokenizer: Any, examples: list[Any], kind: str) -> list[Row]:
    if kind == "words":  # each word on its own (transformers' is_split_into_words)
        encodings = tokenizer.encode_batch([list(words) for words in examples], is_pretokenized=True)
        return [(list(e.ids), list(e.type_ids), list(e.word_ids)) for e in encodings]
    batch = [tuple(pair) for pair in examples] if kind == "pair" else list(examples)
    return [(list(e.ids), list(e.type_ids), None) for e in tokenizer.encode_batch(batch)]


@dataclass(frozen=True)
class Encoded:
    """The model's input arrays (padded on the right), each example's token count and, for words, the token
    position of each word's first sub-token (-1: cut off by truncation, or no token at all)."""

    feeds: dict[str, Any]
    tokens: list[int]
    starts: list[list[int]] | None


def tokenize(encoder: ByteEncoder | TokenizerEncoder, request: Request, kind: str, max_length: int) -> list[Row]:
    """Each example's tokens; an over-long one is a 413 unless the request allows cutting."""
    rows = encoder.rows(request.examples, kind)
    long = [i for i, (ids, _, _) in enumerate(rows) if len(ids) > max_length]
    if long and not request.truncate:
        raise BadRequest(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{request.field}[{long[0]}] is {len(rows[long[0]][0])} tokens; this model takes at most {max_length} "
            '(send "truncate": true to cut it)',
        )
    for i, row in zip(long, encoder.cut([request.examples[i] for i in long], kind, max_length), strict=True):
        rows[i] = row
    return rows


def pad(rows: list[Row], inputs: list[str], pad_id: int) -> dict[str, Any]:
    """The model's input arrays for these rows, padded on the right to the longest."""
    import numpy as np

    width = max(len(ids) for ids, _, _ in rows)
    batch = {
        "input_ids": np.full((len(rows), width), pad_id, dtype=np.int64),  # (B, S)
        "attention_mask": np.zeros((len(rows), width), dtype=np.int64),  # (B, S)
        "token_type_ids": np.zeros((len(rows), width), dtype=np.int64),  # (B, S)
    }
    for i, (ids, types, _) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = ids
        batch["attention_mask"][i, : len(ids)] = 1
        batch["token_type_ids"][i, : len(types)] = types
    return {name: batch[name] for name in inputs}


def word_starts(rows: list[Row], request: Request) -> list[list[int]]:
    """Per example, each word's first token position (a tagger reads the word there)."""
    return [_first_tokens(words, len(ex)) for (_, _, words), ex in zip(rows, request.examples, strict=True)]


def encode(
    encoder: ByteEncoder | TokenizerEncoder,
    request: Request,
    kind: str,
    inputs: list[str],
    max_length: int,
) -> Encoded:
    """Tokenize a request's examples for the model, as one padded batch."""
    rows = tokenize(encoder, request, kind, max_length)
    starts = word_starts(rows, request) if kind == "words" else None
    return Encoded(pad(rows, inputs, encoder.pad_id), [len(ids) for ids, _, _ in rows], starts)


def _first_tokens(word_ids: list[int | None] | None, n_words: int) -> list[int]:
    """Each word's first token position, as the pipeline's word_starts reads it (-1: the word has no token)."""
    first = [-1] * n_words
    for pos, word in enumerate(word_ids or []):
        if word is not None and first[word] < 0:
            first[word] = pos
    return first


def tag_words(scores: Any, starts: list[list[int]], labels: list[str] | None) -> dict[str, Any]:
    """A tagger's answer from its per-token probabilities (B, S, L): per word the label and the probabilities at
    its first sub-token, null for a word the model did not see; `words_cut` counts those per example."""
    tags: list[list[Any]] = []
    word_scores: list[list[Any]] = []
    for row, first in zip(scores, starts, strict=True):
        picks = [int(row[p].argmax()) if p >= 0 else None for p in first]
        tags.append([None if k is None else labels[k] if labels else k for k in picks])
        word_scores.append([row[p].astype(float).tolist() if p >= 0 else None for p in first])
    return {"tags": tags, "scores": word_scores, "words_cut": [sum(p < 0 for p in first) for first in starts]}
