"""Quantization: streaming calibration, target presets, the accuracy-aware search (and its recipe wiring)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from compress.context import Context
from compress.errors import StageFailed
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.runtime import presets
from compress.stages.quantize import calibration
from compress.stages.quantize import search as quantize_search
from compress.stages.quantize.config import QuantizeGoal
from tests.conftest import two_matmuls


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


# ------------------------------------------------------------------------------------ calibration
def _batches(n: int, seed: int = 1, outlier: bool = True) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = [{"x": rng.normal(size=(64, 8)).astype(np.float32)} for _ in range(n)]
    if outlier:  # one batch with an outlier, mid-way: a calibrator that only keeps its last chunk misses it
        out[n // 2]["x"][0, 0] = 40.0
    return out


def _ranges(cache: Path) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization import load_tensors_data

    data = load_tensors_data(cache).data
    return {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1]))) for k, v in data.items()}


def test_chunked_minmax_calibration_equals_one_pass(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    two_matmuls(model)
    batches = _batches(9)
    one = calibration.calibrate(
        model, batches, method="minmax", op_types=["MatMul"], chunk_batches=100, work_dir=tmp_path / "a"
    )
    chunked = calibration.calibrate(
        model, iter(batches), method="minmax", op_types=["MatMul"], chunk_batches=2, work_dir=tmp_path / "b"
    )
    assert (one.chunks, chunked.chunks) == (1, 5)
    assert chunked.batches == 9 and chunked.sequences == 9 * 64
    assert _ranges(one.cache) == _ranges(chunked.cache)
    assert _ranges(chunked.cache)["x"][1] == pytest.approx(40.0)  # the outlier of chunk 3 counted


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_chunked_histogram_calibration_sees_every_chunk(tmp_path: Path, method: str) -> None:
    model = tmp_path / "m.onnx"
    two_matmuls(model)
    batches = _batches(8, outlier=False)
    for b in batches[1:]:  # later batches are wider: ranges from the first chunk alone would be too narrow
        b["x"] *= 4.0

    def top(chunk: int, data: list[dict[str, np.ndarray]], name: str) -> float:
        result = calibration.calibrate(
            model, data, method=method, op_types=["MatMul"], chunk_batches=chunk, work_dir=tmp_path / name
        )
        return _ranges(result.cache)["x"][1]

    first_only, one_pass, chunked = top(1, batches[:1], "first"), top(8, batches, "one"), top(1, batches, "chunked")
    assert chunked > 2.5 * first_only  # chunks 2..8 were merged, not dropped
    if method == "percentile":  # the same percentile of the same values, up to binning
        assert chunked == pytest.approx(one_pass, rel=0.1)


def test_calibration_without_batches_is_an_error(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    two_matmuls(model)
    with pytest.raises(ValueError, match="no calibration batch"):
        calibration.calibrate(model, [], method="minmax", op_types=None, chunk_batches=2, work_dir=tmp_path)


# ------------------------------------------------------------------------------------------ presets
def test_presets_map_to_the_documented_settings() -> None:
    assert presets.PRESETS["x86_64-vnni"].settings() == {
        "activation_type": "uint8",
        "weight_type": "int8",
        "reduce_range": False,
    }
    assert presets.PRESETS["x86_64-avx2"].settings()["reduce_range"] is True  # no u8s8 saturation without VNNI
    assert presets.PRESETS["aarch64"].settings() == {
        "activation_type": "uint8",
        "weight_type": "int8",
        "reduce_range": False,
    }


def _cpu(name: str, arch: str = "x86_64", vnni: bool | None = True) -> SimpleNamespace:
    return SimpleNamespace(name=name, arch=arch, vnni=vnni)


def test_auto_preset_follows_targets_and_cpu() -> None:
    from compress import targets

    assert presets.choose("auto", [_cpu("x86_64")])[0].name == "x86_64-vnni"
    assert presets.choose("auto", [_cpu("x86_64", vnni=False)])[0].name == "x86_64-avx2"
    arm = [_cpu("aarch64", "aarch64", None), _cpu("aarch64-neon", "aarch64", None)]
    assert presets.choose("auto", arm)[0].name == "aarch64"
    # one artifact for every target: the weakest one decides
    assert presets.choose("auto", [_cpu("x86_64"), _cpu("x86_64-avx2", vnni=False)])[0].name == "x86_64-avx2"
    preset, why = presets.choose("aarch64", [_cpu("x86_64")])
    assert preset.name == "aarch64" and "recipe" in why
    # the named targets say their features once; the choice reads them, not their names
    assert presets.choose("auto", [targets.get("x86_64-avx2")])[0].name == "x86_64-avx2"
    assert presets.choose("auto", [targets.get("aarch64")])[0].name == "aarch64"


def test_vnni_flag_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert presets.host_has_vnni(info)
    info.write_text("processor: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not presets.host_has_vnni(info)


# ----------------------------------------------------------------------------- accuracy-aware search
PENALTY = {"a": 0.001, "b": 0.03, "c": 0.0005, "d": 0.01}
RANKED = ("b", "d", "a", "c")  # most sensitive first


def _fake_pipeline(tmp_path: Path) -> tuple[Callable[[list[str], Path], None], Callable[[Path], float], Path]:
    """A quantizer whose 'model' is the list of nodes kept in float; the metric loses each int8 node's penalty."""
    fp32 = tmp_path / "fp32.json"
    fp32.write_text(json.dumps(sorted(PENALTY)))

    def quantize(in_float: list[str], out: Path) -> None:
        out.write_text(json.dumps(in_float))

    def evaluate(model: Path) -> float:
        kept = set(json.loads(model.read_text()))
        return 0.9 - sum(p for n, p in PENALTY.items() if n not in kept)

    return quantize, evaluate, fp32


