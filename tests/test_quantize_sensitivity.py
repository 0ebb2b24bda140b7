"""The one-pass sensitivity ranking, keep_sensitive (auto / N / none), and the goal search's evaluation count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import compress
from compress.artifact import Artifact
from compress.errors import StageFailed, UserError
from compress.recipe import QuantizeStage
from compress.runtime.presets import host_has_vnni
from compress.stages.quantize import search as quantize_search
from compress.stages.quantize import sensitivity
from compress.stages.quantize.sensitivity import Int8Spec

DAMAGED = "/encoder/encoder/layer.1/output/dense/MatMul"  # the node the damaged tiny BERT's outlier channel feeds


# ------------------------------------------------------------------------------- the one-pass measure
def _mlp(path: Path, outlier: float) -> None:
    """x -> mm0 -> relu -> mm1 -> relu -> mm2 -> relu -> mm3: mm1's output channel 0 scaled by `outlier`, mm2's
    matching input row by 1/outlier. The float function is unchanged; mm2's input gets an outlier channel."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(16, 16)).astype(np.float32) / 4 for _ in range(4)]
    weights[1][:, 0] *= outlier
    weights[2][0, :] /= outlier
    nodes, x = [], "x"
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 16])],
        [helper.make_tensor_value_info("h3", TensorProto.FLOAT, ["B", "S", 16])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _inputs(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(1, 24, 16)).astype(np.float32)} for _ in range(n)]


def test_ranking_finds_the_node_an_outlier_channel_damages(tmp_path: Path) -> None:
    model = tmp_path / "mlp.onnx"
    _mlp(model, outlier=200.0)
    spec = Int8Spec(per_channel=True, reduce_range=REDUCE, weight_type="int8")
    result = sensitivity.measure(model, ["mm0", "mm1", "mm2", "mm3"], _inputs(), spec, tmp_path / "w")
    ranking = [(s.node, s.score) for s in result.ranking]
    assert ranking[0][0] == "mm2", ranking
    assert ranking[0][1] > 10 * ranking[1][1]  # far ahead of the rest
    assert result.texts == 4 and result.outputs[0].shape == (1, 24, 16)
    assert not (tmp_path / "w" / "sensitivity.onnx").exists()  # its graph copy is removed


# Without VNNI, ONNX Runtime's u8s8 kernels add two u8 x s8 products in int16 (vpmaddubsw), which saturates for
# 8-bit weights: the measure is compared with exact int8 arithmetic there with 7-bit weights (reduce_range), as
# the x86_64-avx2 preset quantizes.
REDUCE = not host_has_vnni()


def _numpy_score(x: np.ndarray, w: np.ndarray, static: tuple[float, float] | None) -> float:
    """The same measure computed directly: per-channel noise-to-signal of x·w against int8(x)·int8(w)."""
    q, scale, zero = sensitivity.quantize_array(w, "int8", per_channel=True, reduce_range=REDUCE)
    wq = (q.astype(np.float32) - zero) * scale
    lo, hi = static or (float(x.min()), float(x.max()))
    s, z = sensitivity.scale_zero(lo, hi, 0, 255)
    xq = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    exact, approx = x @ w, xq @ wq
    noise = ((approx - exact) ** 2).reshape(-1, w.shape[1]).sum(0)
    signal = (exact**2).reshape(-1, w.shape[1]).sum(0)
    return float(np.sqrt(np.minimum(noise / signal, 1).mean()))


@pytest.mark.parametrize("static", [None, (-2.0, 3.0)])
def test_measure_matches_the_int8_arithmetic(tmp_path: Path, static: tuple[float, float] | None) -> None:
    """Dynamic (the run's own range) and static (a calibrated range, values outside it saturate)."""
    model = tmp_path / "mlp.onnx"
    _mlp(model, outlier=1.0)
    batch = _inputs(1)
    ranges = {"x": static} if static else None
    spec = Int8Spec(per_channel=True, reduce_range=REDUCE, weight_type="int8", ranges=ranges)
    got = sensitivity.measure(model, ["mm0"], batch, spec, tmp_path).ranking[0].score
    w0 = numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0])
    assert got == pytest.approx(_numpy_score(batch[0]["x"][0], w0, static), rel=1e-3)


