"""The Python API (compress/api.py): a recipe from a path, YAML text or a dict; a run's report as an object;
one stage on an existing artifact; and the README's example, executed."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import compress
from compress.artifact import Artifact
from compress.errors import UserError
from compress.recipe import QuantizeStage

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(recipe: object) -> str:
    with pytest.raises(UserError) as info:
        compress.load(recipe)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_path_text_and_dict_give_the_same_recipe(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for()
    text = path.read_text()
    from_path = compress.load(path)
    assert compress.load(str(path)) == from_path
    assert compress.load(text) == from_path
    assert compress.load(yaml.safe_load(text)) == from_path
    assert compress.load(from_path) is from_path
    assert compress.load_recipe(path) == from_path


def test_bad_yaml_text_is_one_line_naming_string_and_line() -> None:
    assert _one_line_error("name: x\nstages: [unclosed\n").startswith("<string>:")
    assert _one_line_error("- a list\n- not a mapping\n") == (
        "<string>:1: a recipe is a mapping with name, model, task, data, stages"
    )
    good = (REPO / "recipes" / "minilm-int8.yaml").read_text()
    bad = good.replace("mode: dynamic", "mode: fastest")
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "mode: fastest" in text)
    assert _one_line_error(bad).startswith(f"<string>:{line}: stages[1].mode: ")


def test_bad_dict_is_one_line_naming_the_field() -> None:
    spec = yaml.safe_load((REPO / "recipes" / "minilm-int8.yaml").read_text())
    spec["stages"][1]["mode"] = "fastest"
    assert _one_line_error(spec).startswith("<dict>: stages[1].mode: ")
    spec["stages"][1] = {"type": "quantize", "colour": "blue"}
    assert _one_line_error(spec).startswith("<dict>: stages[1].colour: unknown field; allowed: ")
    with pytest.raises(TypeError):
        compress.load(42)  # type: ignore[arg-type]


def test_a_missing_recipe_file_is_a_user_error(tmp_path: Path) -> None:
    assert _one_line_error(str(tmp_path / "nope.yaml")) == f"{tmp_path / 'nope.yaml'}: recipe not found"


def test_run_recipe_returns_the_report(recipe_for: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = compress.run_recipe(yaml.safe_load(recipe_for().read_text()))
    assert capsys.readouterr().err == ""  # quiet by default
    assert report.data == json.loads((report.run_dir / "report.json").read_text())
    assert report.name == "tiny" and report.task == "embedding"
    assert [s["type"] for s in report.stages] == ["export", "quantize", "validate"]
    assert list(report.targets) == ["x86_64"]
    assert report.targets["x86_64"]["speedup_p50"] == report.data["targets"]["x86_64"]["speedup_p50"]
    assert report.warnings == report.data["warnings"]
    assert report.passed
    assert report.artifact == report.run_dir / "02_quantize" / "model.onnx" and report.artifact.is_file()
    assert report.stage_artifact(1).file("model") == report.run_dir / "01_export" / "model.onnx"
    assert compress.Report.read(report.run_dir) == report
    with pytest.raises(UserError, match="no stage 'prune'"):
        report.stage_artifact("prune")


def test_run_stage_quantizes_an_export_artifact(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    path = recipe_for(stages=[{"type": "export"}])
    report = compress.run_recipe(path)
    assert report.artifact == report.run_dir / "01_export" / "model.onnx" and not report.targets
    export = Artifact.from_json((report.run_dir / "01_export" / "artifact.json").read_text(), report.run_dir)
    work = tmp_path / "work"
    artifact, metrics = compress.run_stage(
        QuantizeStage(type="quantize", mode="dynamic"), export, recipe=path, work_dir=work
    )
    assert artifact.file("model") == work / "quantize" / "model.onnx" and artifact.file("model").is_file()
    assert artifact.meta["precision"] == "int8"
    assert metrics["kernels"]["int8_total"] > 0 and metrics["kernels"]["int8"]
    assert {"seconds", "warnings"} <= set(metrics)
    assert sorted(p.name for p in (work / "quantize").iterdir()) == [
        "artifact.json",
        "metrics.json",
        "model.onnx",
        "session.json",
        "tokenizer",
    ]
    again = Artifact.from_json((work / "quantize" / "artifact.json").read_text(), work / "quantize")
    assert again.file("model") == artifact.file("model")
    assert json.loads((work / "quantize" / "metrics.json").read_text()) == metrics


def test_run_stage_refuses_a_non_empty_folder(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    mine = tmp_path / "work" / "quantize" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    export = Artifact("onnx", {"model": tmp_path / "model.onnx"})
    with pytest.raises(UserError, match="not empty"):
        compress.run_stage(QuantizeStage(type="quantize"), export, recipe=recipe_for(), work_dir=tmp_path / "work")
    assert mine.read_text() == "keep me"


def test_a_failed_stage_leaves_its_folder_as_it_was(recipe_for: Callable[..., Path], tmp_path: Path) -> None:
    not_onnx = Artifact("hf", {"model": tmp_path})
    with pytest.raises(UserError, match="quantize works on ONNX"):
        compress.run_stage(QuantizeStage(type="quantize"), not_onnx, recipe=recipe_for(), work_dir=tmp_path / "w")
    assert not (tmp_path / "w" / "quantize").exists()
    with pytest.raises(TypeError):
        compress.run_stage({"type": "quantize"}, not_onnx, recipe=recipe_for(), work_dir=tmp_path / "w")  # type: ignore[arg-type]


def _readme_example() -> str:
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's Python API section holds one python example"
    return blocks[0]


def test_readme_example_is_short_and_uses_the_api() -> None:
    code = _readme_example()
    compile(code, "README.md", "exec")
    assert len(code.splitlines()) < 25
    for name in ("compress.load", "compress.run_recipe", "compress.run_stage", "QuantizeStage"):
        assert name in code


@pytest.mark.integration
def test_readme_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example as a user runs it from the repository root: here a copy of that root's recipes/ folder,
    so its relative paths (the recipe, runs/python-api) land in tmp_path."""
    (tmp_path / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "minilm-int8.yaml", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exec(compile(_readme_example(), "README.md", "exec"), {"__name__": "__readme__"})
    run_dir = tmp_path / "runs" / "python-api" / "minilm-int8"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stages"][-1]["metrics"]["targets"]["x86_64"]["setup"]["runs"] == 10
    _the_shipped_recipe_holds(report)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("True runs/python-api/minilm-int8/02_quantize/model.onnx ")
    assert printed[1].endswith("int8 kernels") and int(printed[1].split()[-3]) > 0
    assert list(tmp_path.glob("tmp*/quantize/model.onnx"))


def _the_shipped_recipe_holds(report: dict[str, Any]) -> None:
    """recipes/minilm-int8.yaml, run by the example: int8 kernels run, accuracy holds, the artifact is small.
    (Speed: benchmarks/.)"""
    export = report["stages"][0]["metrics"]
    assert export["max_abs_diff"] <= 1e-4
    assert export["fused_ops"]["Attention"] == 6
    target = report["targets"]["x86_64"]
    ref, art = target["reference"], target["artifact"]
    assert ref["task"]["spearman"] == pytest.approx(0.508, abs=0.005)  # fp32 MiniLM on Lee
    assert abs(art["task"]["spearman"] - ref["task"]["spearman"]) <= 0.01
    assert target["fidelity"]["cosine_mean"] >= 0.99
    assert target["size_ratio"] <= 0.30
    assert art["kernels"]["int8"].get("QAttention") == 6
    assert art["kernels"]["float_total"] == 0
    assert report["warnings"] == []