def _search(
    tmp_path: Path, goal: QuantizeGoal, budget: float = 60.0, candidates: tuple[str, ...] = RANKED
) -> quantize_search.SearchResult:
    quantize, evaluate, fp32 = _fake_pipeline(tmp_path)
    fp32_metric = evaluate(fp32)
    return quantize_search.search(
        ranking=list(candidates),  # ranked by the one-pass sensitivity (tests/test_quantize_sensitivity.py)
        scores=[PENALTY[c] ** 0.5 for c in candidates],
        fixed_float=[],
        quantize=quantize,
        evaluate=evaluate,
        target=quantize_search.Target(
            "accuracy", fp32_metric, quantize_search.allowed_drop(goal, fp32_metric), "quantize.goal"
        ),
        budget_s=budget,
        work_dir=tmp_path,
        out=tmp_path / "out.json",
        log=lambda _: None,
    )


def test_search_keeps_most_sensitive_nodes_in_float_until_goal(tmp_path: Path) -> None:
    result = _search(tmp_path, QuantizeGoal(max_drop=0.002))
    assert result.ranking == ["b", "d", "a", "c"]
    chosen = result.trials[result.chosen]
    assert chosen.in_float == ["b", "d"] and chosen.met  # drop 0.0015 <= 0.002; top-1 alone was not enough
    assert [t.phase for t in result.trials] == ["full", "predicted", "shrink"]  # predicted 2, confirmed by 1
    assert json.loads((tmp_path / "out.json").read_text()) == ["b", "d"]
    saved = json.loads((tmp_path / "search.json").read_text())
    assert len(saved["trials"]) == len(result.trials) and saved["chosen"] == result.chosen


def test_search_stops_at_once_when_full_int8_meets_the_goal(tmp_path: Path) -> None:
    result = _search(tmp_path, QuantizeGoal(max_drop=0.05))
    assert len(result.trials) == 1 and result.trials[0].in_float == [] and result.stopped_by == "target met"


