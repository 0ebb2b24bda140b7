"""The checks of a bundle before the server loads it: metadata.json's fields and every file's sha256.

Standalone (the standard library only): the runtime images copy it beside server.py, which imports it.
A bundle that fails is a BundleError with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT = "edge-compress-bundle"
# 2: metadata.json "files" holds the sha256 of every file of the bundle; 3: input_kind (text pairs, words).
# A bundle carries the lowest version that reads it right: 3 only for pair and word models, which a server
# of version 2 would take for single texts; text bundles stay 2, so older servers still serve them.
VERSION = 3
OLDEST = 2
TASKS = ("embedding", "classification", "token-classification")
# What one example of a task's model is: a text, a (first, second) text pair, or a sentence of words.
INPUT_KINDS = {"embedding": ("text",), "classification": ("text", "pair"), "token-classification": ("words",)}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
READS = ("model.onnx", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")  # what this file reads


class BundleError(Exception):
    """The model folder cannot be served (bad metadata, missing files, wrong hash, missing kernels)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def load_metadata(folder: Path) -> dict[str, Any]:
    """metadata.json, checked: the format, the fields the server uses, and every file's packaged sha256."""
    path = folder / "metadata.json"
    if not path.is_file():
        raise BundleError(f"{folder}: no metadata.json (make the folder with `edge-compress package RUN_DIR`)")
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(f"{path}: not an {FORMAT} (format {found!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version < OLDEST or "files" not in meta:
        raise BundleError(f"{path}: an older bundle with no file hashes; re-package it with `edge-compress package`")
    if version > VERSION:
        raise BundleError(f"{path}: bundle version {version} is newer than this server's {VERSION}; update it")
    _check_fields(meta, path)
    _check_input_kind(meta, path)
    _check_files(meta, folder, path)
    return meta


def _check_input_kind(meta: dict[str, Any], path: Path) -> None:
    """The input kind fits the task and the tokenizer; bundles written before it was recorded take texts."""
    kind = meta.get("input_kind", "text")
    allowed = INPUT_KINDS[meta["task"]]
    if kind not in allowed:
        raise BundleError(f"{path}: input_kind {kind!r} does not fit task {meta['task']} ({' or '.join(allowed)})")
    if kind != "text" and (meta["version"] < VERSION or meta["tokenizer"] != "wordpiece"):
        raise BundleError(
            f"{path}: input_kind {kind} needs bundle version {VERSION} and a tokenizer.json; re-package the run"
        )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


FIELDS: dict[str, tuple[bool, Callable[[Any], Any], str]] = {  # field: (required, check, what it must be)
    "task": (True, lambda v: v in TASKS, ", ".join(TASKS)),
    "inputs": (True, lambda v: _strings(v) and v and set(v) <= set(INPUTS), f"a non-empty list of {', '.join(INPUTS)}"),
    "max_length": (True, lambda v: type(v) is int and v >= 2, "an integer of at least 2"),
    "tokenizer": (True, lambda v: v in ("bytes", "wordpiece"), "bytes or wordpiece"),
    "model_sha256": (True, lambda v: isinstance(v, str), "a string"),
    "files": (True, lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "path: sha256"),
    "input_kind": (False, lambda v: v in ("text", "pair", "words"), "text, pair or words"),
    "labels": (False, lambda v: v is None or (_strings(v) and len(v) >= 1), "a non-empty list of strings"),
    "custom_ops": (False, _strings, "a list of strings"),
    "session": (
        False,
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("config_entries", {}), dict)
            and _strings(v.get("disabled_optimizers", []))
        ),
        "an object with config_entries (an object) and disabled_optimizers (a list)",
    ),
}


def _check_fields(meta: dict[str, Any], path: Path) -> None:
    for key, (required, check, what) in FIELDS.items():
        if required and key not in meta:
            raise BundleError(f"{path}: no {key!r} field; re-package the run with `edge-compress package`")
        if key in meta and not check(meta[key]):
            raise BundleError(f"{path}: {key!r} must be {what}, not {json.dumps(meta[key])[:60]}")


def _check_files(meta: dict[str, Any], folder: Path, path: Path) -> None:
    """Every file the server reads is listed, and every listed file is there with its packaged sha256."""
    files: dict[str, str] = meta["files"]
    needed = ["model.onnx", "tokenizer/tokenizer.json"][: 2 if meta["tokenizer"] == "wordpiece" else 1]
    for name in needed + [n for n in READS if (folder / n).exists()]:
        if name not in files:
            raise BundleError(f"{path}: files has no sha256 of {name}; re-package the run with `edge-compress package`")
    if files["model.onnx"] != meta["model_sha256"]:
        raise BundleError(f'{path}: files["model.onnx"] is not model_sha256')
    for name, digest in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path}: files lists {name!r}, outside the bundle")
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (metadata.json lists it); re-package the run")
        found = sha256_of(file)
        if found != digest:
            raise BundleError(f"{file}: sha256 {found[:12]} is not the packaged {digest[:12]}; re-package the run")
