"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "compress.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_every_command() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("run", "check", "schema", "report"):
        assert command in proc.stdout


def test_schema_is_json_schema() -> None:
    proc = cli("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["title"] == "edge-compress recipe" and "stages" in schema["properties"]


def test_check_accepts_a_good_recipe(recipe_for: Callable[..., Path]) -> None:
    proc = cli("check", str(recipe_for()))
    assert proc.returncode == 0, proc.stderr
    assert "ok (tiny: export -> quantize -> validate" in proc.stdout


def test_missing_recipe(tmp_path: Path) -> None:
    assert_user_error(cli("run", str(tmp_path / "nope.yaml")), "recipe not found")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {hf: [\n")
    assert_user_error(cli("check", str(path)), f"{path}:", "YAML syntax error")


def test_unknown_field(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for()
    text = path.read_text().replace("task: embedding", "task: embedding\ncolour: blue")
    path.write_text(text)
    assert_user_error(cli("run", str(path)), "colour: unknown field; allowed:", "stages")


def test_unknown_stage_type(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(stages=[{"type": "export"}, {"type": "sparsify"}])
    assert_user_error(cli("run", str(path)), "stages[1]", "sparsify")


def test_wrong_value_type(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(stages=[{"type": "export", "tolerance": "tight"}])
    assert_user_error(cli("run", str(path)), "stages[0].tolerance", "'tight'")


def test_model_folder_that_does_not_exist(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    path = recipe_for(model={"hf": str(tmp_path / "no-model")})
    assert_user_error(cli("run", str(path)), "model.hf", "is not a folder")


def test_model_folder_without_weights(recipe_for: Callable[..., Path], tmp_path: Path, tiny_bert: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer.json"):
        (folder / name).write_bytes((tiny_bert / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"pickles are never loaded")
    path = recipe_for(model={"hf": str(folder)})
    assert_user_error(cli("check", str(path)), "holds no model.safetensors", "pytorch_model.bin")


def test_package_model_not_installed(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(model={"package": "no_such_model_package"})
    assert_user_error(cli("run", str(path)), "model.package", "pip install no-such-model-package")


def test_unreadable_data_file_fails_before_any_work(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    """A bad data line fails the run with file:line before any stage runs; nothing is written."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    path = recipe_for()
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["calibration"] = {"path": str(bad)}
    recipe["stages"] = [{"type": "export"}, {"type": "quantize", "mode": "static", "calibration": "minmax"}]
    path.write_text(yaml.safe_dump(recipe))
    work = tmp_path / "cwd"
    work.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("run", str(path), cwd=work)
    assert_user_error(proc, f"{bad}:2: not valid JSON")
    assert list(work.iterdir()) == []  # nothing written in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory either


def test_report_of_a_folder_without_report(tmp_path: Path) -> None:
    assert_user_error(cli("report", str(tmp_path)), "no report.json")


@pytest.mark.parametrize("args", [("run",), ("frobnicate",)])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    proc = cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
