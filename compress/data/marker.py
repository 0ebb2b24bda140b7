"""The marker file that says which tokenizer an artifact saved (bytes, or WordPiece beside its vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

from compress.data.cache import write_atomic

MARKER = "edge_tokenizer.json"


def mark(folder: Path, kind: str) -> None:
    write_atomic(folder / MARKER, (json.dumps({"kind": kind}) + "\n").encode())
