"""Outlier smoothing (SmoothQuant) of the fp32 graph before int8: same function, smaller int8 error."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.runtime.session import session
from compress.stages.quantize import smoothing
from tests.conftest import two_matmuls

SETTINGS = {"alpha": None, "excluded": [], "reduce_range": False, "rows_per_text": 16, "sample_texts": 8}


def _batches(n: int = 4, outlier: float = 60.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        x = rng.normal(size=(2, 12, 8)).astype(np.float32)
        x[..., 5] *= outlier  # one channel far above the others, on every token: what SmoothQuant is for
        mask = np.ones((2, 12), np.int64)
        mask[1, 8:] = 0
        out.append({"x": x, "attention_mask": mask})
    return out


def _smooth(tmp_path: Path, **settings: object) -> tuple[Path, Path, dict]:
    source, target = tmp_path / "fp32.onnx", tmp_path / "stage" / "smoothed.onnx"
    target.parent.mkdir()
    two_matmuls(source, ("B", "T", 8), mask=True)
    report = smoothing.smooth(source, target, _batches(), {**SETTINGS, **settings}, lambda p: session(p, threads=1))
    # Nothing is written beside the input (another stage's folder), and the stage's folder keeps only the result.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "stage"]
    assert [p.name for p in target.parent.iterdir()] == ["smoothed.onnx"]
    return source, target, report


def test_smoothed_graph_computes_the_same_function(tmp_path: Path) -> None:
    source, target, report = _smooth(tmp_path)
    assert report["nodes"]["mm1"]["alpha"] is not None  # the outlier channel feeds mm1
    assert report["nodes"]["mm1"]["error_after"] < 0.5 * report["nodes"]["mm1"]["error_before"]
    ops = [n.op_type for n in onnx.load(str(target)).graph.node]
    assert ops.count("Mul") == report["smoothed"] and ops.count("MatMul") == 2
    feeds = _batches(1)[0]
    a = session(source, threads=1).run(None, feeds)[0]
    b = session(target, threads=1).run(None, feeds)[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)


def test_smoothing_lowers_the_int8_error_of_the_quantized_graph(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target, _ = _smooth(tmp_path)
    errors = {}
    feeds = _batches(1)[0]
    exact = session(source, threads=1).run(None, feeds)[0]
    for name, model in {"plain": source, "smoothed": target}.items():
        out = tmp_path / f"{name}_int8.onnx"
        quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8)
        got = session(out, threads=1).run(None, feeds)[0]
        errors[name] = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    assert errors["smoothed"] < 0.7 * errors["plain"], errors  # measured: 0.0082 against 0.0151


def test_fixed_alpha_is_used_for_every_node_and_maxima_count_padding(tmp_path: Path) -> None:
    _, _, report = _smooth(tmp_path, alpha=0.5)
    assert report["alpha"] == 0.5 and all(n["alpha"] == 0.5 for n in report["nodes"].values())
    stats = smoothing._Stats()
    padded = np.zeros((1, 4, 3), np.float32)
    padded[0, 3] = [9.0, 0.0, 0.0]  # a pad row: its range is part of a padded batch's dynamic range
    stats.see(padded)
    assert stats.absmax is not None and stats.absmax[0] == 9.0


def test_excluded_and_shared_weights_are_not_smoothed(tmp_path: Path) -> None:
    _, _, report = _smooth(tmp_path, excluded=["mm1"])
    assert "mm1" not in report["nodes"] and report["candidates"] == 1


@pytest.mark.parametrize(("smoothing_cfg", "message"), [({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha")])
def test_alpha_outside_0_1_exits_2(recipe_for: Callable[..., Path], smoothing_cfg: dict, message: str) -> None:
    path = recipe_for(stages=[{"type": "export"}, {"type": "quantize", "smoothing": smoothing_cfg}])
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_static_simulation_uses_one_range_for_every_text() -> None:
    rng = np.random.default_rng(2)
    stats = smoothing._Stats()
    for scale in (1.0, 50.0):  # a quiet text and a loud one: one calibrated range must cover both
        rows = (rng.normal(size=(20, 6)) * scale).astype(np.float32)
        stats.see(rows[None])
        stats.add(rows, keep=20, sample_texts=4, rng=rng)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    # measured: 1.0e-4 against 5.9e-5 (the error is relative to the loud text's signal, which dominates)
    assert smoothing.error(stats, w, None, 127, static=True) > 1.3 * smoothing.error(stats, w, None, 127)


def test_a_model_with_external_data_is_recognised(tmp_path: Path) -> None:
    from compress.stages.quantize import stage as quantize

    inline, external = tmp_path / "inline.onnx", tmp_path / "external.onnx"
    two_matmuls(inline)
    onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True, size_threshold=0)
    assert not quantize._external_data(inline) and quantize._external_data(external)


def test_an_activation_with_no_sampled_rows_is_left_alone() -> None:
    """A candidate whose activation gave no token rows (never a 2-D tensor) is not smoothed, and does not fail."""
    w = np.ones((4, 3), np.float32)
    assert smoothing.choose(smoothing._Stats(), w, None, 127) == (None, 0.0, 0.0)