# ------------------------------------------------------------------------------------- the search
def _pipeline(penalty: dict[str, float]) -> tuple[Callable[[list[str], Path], None], Callable[[Path], float], list]:
    """A quantizer whose model is the list of nodes in float; the metric loses each int8 node's penalty."""
    evaluated: list[int] = []

    def quantize(in_float: list[str], out: Path) -> None:
        out.write_text(json.dumps(in_float))

    def evaluate(model: Path) -> float:
        kept = set(json.loads(model.read_text()))
        evaluated.append(len(kept))
        return 1.0 - sum(p for n, p in penalty.items() if n not in kept)

    return quantize, evaluate, evaluated


def _search(
    tmp_path: Path, penalty: dict[str, float], allowed: float, scores: list | None, ranking: list[str] | None = None
) -> Any:
    quantize, evaluate, evaluated = _pipeline(penalty)
    result = quantize_search.search(
        ranking=ranking or list(penalty),  # in sensitivity order
        scores=scores,
        fixed_float=[],
        quantize=quantize,
        evaluate=evaluate,
        target=quantize_search.Target("cosine", 1.0, allowed, "quantize.goal"),
        budget_s=60,
        work_dir=tmp_path,
        out=tmp_path / "out.json",
        log=lambda _: None,
    )
    return result, evaluated


@pytest.mark.parametrize("informed", [True, False])
@pytest.mark.parametrize("needed", [1, 5, 13, 40, 64])
def test_goal_search_needs_log_n_evaluations(tmp_path: Path, needed: int, informed: bool) -> None:
    """64 ranked nodes, of which the first `needed` must stay float; scores that predict well, or none."""
    n = 64
    penalty = {f"n{i}": (0.01 if i < needed else 1e-5) for i in range(n)}
    allowed = 1e-5 * (n - needed) + 1e-9
    scores = [math.sqrt(p) for p in penalty.values()] if informed else None
    result, evaluated = _search(tmp_path, penalty, allowed, scores)
    chosen = result.trials[result.chosen]
    assert chosen.met and len(chosen.in_float) == needed  # the fewest that meet it
    assert len(evaluated) <= 2 * math.ceil(math.log2(n)) + 3, [t.phase for t in result.trials]
    if informed:
        assert len(evaluated) <= 3  # all int8, the prediction, its neighbour below
    assert json.loads((tmp_path / "out.json").read_text()) == chosen.in_float
    assert (tmp_path / "full.onnx").is_file()  # the all-int8 model, for the speed cost


def test_search_fails_with_its_best_trial_when_float_cannot_reach_the_target(tmp_path: Path) -> None:
    penalty = {"a": 0.001, "b": 0.002}
    with pytest.raises(StageFailed, match=r"quantize.goal not met \(every ranked node in float\)"):
        _search(tmp_path, penalty | {"unranked": 0.5}, 0.01, None, ranking=list(penalty))
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["trials"][saved["chosen"]]["drop"] == min(t["drop"] for t in saved["trials"])


# --------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def damaged_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with an outlier channel into layer 1's FFN output projection."""
    import torch
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("damaged-bert")
    model = BertModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        ffn_in, ffn_out = model.encoder.layer[1].intermediate.dense, model.encoder.layer[1].output.dense
        ffn_in.weight[3] *= 40.0  # channel 3 of the GELU input: large, mostly positive (GELU ~ identity)
        ffn_in.bias[3] = 40.0
        ffn_out.weight[:, 3] /= 40.0
        ffn_out.weight *= 30.0  # and the projection's output weighs in the residual stream
    model.save_pretrained(folder, safe_serialization=True)
    for path in tiny_bert.iterdir():  # the tokenizer's files
        if not (folder / path.name).exists():
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _recipe(recipe_for: Callable[..., Path], folder: Path) -> Path:
    return recipe_for(model={"hf": str(folder)}, stages=[{"type": "export"}])


def _quantize(recipe: Path, work: Path, **settings: Any) -> dict[str, Any]:
    """Quantize the recipe's export; smoothing off unless asked for (it would cure the damaged channel, and
    these tests are about the nodes kept in float)."""
    settings.setdefault("smoothing", {"enabled": False})
    export = compress.run_recipe(recipe)
    fp32 = Artifact.from_json((export.run_dir / "01_export" / "artifact.json").read_text(), export.run_dir)
    _, metrics = compress.run_stage(QuantizeStage(type="quantize", **settings), fp32, recipe=recipe, work_dir=work)
    return metrics


