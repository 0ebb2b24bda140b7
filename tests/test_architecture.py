"""The house rules, read from the code itself (an AST walk: nothing is imported, nothing runs).

- No import circles among the modules of compress/ and exporters/, counting imports inside functions
  (those may only defer heavy libraries, never hide a circle). Imports under `if TYPE_CHECKING:` do not
  run and are not counted.
- The layers (docs/ARCHITECTURE.md): each package imports only the packages listed for it in ALLOWED.
- No stage imports another stage; no module imports a private name (`_x`) from another module.
- Files under 500 lines, functions under 80 lines (onnxscript op bodies excepted), no utils/helpers/common.

`python tests/test_architecture.py` prints the figures (modules, edges, function-level edges, circles).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "exporters")

# Who may import whom, by room: a module's room is the first of these prefixes that its name starts with.
# Rooms not listed import nothing of ours. "cli" imports everything; nothing imports "cli".
BASE = ("compress.errors", "compress.logs", "compress.strict")
ALLOWED: dict[str, tuple[str, ...]] = {
    "compress.cli": ("compress", "exporters"),
    "compress.api": (
        "compress.artifact",
        "compress.context",
        "compress.pipeline",
        "compress.recipe",
        "compress.report",
        "compress.serving.bundle_check",
        "compress.serving.server",
        "compress.stages",
        *BASE,
    ),
    "compress.pipeline": (
        "compress.artifact",
        "compress.context",
        "compress.data",
        "compress.distributed",
        "compress.models",
        "compress.recipe",
        "compress.report",
        "compress.serving.bundle_check",
        "compress.stages",
        "compress.targets",
        "compress.tasks",
        *BASE,
    ),
    "compress.sweep": (
        "compress.artifact",
        "compress.context",
        "compress.data",
        "compress.distributed",
        "compress.models",
        "compress.pipeline",
        "compress.recipe",
        "compress.report",
        "compress.runtime",
        "compress.tasks",
        *BASE,
    ),
    "compress.recipe": ("compress.data", "compress.models.spec", "compress.stages", "compress.targets", *BASE),
    "compress.stages": (
        "compress.artifact",
        "compress.context",
        "compress.data",
        "compress.distributed",
        "compress.models",
        "compress.runtime",
        "compress.serving.bundle_check",
        "compress.targets",
        "compress.tasks",
        "compress.training",
        "exporters",
        *BASE,
    ),
    "compress.training": (
        "compress.artifact",
        "compress.context",
        "compress.data",
        "compress.distributed",
        "compress.models",
        "compress.tasks",
        *BASE,
    ),
    "compress.report": (
        "compress.artifact",
        "compress.data",
        "compress.serving.bundle_check",
        "compress.targets",
        "exporters.native",
        *BASE,
    ),
    "compress.context": ("compress.artifact", "compress.data", "compress.distributed", "compress.targets", *BASE),
    "compress.tasks": ("compress.data", "compress.models", *BASE),
    "compress.runtime": (
        "compress.artifact",
        "compress.context",
        "compress.data",
        "compress.models",
        "compress.tasks",
        "exporters.native",  # sessions register our attention ops' kernels
        *BASE,
    ),
    "compress.targets": ("compress.container", "compress.runtime", "exporters.native", *BASE),
    "compress.container": ("compress.data", "exporters.native", *BASE),
    "compress.serving": ("compress.artifact", "compress.data", "compress.pipeline.run_dir", "compress.report", *BASE),
    "compress.models": ("compress.data.cache", *BASE),
    "compress.data": ("compress.models", *BASE),
    "compress.artifact": (),
    "compress.distributed": (),
    "compress.strict": (),
    "compress.logs": (),
    "compress.errors": (),
    "compress": ("compress.errors", "compress.api", "compress.pipeline", "compress.recipe"),
    # exporters reach compress only through a small surface: errors, the cache folder, the models' reference code
    "exporters": ("exporters", "compress.errors", "compress.data.cache", "compress.models"),
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool
    names: tuple[str, ...]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(n) for child in node.body for n in ast.walk(child))
    return inside


def _targets(
    node: ast.Import | ast.ImportFrom, name: str, path: Path, known: dict[str, Path]
) -> Iterator[tuple[str, str]]:
    """(module imported, name taken from it) for one import statement; only modules of ours."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield _known(alias.name, known), ""
        return
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([node.module] if node.module else [])])
    for alias in node.names:
        full = f"{base}.{alias.name}"
        yield (full, "") if full in known else (_known(base, known), alias.name)


