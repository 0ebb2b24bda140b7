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
# 2: metadata.json "files" holds the sha256 of every file of the bundle; 3: input_kind (text pairs, words);
# 4: "variants", one int8 model per CPU family instead of model.onnx.
# A bundle carries the lowest version that reads it right: 3 only for pair and word models, which a server
# of version 2 would take for single texts; text bundles stay 2, so older servers still serve them.
VERSION = 4
PAIRS_VERSION = 3
OLDEST = 2
TASKS = ("embedding", "classification", "token-classification")
# What one example of a task's model is: a text, a (first, second) text pair, or a sentence of words.
INPUT_KINDS = {"embedding": ("text",), "classification": ("text", "pair"), "token-classification": ("words",)}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
READS = ("model.onnx", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")  # what this file reads
# CPU families with an int8 variant each, and its file: named as sentence-transformers names its per-CPU
# ONNX files. x86_64-vnni covers AVX-512 VNNI and AVX-VNNI (ONNX Runtime runs its VNNI kernels on both).
VARIANT_FILES = {
    "x86_64-vnni": "model_qint8_avx512_vnni.onnx",
    "x86_64-avx2": "model_qint8_avx2.onnx",
    "aarch64": "model_qint8_arm64.onnx",
}
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


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
    _check_variants(meta, path)
    _check_files(meta, folder, path)
    return meta


def family_of(arch: str, features: set[str] | list[str]) -> str:
    """The CPU family of a machine: aarch64, x86_64-vnni (a VNNI flag), else x86_64-avx2."""
    if arch.lower() in ("aarch64", "arm64"):
        return "aarch64"
    return "x86_64-vnni" if VNNI_FLAGS & set(features) else "x86_64-avx2"


def host_family(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> tuple[str, str]:
    """This machine's CPU family, and the evidence (the flags that decided it)."""
    import platform

    arch = machine or platform.machine()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    family = family_of(arch, flags)
    if family == "aarch64":
        extras = sorted(flags & {"asimddp", "i8mm"})
        return family, f"{arch}" + (f" with {' '.join(extras)}" if extras else "")
    return family, f"{arch} with {' '.join(sorted(flags & VNNI_FLAGS)) or 'no VNNI flag'}"


def pick_variant(meta: dict[str, Any], family: str, why: str) -> dict[str, Any]:
    """The variant of `family`; a BundleError naming the families the bundle was validated for otherwise."""
    variants: dict[str, Any] = meta["variants"]
    if family not in variants:
        raise BundleError(
            f"this CPU is {family} ({why}); the bundle holds int8 variants validated on {', '.join(sorted(variants))} "
            f"only; package a run validated on a {family} target into it (edge-compress package RUN --variant RUN2)"
        )
    return {"family": family, "chosen_by": why, **variants[family]}


def _check_variants(meta: dict[str, Any], path: Path) -> None:
    """Version 4: "variants" maps CPU families to their file (the standard name), hash and session settings."""
    variants = meta.get("variants")
    if variants is None:
        return
    if meta["version"] < VERSION or not isinstance(variants, dict) or not variants:
        raise BundleError(f"{path}: 'variants' needs bundle version {VERSION} and at least one family")
    for family, variant in variants.items():
        if family not in VARIANT_FILES:
            raise BundleError(f"{path}: variant {family!r} is not a CPU family ({', '.join(VARIANT_FILES)})")
        if not isinstance(variant, dict) or variant.get("file") != VARIANT_FILES[family]:
            raise BundleError(f"{path}: variant {family} must name its file {VARIANT_FILES[family]}")
        if meta["files"].get(variant["file"]) != variant.get("sha256"):
            raise BundleError(f"{path}: variant {family}'s sha256 is not the one files lists for {variant['file']}")
        if not FIELDS["session"][1](variant.get("session", {})):
            raise BundleError(f"{path}: variant {family}'s session must be {FIELDS['session'][2]}")


def _check_input_kind(meta: dict[str, Any], path: Path) -> None:
    """The input kind fits the task and the tokenizer; bundles written before it was recorded take texts."""
    kind = meta.get("input_kind", "text")
    allowed = INPUT_KINDS[meta["task"]]
    if kind not in allowed:
        raise BundleError(f"{path}: input_kind {kind!r} does not fit task {meta['task']} ({' or '.join(allowed)})")
    if kind != "text" and (meta["version"] < PAIRS_VERSION or meta["tokenizer"] != "wordpiece"):
        raise BundleError(
            f"{path}: input_kind {kind} needs bundle version {PAIRS_VERSION} and a tokenizer.json; re-package the run"
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
    models = [v["file"] for v in meta["variants"].values()] if "variants" in meta else ["model.onnx"]
    needed = models + (["tokenizer/tokenizer.json"] if meta["tokenizer"] == "wordpiece" else [])
    for name in needed + [n for n in READS if (folder / n).exists()]:
        if name not in files:
            raise BundleError(f"{path}: files has no sha256 of {name}; re-package the run with `edge-compress package`")
    if "variants" not in meta and files["model.onnx"] != meta["model_sha256"]:
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