def test_auto_keeps_the_damaged_node_in_float_and_names_it(
    recipe_for: Callable[..., Path], damaged_bert: Path, tmp_path: Path
) -> None:
    recipe = _recipe(recipe_for, damaged_bert)
    metrics = _quantize(recipe, tmp_path / "auto")
    kept = metrics["kept_in_float"]
    assert kept["by"] == "auto" and kept["nodes"][0]["node"] == DAMAGED and kept["nodes"][0]["rank"] == 1
    assert metrics["sensitivity"]["ranking"][0]["node"] == DAMAGED and kept["nodes"][0]["sensitivity"] > 0.3
    search = metrics["search"]
    assert not search["trials"][0]["met"] and search["trials"][search["chosen"]]["metric"] >= 0.99
    assert kept["speed_cost"]["all_int8_ms"] > 0 and kept["speed_cost"]["tokens"] == 32
    assert metrics["kernels"]["float_total"] >= 1 and not metrics["warnings"]  # the float node was asked for
    assert sorted(p.name for p in (tmp_path / "auto" / "quantize").iterdir()) == [
        "artifact.json",
        "metrics.json",
        "model.onnx",
        "session.json",
        "tokenizer",
    ]  # no trial left behind

    none = _quantize(recipe, tmp_path / "none", keep_sensitive="none")
    assert none["kept_in_float"] is None and "sensitivity" not in none
    assert none["fidelity_check"]["cosine_mean"] < metrics["fidelity_check"]["cosine_mean"]
    two = _quantize(recipe, tmp_path / "two", keep_sensitive=2)
    assert [n["rank"] for n in two["kept_in_float"]["nodes"]] == [1, 2] and two["kept_in_float"]["evaluations"] == 0


def test_smoothing_cures_the_damaged_channel_without_float_nodes(
    recipe_for: Callable[..., Path], damaged_bert: Path, tmp_path: Path
) -> None:
    recipe = _recipe(recipe_for, damaged_bert)
    plain = _quantize(recipe, tmp_path / "plain", keep_sensitive="none")
    smoothed = _quantize(recipe, tmp_path / "smoothed", keep_sensitive="none", smoothing={"enabled": True})
    node = smoothed["smoothing"]["nodes"][DAMAGED]
    assert node["alpha"] is not None and node["error_after"] < 0.5 * node["error_before"]
    assert smoothed["fidelity_check"]["cosine_mean"] > plain["fidelity_check"]["cosine_mean"]
    assert smoothed["fidelity_check"]["cosine_min"] > 0.99 > plain["fidelity_check"]["cosine_min"]
    # With the default (auto), the smoothed all-int8 graph meets the floor: no node has to stay float.
    auto = _quantize(recipe, tmp_path / "auto", smoothing={"enabled": True})
    assert auto["kept_in_float"]["nodes"] == [] and auto["kernels"]["float_total"] == 0


def test_goal_keeps_the_damaged_node_in_few_evaluations(
    recipe_for: Callable[..., Path], damaged_bert: Path, tmp_path: Path
) -> None:
    recipe = _recipe(recipe_for, damaged_bert)
    metrics = _quantize(recipe, tmp_path / "goal", goal={"max_drop": 0.01})
    search = metrics["accuracy_aware"]
    chosen = search["trials"][search["chosen"]]
    assert chosen["met"] and chosen["in_float"][0] == DAMAGED
    assert len(search["trials"]) <= 2 * math.ceil(math.log2(len(search["ranking"]))) + 3
    assert metrics["kept_in_float"]["by"] == "goal"


# ------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep_sensitive": "some"}, "keep_sensitive"),
        ({"keep_sensitive": -1}, "keep_sensitive"),
        ({"keep_sensitive": True}, "keep_sensitive"),
        ({"fidelity_floor": 1.5}, "fidelity_floor"),
        ({"keep_sensitive": "none", "fidelity_floor": 0.95}, "fidelity_floor applies to keep_sensitive: auto"),
        ({"goal": {"max_drop": 0.01}, "keep_sensitive": 2}, "with goal, the goal decides"),
        ({"mode": "static", "attention_matmuls": "int8"}, "attention_matmuls applies to mode: dynamic"),
        ({"sensitivity_samples": 0}, "sensitivity_samples"),
        ({"keep_sensitive": "none", "sensitivity_samples": 4}, "keep_sensitive: none ranks no node"),
    ],
)
def test_bad_sensitivity_settings_are_one_line_errors(
    recipe_for: Callable[..., Path], settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError) as caught:
        compress.load(recipe_for(stages=[{"type": "export"}, {"type": "quantize", **settings}]))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_setting_exits_2_from_the_cli(recipe_for: Callable[..., Path]) -> None:
    path = recipe_for(stages=[{"type": "export"}, {"type": "quantize", "keep_sensitive": "most"}])
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "keep_sensitive" in proc.stderr and "Traceback" not in proc.stderr