def test_relative_goal_scales_with_the_fp32_metric(tmp_path: Path) -> None:
    result = _search(tmp_path, QuantizeGoal(max_drop=0.02, relative=True))  # 2% of 0.9 = 0.018
    assert result.allowed_drop == pytest.approx(0.018)
    assert result.trials[result.chosen].in_float == ["b"]  # drop 0.0115


def test_unreachable_goal_fails_and_keeps_the_trials(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match="goal not met"):  # b and d are not candidates: they stay int8
        _search(tmp_path, QuantizeGoal(max_drop=0.01), candidates=("a", "c"))
    saved = json.loads((tmp_path / "search.json").read_text())
    assert [t["phase"] for t in saved["trials"]] == ["full", "predicted"]  # predicted: both, still short
    assert saved["trials"][saved["chosen"]]["in_float"] == ["a", "c"]  # the best it found is recorded


def test_budget_smaller_than_a_trial_stops_after_all_int8(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match="time budget"):
        _search(tmp_path, QuantizeGoal(max_drop=0.002), budget=1e-9)
    assert len(json.loads((tmp_path / "search.json").read_text())["trials"]) == 1


# --------------------------------------------------------------------------------------- the stage
def test_accuracy_aware_stage_records_its_trials(recipe_for: Callable[..., Path]) -> None:
    quantize = {"type": "quantize", "mode": "static", "goal": {"max_drop": 0.5, "samples": 8}}
    run_dir = _run(recipe_for(stages=[{"type": "export"}, quantize]))
    metrics = json.loads((run_dir / "02_quantize" / "metrics.json").read_text())
    search = metrics["accuracy_aware"]
    assert search["metric_name"] == "cosine to fp32" and search["fp32"] == pytest.approx(1.0, abs=1e-6)
    assert search["chosen"] == 0 and search["trials"][0]["met"]
    assert metrics["kernels"]["int8_total"] > 0
    assert metrics["calibration"]["sequences"] == 12 and metrics["calibration"]["chunks"] == 1


def test_stage_searches_when_full_int8_misses_the_goal(recipe_for: Callable[..., Path]) -> None:
    # Keep the goal just tighter than what all-int8 reaches: at least one node must go back to float.
    probe = {"type": "quantize", "mode": "static", "goal": {"max_drop": 1.0, "samples": 8}}
    first = _run(recipe_for(name="probe", stages=[{"type": "export"}, probe]))
    full_drop = json.loads((first / "02_quantize" / "metrics.json").read_text())["accuracy_aware"]["trials"][0]["drop"]
    assert full_drop > 0
    goal = {"type": "quantize", "mode": "static", "goal": {"max_drop": full_drop * 0.999, "samples": 8}}
    run_dir = _run(recipe_for(name="tight", stages=[{"type": "export"}, goal]))
    search = json.loads((run_dir / "02_quantize" / "metrics.json").read_text())["accuracy_aware"]
    chosen = search["trials"][search["chosen"]]
    assert chosen["met"] and chosen["in_float"] and chosen["drop"] <= full_drop * 0.999
    assert search["ranking"] and search["trials"][1]["phase"] == "predicted"


def test_preset_decides_types_and_is_recorded(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "mode": "static", "preset": "x86_64-avx2"}]
    run_dir = _run(recipe_for(stages=stages))
    metrics = json.loads((run_dir / "02_quantize" / "metrics.json").read_text())
    assert metrics["preset"]["name"] == "x86_64-avx2" and metrics["reduce_range"] is True
    assert metrics["activation_type"] == "uint8" and metrics["preset"]["overrides"] == []


