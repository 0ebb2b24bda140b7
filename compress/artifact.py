"""What flows between stages: a model on disk (a Hugging Face folder or an ONNX file) and what is known of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ArtifactKind = Literal["hf", "zoo", "new", "onnx"]  # new: an untrained zoo architecture


@dataclass(frozen=True)
class Artifact:
    """A model on disk.

    files: role -> path ("model", "reference" for the fp32 ONNX it must stay faithful to, "tokenizer").
    meta: JSON-able facts stages hand on (graph inputs and outputs, precision, session settings).
    """

    kind: ArtifactKind
    files: dict[str, Path]
    meta: dict[str, Any] = field(default_factory=dict)

    def file(self, role: str) -> Path:
        return self.files[role]

    def to_json(self, run_dir: Path, source: Path | None = None) -> str:
        """Serialise with paths relative to the run directory, so a run folder can be moved whole.

        A path inside `source` (the recipe's input model folder) is written as SOURCE + its path inside it:
        artifact.json names no host path, and resolves again against the recipe's model.
        """
        files = {k: _relative(v, run_dir, source) for k, v in self.files.items()}
        return json.dumps({"kind": self.kind, "files": files, "meta": self.meta}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, run_dir: Path, source: Path | None = None) -> Artifact:
        raw = json.loads(text)
        files = {k: _absolute(v, run_dir, source) for k, v in raw["files"].items()}
        return cls(kind=raw["kind"], files=files, meta=raw["meta"])

    def usable_length(self, max_length: int) -> int:
        """The tokens per text a stage feeds this model: the recipe's data.max_length, within its positions."""
        positions = self.meta.get("max_positions")
        return usable_length(max_length, positions if isinstance(positions, int) else None)

    def moved(self, old: Path, new: Path) -> Artifact:
        """The same artifact after its stage folder `old` was renamed to `new`."""
        files = {k: (new / v.relative_to(old) if v.is_relative_to(old) else v) for k, v in self.files.items()}
        return Artifact(self.kind, files, self.meta)


def usable_length(max_length: int, *positions: int | None) -> int:
    """The one answer to "how many tokens per text": the recipe's data.max_length, within every model's
    positions (None: that model does not say)."""
    return min([max_length, *(p for p in positions if p is not None)])


SOURCE = "source:"  # prefix of a path inside the recipe's input model folder


def _relative(path: Path, root: Path, source: Path | None) -> str:
    path, root = path.resolve(), root.resolve()
    if path.is_relative_to(root):
        return str(path.relative_to(root))
    if source is not None and path.is_relative_to(source.resolve()):
        inside = path.relative_to(source.resolve())
        return SOURCE + ("" if str(inside) == "." else str(inside))
    return str(path)


def _absolute(value: str, root: Path, source: Path | None) -> Path:
    if value.startswith(SOURCE):  # without the input folder (a bundle reads no such file) it stays unresolved
        if source is None:
            return Path(value)
        return source / value[len(SOURCE) :] if value != SOURCE else source
    return root / value if not Path(value).is_absolute() else Path(value)
