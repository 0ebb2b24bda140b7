"""A bundle of one model in several int8 variants, one per CPU family, each validated on that family.

    BUNDLE/model_qint8_avx512_vnni.onnx   x86-64 with AVX-512 VNNI or AVX-VNNI (preset x86_64-vnni)
    BUNDLE/model_qint8_avx2.onnx          x86-64 without VNNI (preset x86_64-avx2: 7-bit weights)
    BUNDLE/model_qint8_arm64.onnx         aarch64 (preset aarch64)
    BUNDLE/tokenizer/, BUNDLE/metadata.json ("variants": family -> file, sha256, session settings, targets)

Each variant comes from a run of its own (`edge-compress package RUN --variant RUN2 ...`): its family is the
run's int8 preset, and at least one target of that family must have passed the run's validation gate (a
target's family is read from the CPU features its validation recorded). The runs must be the same model:
task, inputs, labels, tokenizer and length. The server picks the variant of the CPU it runs on and refuses
a family no run was validated on (compress/serving/bundle_check.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.report import read_report
from compress.serving.bundle import describe, write_files
from compress.serving.bundle_check import VARIANT_FILES, VERSION, family_of

# What two runs must share to be variants of one model.
SAME = ("task", "inputs", "outputs", "input_kind", "labels", "max_length", "tokenizer", "custom_ops")
# The recipe target that validates each family, for the error that asks for one.
TARGET_FOR = {"x86_64-vnni": "x86_64 (on a VNNI CPU)", "x86_64-avx2": "x86_64-avx2", "aarch64": "aarch64"}


def write_variant_bundle(runs: list[Path], out: Path) -> dict[str, Any]:
    """Write one bundle holding the int8 model of every run, as the variant of its CPU family."""
    runs = [run.resolve() for run in runs]
    first: dict[str, Any] | None = None
    tokenizer: dict[str, Path] = {}
    variants: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    for run in runs:
        meta, files = describe(run)
        if first is None:
            first = meta
            tokenizer = {name: path for name, path in files.items() if name.startswith("tokenizer/")}
        _same_model(first, meta, run, files, tokenizer)
        family = _family(run, meta)
        if family in variants:
            raise UserError(
                f"{run}: a second {family} variant (from {variants[family]['run']}); give one run per family"
            )
        variants[family] = {
            "file": VARIANT_FILES[family],
            "sha256": meta["model_sha256"],
            "session": meta["session"],
            "int8_types": meta["int8_types"],
            "batch_invariant": meta["batch_invariant"],
            "model_bytes": meta["model_bytes"],
            "validated_on": _validated_on(run, family),
            "targets": meta["targets"],
            "run": run.name,
        }
        sources[VARIANT_FILES[family]] = files["model.onnx"]
    assert first is not None  # the CLI passes at least the main run
    meta = {**first, "version": VERSION, "variants": variants, "preset": None, "session": {}}
    write_files(runs, out.resolve(), {**sources, **tokenizer}, meta)
    return meta


def _family(run: Path, meta: dict[str, Any]) -> str:
    if meta["precision"] != "int8":
        raise UserError(f"{run}: a CPU-family variant is an int8 model; this run's model is {meta['precision']}")
    family = meta.get("preset")
    if family not in VARIANT_FILES:
        raise UserError(f"{run}: its int8 preset {family!r} is not a CPU family ({', '.join(VARIANT_FILES)})")
    return str(family)


def _same_model(
    first: dict[str, Any], meta: dict[str, Any], run: Path, files: dict[str, Path], tokenizer: dict[str, Path]
) -> None:
    from compress.serving.bundle_check import sha256_of

    for key in SAME:
        if meta.get(key) != first.get(key):
            raise UserError(f"{run}: its {key} differs from the first run's; variants must be one model")
    mine = {name: sha256_of(path) for name, path in files.items() if name.startswith("tokenizer/")}
    if mine != {name: sha256_of(path) for name, path in tokenizer.items()}:
        raise UserError(f"{run}: its tokenizer files differ from the first run's; variants must be one model")


def _validated_on(run: Path, family: str) -> list[str]:
    """The run's targets of `family` whose gate passed; an error naming what was validated when none did."""
    seen = []
    for name, target in (read_report(run).get("targets") or {}).items():
        setup = target.get("setup") or {}
        of = family_of(str(setup.get("arch", "")), list(setup.get("cpu_features") or []))
        passed = (target.get("gate") or {}).get("passed", False)
        seen.append((name, of, passed))
    ok = [name for name, of, passed in seen if of == family and passed]
    if not ok:
        found = ", ".join(f"{n} ({of}{'' if p else ', gate failed'})" for n, of, p in seen) or "no target"
        raise UserError(
            f"{run}: its int8 preset is {family} but no {family} target passed its validation (validated on "
            f"{found}); add target {TARGET_FOR[family]} to the recipe and run it again"
        )
    return ok
