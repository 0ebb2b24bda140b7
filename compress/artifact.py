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

    def to_json(self, run_dir: Path) -> str:
        """Serialise with paths relative to the run directory, so a run folder can be moved whole."""
        files = {k: _relative(v, run_dir) for k, v in self.files.items()}
        return json.dumps({"kind": self.kind, "files": files, "meta": self.meta}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, run_dir: Path) -> Artifact:
        raw = json.loads(text)
        files = {k: (run_dir / v if not Path(v).is_absolute() else Path(v)) for k, v in raw["files"].items()}
        return cls(kind=raw["kind"], files=files, meta=raw["meta"])

    def moved(self, old: Path, new: Path) -> Artifact:
        """The same artifact after its stage folder `old` was renamed to `new`."""
        files = {k: (new / v.relative_to(old) if v.is_relative_to(old) else v) for k, v in self.files.items()}
        return Artifact(self.kind, files, self.meta)


def _relative(path: Path, root: Path) -> str:
    path, root = path.resolve(), root.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
