"""The whole flow on a tiny random-init BERT: run directory, resume, recompute on change, int8 checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from rich.console import Console

from compress.context import Context
from compress.errors import StageFailed
from compress.pipeline import run
from compress.pipeline.run_dir import claim
from compress.recipe import load_recipe


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    quiet = Console(quiet=True)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=quiet))


def _check(path: Path) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(path)], capture_output=True, text=True, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_end_to_end_writes_run_directory_and_report(recipe_for: Callable[..., Path]) -> None:
    run_dir = _run(recipe_for())
    for stage in ("01_export", "02_quantize", "03_validate"):
        assert (run_dir / stage / "done").is_file()
        assert (run_dir / stage / "metrics.json").is_file()
    assert (run_dir / "01_export" / "model.onnx").is_file()
    assert (run_dir / "02_quantize" / "model.onnx").is_file()
    assert "type: quantize" in (run_dir / "resolved_recipe.yaml").read_text()
    assert "per_channel: true" in (run_dir / "resolved_recipe.yaml").read_text()  # defaults filled in

    report = _report(run_dir)
    export, quant, _ = (s["metrics"] for s in report["stages"])
    assert export["max_abs_diff"] <= 1e-4
    assert quant["kernels"]["int8_total"] > 0
    assert quant["size_bytes"] < export["size_bytes"]
    target = report["targets"]["x86_64"]
    for role in ("artifact", "reference"):
        lat = target[role]["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert target[role]["latency_ms"]["runs"] == 10
        assert target[role]["size_bytes"] > 0
        assert target[role]["memory"]["peak_rss_bytes"] > 10_000_000
        assert -1 <= target[role]["task"]["spearman"] <= 1
        lo, hi = target[role]["task"]["spearman_ci95"]
        assert lo <= hi
    assert target["reference"]["kernels"]["int8_total"] == 0
    assert target["artifact"]["kernels"]["int8_total"] > 0
    assert 0.9 < target["fidelity"]["cosine_mean"] <= 1.0 + 1e-6
    md = (run_dir / "report.md").read_text()
    assert "| latency p50 ms" in md and "x faster" in md


def test_rerun_reuses_finished_stages(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for()
    run_dir = _run(path)
    stamp = (run_dir / "02_quantize" / "model.onnx").stat().st_mtime_ns
    report = _report(_run(path))
    assert [s["reused"] for s in report["stages"]] == [True, True, True]
    assert (run_dir / "02_quantize" / "model.onnx").stat().st_mtime_ns == stamp


def test_changed_stage_is_recomputed_with_everything_after_it(recipe_for: Callable[..., Path]) -> None:
    stages = [
        {"type": "export"},
        {"type": "quantize"},
        {"type": "validate", "runs": 10, "sequence_length": 16},
    ]
    _run(recipe_for(stages=stages))
    stages[1] = {"type": "quantize", "per_channel": False}
    report = _report(_run(recipe_for(stages=stages)))
    assert [s["reused"] for s in report["stages"]] == [True, False, False]
    assert report["stages"][1]["metrics"]["per_channel"] is False


def test_shorter_recipe_drops_stale_stage_folders(recipe_for: Callable[..., Path]) -> None:
    run_dir = _run(recipe_for())
    _run(recipe_for(stages=[{"type": "export"}]))
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["01_export"]


def test_static_qdq_has_qdq_pairs_and_int8_kernels(recipe_for: Callable[..., Path]) -> None:
    # tune.int8 false: the format stays QDQ (the tuning may pick QOperator when it is faster here).
    quantize = {"type": "quantize", "mode": "static", "calibration": "percentile", "tune": {"int8": False}}
    stages = [{"type": "export"}, quantize]
    run_dir = _run(recipe_for(stages=stages))
    graph = onnx.load(str(run_dir / "02_quantize" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    metrics = json.loads((run_dir / "02_quantize" / "metrics.json").read_text())
    assert metrics["calibration"]["method"] == "percentile"
    assert metrics["kernels"]["int8_total"] > 0
    session = json.loads((run_dir / "02_quantize" / "session.json").read_text())
    # MatMulAddFusion always; the graph tuning adds the fusions it undid when the split graph was faster here.
    tuned = metrics["graph_tuning"]["chosen"]
    undone = [
        name
        for key, name in (("skip_layer_norm", "SkipLayerNormFusion"), ("bias_gelu", "BiasGeluFusion"))
        if key in tuned
    ]
    assert session["disabled_optimizers"] == ["MatMulAddFusion", *undone]


def test_excluded_nodes_stay_float(recipe_for: Callable[..., Path]) -> None:
    stages = [{"type": "export"}, {"type": "quantize", "exclude_nodes": ["layer\\.1/"]}]
    run_dir = _run(recipe_for(stages=stages))
    metrics = json.loads((run_dir / "02_quantize" / "metrics.json").read_text())
    assert metrics["excluded_nodes"] and all("layer.1/" in n for n in metrics["excluded_nodes"])
    assert metrics["kernels"]["float_total"] > 0  # layer 1 runs in float, as asked


def test_export_mismatch_fails_and_keeps_nothing_half_written(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(stages=[{"type": "export", "tolerance": 1e-30}])
    recipe = load_recipe(path)
    with pytest.raises(StageFailed, match="differs from PyTorch"):
        _run(path)
    run_dir = recipe.output.dir / recipe.name
    assert sorted(p.name for p in run_dir.iterdir()) == [".edge-compress-run", ".lock", "resolved_recipe.yaml"]


def test_failed_stage_keeps_finished_ones(recipe_for: Callable[..., Path]) -> None:
    good = [{"type": "export"}]
    run_dir = _run(recipe_for(stages=good))
    marker = (run_dir / "01_export" / "done").read_text()
    bad = [{"type": "export"}, {"type": "quantize", "exclude_nodes": ["no-such-node"]}]
    with pytest.raises(Exception, match="matches no node"):
        _run(recipe_for(stages=bad))
    assert (run_dir / "01_export" / "done").read_text() == marker
    assert not (run_dir / "02_quantize").exists()
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


def test_dynamo_exporter_matches_torch(recipe_for: Callable[..., Path]) -> None:
    run_dir = _run(recipe_for(stages=[{"type": "export", "exporter": "dynamo", "optimize": False}]))
    metrics = json.loads((run_dir / "01_export" / "metrics.json").read_text())
    assert metrics["exporter"] == "dynamo" and metrics["max_abs_diff"] <= 1e-4
    assert [3, 2] in metrics["shapes_checked"] or len(metrics["shapes_checked"]) == 3


def test_sequence_length_beyond_the_model_is_a_user_error(recipe_for: Callable[..., Path]) -> None:
    from compress.errors import UserError

    stages = [{"type": "export"}, {"type": "validate", "runs": 10, "sequence_length": 128}]
    path = recipe_for(stages=stages)
    # refused before any work, by `check` as by `run`: no stage ran, no run folder was made
    with pytest.raises(UserError, match=r"stages\[1\]\.sequence_length: 128 exceeds the model's 64 positions"):
        _run(path)
    recipe = load_recipe(path)
    assert not (recipe.output.dir / recipe.name).exists()
    code, out = _check(path)
    assert code == 2 and "sequence_length: 128 exceeds the model's 64 positions" in out


def test_warnings_survive_a_rerun_that_reuses_the_stage(recipe_for: Callable[..., Path]) -> None:
    """Static QDQ leaves the fused Attention in float: warned loudly, and still in the report on resume."""
    stages = [{"type": "export"}, {"type": "quantize", "mode": "static"}]
    path = recipe_for(stages=stages)
    first = _report(_run(path))
    assert any("still run in float" in w for w in first["warnings"])
    second = _report(_run(path))
    assert second["stages"][1]["reused"] and second["warnings"] == first["warnings"]


def test_killed_run_resumes_from_the_last_finished_stage(recipe_for: Callable[..., Path]) -> None:
    """SIGKILL in the middle of validate; the rerun reuses export and quantize and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    long_validate = {"type": "validate", "runs": 100_000, "warmup": 0, "sequence_length": 16}
    path = recipe_for(stages=[{"type": "export"}, {"type": "quantize"}, long_validate])
    recipe = load_recipe(path)
    run_dir = recipe.output.dir / recipe.name
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "run", str(path)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / ".03_validate.tmp").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "02_quantize" / "done").is_file() and not (run_dir / "03_validate").exists()

    short = recipe_for(stages=[{"type": "export"}, {"type": "quantize"}, {**long_validate, "runs": 10}])
    report = _report(_run(short))
    assert [s["reused"] for s in report["stages"]] == [True, True, False]
    assert not (run_dir / ".03_validate.tmp").exists()


def test_second_concurrent_run_is_refused(recipe_for: Callable[..., Path]) -> None:
    import fcntl

    from compress.errors import UserError

    path = recipe_for(stages=[{"type": "export"}])
    recipe = load_recipe(path)
    run_dir = recipe.output.dir / recipe.name
    claim(run_dir)  # a run of ours, in progress
    with (run_dir / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="in use by another edge-compress run"):
            _run(path)
    assert _report(_run(path))["stages"][0]["type"] == "export"
