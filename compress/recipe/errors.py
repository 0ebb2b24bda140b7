"""Turn a pydantic validation error into one line a person can act on: file:line: field: what is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from compress.data.spec import FileSet, ReferenceSet
from compress.models.spec import MODEL_SPECS
from compress.recipe.reader import echo
from compress.stages import STAGE_CONFIGS, STAGE_ORDER

_UNION_FIELDS = ("model", "calibration", "evaluation", "train", "test")
_UNION_TAGS = ("hf", "package", "zoo", "architecture", "reference", "file")


def describe(err: Any, node: Any, root: type[BaseModel]) -> tuple[int, str, str]:
    """(line, dotted field, explanation) for the first pydantic error of validating `root`, located in the
    YAML node tree."""
    loc = tuple(err["loc"])
    return _line_of(node, loc), _dotted(loc), _explain(err, loc, root)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    previous: Any = None
    for part in loc:
        union_tag = (previous in _UNION_FIELDS and part in _UNION_TAGS) or (
            isinstance(previous, int) and part in STAGE_ORDER
        )
        previous = part
        if union_tag:
            continue  # pydantic puts the union member's tag in the location; the user never wrote it
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (part if isinstance(part, str) and len(part) <= 60 else echo(part))
    return out.encode("utf-8", "backslashreplace").decode("utf-8") or "(top level)"


def _line_of(node: Any, loc: tuple[Any, ...]) -> int:
    """Line of the deepest YAML node that `loc` reaches (1-based)."""
    import yaml

    best = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                continue  # a union tag, or a missing field: stay on the parent
            node = match[1]
            best = match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            best = node.start_mark.line + 1
    return best


def _explain(err: Any, loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1], root)
        return f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return (
            f"unknown stage type {err['ctx']['tag']}; allowed: {err['ctx']['expected_tags']}"
            if loc and loc[0] == "stages"
            else str(err["msg"])
        )
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{msg} (got {echo(err['input'])})" if kind not in ("value_error", "assertion_error") else msg


def _allowed_fields(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """Field names of the model that `loc` points into, walking unions by their tags."""
    tagged: dict[str, type[BaseModel]] = {**MODEL_SPECS, "reference": ReferenceSet, "file": FileSet, **STAGE_CONFIGS}
    current: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        if part in tagged and (current is None or part not in current.model_fields):
            current = tagged[part]
            continue
        if current is None or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(current.model_fields) if current is not None else []
