"""Read a recipe's YAML strictly and within bounds, before pydantic sees it.

A recipe is a small hand-written file, so anything that only an attack or an accident produces is refused
with one line: a file over MAX_BYTES, nesting deeper than MAX_DEPTH, an alias "bomb" (a few anchors that
expand to millions of nodes: PyYAML shares them in memory, but validating and echoing them walks every
copy), a key written twice in one mapping (YAML's spec forbids it; PyYAML would keep the last silently,
so a duplicated `stages:` turned a recipe into export-only), and more than one document.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1 << 20  # 1 MiB: the largest shipped recipe is under 4 KB
MAX_DEPTH = 64  # mapping/sequence levels; a recipe uses at most 6
MAX_EXPANDED = 100_000  # nodes after expanding every alias; a recipe has a few hundred
MAX_ECHO = 120  # characters of a user's value quoted back in an error


class RecipeYamlError(Exception):
    """What is wrong, and the 1-based line it is on (None when no line applies)."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and duplicate keys while it composes the node tree."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeYamlError(mark.line + 1, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    raise RecipeYamlError(key_node.start_mark.line + 1, "a mapping key must be a plain value") from None
                if duplicate:
                    raise RecipeYamlError(key_node.start_mark.line + 1, f"key {echo(key)} is written twice")
        return super().construct_mapping(node, deep=deep)


def parse(text: str) -> tuple[Any, Any]:
    """(node tree, Python data) of one YAML document, checked against the bounds above."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise RecipeYamlError(None, f"the file is over {MAX_BYTES // 1024} KB; a recipe is a short YAML file")
    try:
        loader = _BoundedLoader(text)  # its reader refuses NUL and other characters YAML forbids, here
    except yaml.YAMLError as exc:
        raise RecipeYamlError(None, f"YAML syntax error: {str(exc).splitlines()[0]}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node)
        return node, loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeYamlError(mark.line + 1 if mark is not None else None, f"YAML syntax error: {problem}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # an explicit tag on a value it cannot hold: !!int x
        raise RecipeYamlError(None, f"a tagged value cannot be read ({echo(str(exc))[1:-1]})") from None
    except RecursionError:  # a construct path deeper than our own count (should not happen after MAX_DEPTH)
        raise RecipeYamlError(None, f"nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def _check_expansion(root: Any) -> None:
    """Count the nodes of the tree with every alias expanded, stopping as soon as the count is too high."""
    sizes: dict[int, int] = {}  # id(node) -> expanded size, so a shared node is measured once

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a cycle (an alias inside its own anchor) counts once rather than looping
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED:
                line = node.start_mark.line + 1
                raise RecipeYamlError(line, f"anchors and aliases expand to over {MAX_EXPANDED} values")
        sizes[key] = total
        return total

    size(root)


def echo(value: Any) -> str:
    """A user's value quoted back safely: printable (lone surrogates escaped) and at most MAX_ECHO chars."""
    text = repr(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 5] + " ...'"