def test_auto_preset_uses_this_cpu(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "mode": "dynamic", "reduce_range": True}]
    run_dir = _run(recipe_for(stages=stages))
    metrics = json.loads((run_dir / "02_quantize" / "metrics.json").read_text())
    from compress import targets

    expected = presets.choose("auto", [targets.get("x86_64")])[0]
    assert metrics["preset"]["name"] == expected.name and metrics["reduce_range"] is True
    assert bool(metrics["preset"]["overrides"]) == (not expected.reduce_range)


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        ({"mode": "static", "goal": {"max_drop": -0.1}}, "max_drop"),
        ({"mode": "static", "goal": {"samples": 8}}, "give one of max_drop (the task metric's drop) and min_agreement"),
        ({"mode": "static", "goal": {"max_drop": 0.01, "min_agreement": 0.99}}, "give one of max_drop"),
        ({"mode": "static", "goal": {"min_agreement": 0.99, "relative": True}}, "relative applies to max_drop"),
        ({"mode": "static", "goal": {"min_agreement": 1.5}}, "min_agreement"),
        ({"mode": "static", "preset": "riscv"}, "preset"),
        ({"mode": "static", "time_budget": 0}, "time_budget"),
        ({"mode": "dynamic", "activation_type": "int8"}, "activation_type applies to mode: static only"),
        ({"mode": "static", "calibration_chunk": 0}, "calibration_chunk"),
    ],
)
def test_bad_quantize_settings_exit_2(recipe_for: Callable[..., Path], quantize: dict, message: str) -> None:
    path = recipe_for(stages=[{"type": "export"}, {"type": "quantize", **quantize}])
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_time_budget_exits_2_before_any_trial(recipe_for: Callable[..., Path]) -> None:
    quantize = {"type": "quantize", "mode": "static", "goal": {"max_drop": 0.01}, "time_budget": 0.0001}
    path = recipe_for(stages=[{"type": "export"}, quantize])
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "run", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert "too small to run one trial" in proc.stderr and "Traceback" not in proc.stderr


def test_auto_preset_for_a_docker_target_follows_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """An amd64 image runs on this CPU: auto picks VNNI only where this CPU has it."""
    from compress.targets import docker

    for vnni, expected in ((True, "x86_64-vnni"), (False, "x86_64-avx2")):
        monkeypatch.setattr(docker, "host_has_vnni", lambda v=vnni: v)
        assert presets.choose("auto", [docker.DockerTarget("some/image:tag")])[0].name == expected


def test_failed_shape_inference_writes_nothing_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime saves its half-inferred model (and a uuid-named data file) into the current directory
    when symbolic shape inference fails; the stage must keep that inside its own folder."""
    from compress.stages.quantize import stage as quantize

    model = tmp_path / "custom.onnx"
    graph = helper.make_graph(
        [
            helper.make_node("Mystery", ["x"], ["h"], name="m", domain="example.custom"),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    proto.ir_version = 8
    onnx.save(proto, str(model))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    warnings: list[str] = []
    ctx = SimpleNamespace(out_dir=tmp_path / "stage", warn=warnings.append)
    (tmp_path / "stage").mkdir()
    typed = quantize._with_shapes(model, ctx)  # type: ignore[arg-type]
    assert typed.is_file() and warnings and "symbolic shape inference failed" in warnings[0]
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in (tmp_path / "stage").iterdir()) == [typed.name]


def test_shape_inference_reads_a_model_given_by_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs live under a relative output dir (runs/...): the path must be resolved before the stage moves into
    its working folder, or inference fails and static int8 calibrates without tensor types."""
    from compress.stages.quantize import stage as quantize

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    monkeypatch.chdir(tmp_path)
    Path("runs/stage").mkdir(parents=True)
    onnx.save(proto, "runs/model.onnx")
    warnings: list[str] = []
    ctx = SimpleNamespace(out_dir=Path("runs/stage"), warn=warnings.append)
    typed = quantize._with_shapes(Path("runs/model.onnx"), ctx)  # type: ignore[arg-type]
    assert warnings == []
    assert "h" in {v.name for v in onnx.load(str(typed)).graph.value_info}  # the MatMul's output has its type