def _known(name: str, known: dict[str, Path]) -> str:
    while name and name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in known else ""


def edges() -> list[Edge]:
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped, inside = _type_checking_nodes(tree), _function_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skipped:
                continue
            for target, imported in _targets(node, name, path, known):
                if target and target != name:
                    found.append(Edge(name, target, node.lineno, id(node) in inside, (imported,) if imported else ()))
    return found


def circles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in found:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    result: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def room(name: str) -> str:
    return max((r for r in ALLOWED if name == r or name.startswith(r + ".")), key=len, default="")


def forbidden(found: list[Edge]) -> list[str]:
    bad = []
    for edge in found:
        allowed = ALLOWED.get(room(edge.source))
        if allowed is None:
            bad.append(f"{edge.source} is in no room of ALLOWED")
            continue
        own = room(edge.source)
        if edge.target == own or (edge.target.startswith(own + ".") and own != "compress"):
            continue
        if not any(edge.target == a or edge.target.startswith(a + ".") for a in allowed):
            bad.append(f"{edge.source}:{edge.line} -> {edge.target}")
    return sorted(set(bad))


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["compress", "stages"] else None


def test_no_import_circles_counting_function_level_imports() -> None:
    assert circles(edges()) == []


def test_layers_hold() -> None:
    assert forbidden(edges()) == []


def test_no_stage_imports_another_stage() -> None:
    crossing = [
        f"{e.source}:{e.line} -> {e.target}"
        for e in edges()
        if stage_of(e.source) and stage_of(e.target) and stage_of(e.source) != stage_of(e.target)
    ]
    assert crossing == []


def test_no_private_name_crosses_a_module() -> None:
    private = [
        f"{e.source}:{e.line} takes {n} from {e.target}"
        for e in edges()
        for n in e.names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert private == []


def test_files_and_functions_stay_small() -> None:
    long_files, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 500:
            long_files.append(f"{name}: {len(text.splitlines())} lines")
        onnxscript_bodies = path.parent.name == "ops" and path.parent.parent.name == "exporters"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not onnxscript_bodies:
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_files == [] and long_functions == []


def test_no_module_named_for_nothing() -> None:
    vague = [n for n in modules() if n.rsplit(".", 1)[-1] in ("utils", "helpers", "common", "misc")]
    assert vague == []


def test_import_compress_and_help_stay_cheap() -> None:
    import subprocess

    code = (
        "import sys, compress, compress.cli\n"
        "from click.testing import CliRunner\n"
        "assert CliRunner().invoke(compress.cli.cli, ['--help']).exit_code == 0\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'onnx') if m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert proc.stdout.strip() == ""


def test_a_recipe_loads_without_torch_and_every_stage_resolves_its_run() -> None:
    """The stage configs load with the recipe, the stages' code when a run reaches them: a bad recipe's error
    (and `edge-compress check` up to the model) does not wait for torch, ONNX Runtime or the exporters."""
    import subprocess

    code = (
        "import sys\n"
        "from compress.recipe import recipe_schema\n"
        "from compress.stages import STAGES\n"
        "recipe_schema()\n"
        "heavy = ('torch', 'onnxruntime', 'transformers', 'onnx', 'onnxscript')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
        "print(all(callable(kind.run) for kind in STAGES.values()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert proc.stdout.split() == ["True"]


if __name__ == "__main__":
    found = edges()
    loose = [p for p in (ROOT / "compress").glob("*.py") if p.name != "__init__.py"]
    print(f"modules {len(modules())}, loose top-level modules of compress/ {len(loose)}")
    print(f"internal import edges {len(found)}, inside functions {sum(e.in_function for e in found)}")
    print(f"circles {len(circles(found))}: " + "; ".join(" <-> ".join(c) for c in circles(found)))
    crossing = {
        (e.source, e.target)
        for e in found
        if stage_of(e.source) and stage_of(e.target) and stage_of(e.source) != stage_of(e.target)
    }
    print(f"cross-stage imports {len(crossing)}; forbidden edges {len(forbidden(found))}")
    for line in forbidden(found)[: int(sys.argv[1]) if len(sys.argv) > 1 else 0]:
        print("  ", line)
