"""Quantization-aware training: the pt2e lifecycle, its traps, and the qat stage on tiny real models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from rich.console import Console
from torch import nn

from compress.context import Context
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.runtime.fidelity import QDQ_SESSION
from compress.runtime.kernels import count_kernels
from compress.runtime.presets import PRESETS, host_has_vnni
from compress.runtime.session import session
from compress.stages.qat.lifecycle import Lifecycle, LifecycleError, QatModel
from tests.conftest import TEXTS


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(8, 16), nn.Linear(16, 4), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(torch.relu(self.up(x))))


def _life(preset: str = "x86_64-vnni") -> Lifecycle:
    torch.manual_seed(0)
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", min=2, max=64)}}
    return Lifecycle(Tiny(), (torch.randn(2, 5, 8),), dims, PRESETS[preset])


def _train(model: QatModel, steps: int = 5) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(3, 7, 8)
        loss = (model(x) - x[..., :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lifecycle_steps_only_from_their_state(tmp_path: Path) -> None:
    life = _life()
    with pytest.raises(LifecycleError, match="convert\\(\\) needs a prepared model, but the model is float"):
        life.convert()
    model = life.prepare()
    with pytest.raises(LifecycleError, match="prepare\\(\\) needs a float model"):
        life.prepare()
    with pytest.raises(LifecycleError, match="export\\(\\) needs a converted model"):
        life.export(tmp_path / "m.onnx", input_names=["x"], output_names=["y"])
    _train(model)
    life.convert()
    assert life.state == "converted"
    with pytest.raises(LifecycleError, match="convert\\(\\) needs a prepared model, but the model is converted"):
        life.convert()
    life.export(tmp_path / "m.onnx", input_names=["x"], output_names=["y"])
    assert life.state == "exported"


def test_qat_export_is_qdq_that_ort_runs_as_int8(tmp_path: Path) -> None:
    # The preset for this CPU: full-range weights saturate ORT's u8s8 kernels on x86-64 without VNNI.
    life = _life("x86_64-vnni" if host_has_vnni() else "x86_64-avx2")
    _train(life.prepare())
    converted = life.convert()
    path = tmp_path / "m.onnx"
    life.export(path, input_names=["x"], output_names=["y"])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    kernels = count_kernels(path, QDQ_SESSION)
    assert kernels["int8_total"] == 2 and kernels["float_total"] == 0  # both linears
    sess = session(path, threads=1, settings=QDQ_SESSION)
    for shape in ((1, 3, 8), (4, 40, 8)):  # dynamic batch and sequence survive
        x = torch.randn(*shape)
        got = sess.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, converted(x).detach().numpy(), atol=1e-5)


def test_avx2_preset_trains_seven_bit_weights(tmp_path: Path) -> None:
    life = _life("x86_64-avx2")
    _train(life.prepare())
    life.convert()
    path = tmp_path / "m.onnx"
    life.export(path, input_names=["x"], output_names=["y"])
    graph = onnx.load(str(path)).graph
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and all(w.min() >= -64 and w.max() <= 63 for w in weights)


def test_training_mode_keeps_the_models_dropout_rate() -> None:
    model = _life().prepare()
    model.train()
    rates = [n.args[1] for n in model.gm.graph.nodes if n.target == torch.ops.aten.dropout.default]
    assert rates == [0.1]  # torchao's own rewrite would make it 0.5
    assert model.training and all(m.training for m in model.modules())


def test_evaluation_does_not_move_the_ranges() -> None:
    model = _life().prepare()
    _train(model, steps=2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "scale" in k or "activation_post_process" in k}
    with torch.no_grad():
        model(torch.randn(2, 9, 8) * 50)  # far outside the trained ranges
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


def test_windowed_attention_op_has_the_references_gradient() -> None:
    from exporters.ops import torch_ops

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, -4:] = False
    glob = torch.zeros(1, 20, dtype=torch.bool)
    glob[0, 0] = True
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch_ops.register_torch_ops().windowed_attention(a, b, c, mask, glob, 3, False), (q, k, v)
    )


# --------------------------------------------------------------------------------------------- stage
def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def test_qat_stage_on_a_bert_embedder(tmp_path: Path, recipe_for: Callable[..., Path]) -> None:
    train = tmp_path / "train.jsonl"
    texts = [f"{a} and {b}" for a in TEXTS for b in TEXTS[:4]]  # 48 texts
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    path = recipe_for(stages=[{"type": "export"}, {"type": "qat", "epochs": 1, "batch_size": 8, "lr": 1e-4}])
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["train"] = {"path": str(train)}
    path.write_text(yaml.safe_dump(recipe))
    run_dir = _run(path)
    metrics = json.loads((run_dir / "02_qat" / "metrics.json").read_text())
    assert metrics["kernels"]["int8_total"] >= 8  # q, k, v, out, up, down of 2 layers (less fused ones)
    assert metrics["ort_vs_torch_cosine_min"] > 0.999
    assert metrics["selection"] == "cosine_to_fp32" and metrics["best"] > 0.9
    assert metrics["fidelity_check"]["cosine_mean"] > 0.9
    artifact = json.loads((run_dir / "02_qat" / "artifact.json").read_text())
    assert artifact["meta"]["precision"] == "int8" and "torch" not in artifact["files"]


def test_qat_stage_keeps_the_windowed_op_float(zoo_recipe: Callable[..., Path]) -> None:
    path = zoo_recipe(train={"epochs": 1})
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"] += [
        {"type": "export"},
        {"type": "qat", "epochs": 1, "batch_size": 16, "lr": 1e-4},
        {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 64},
    ]
    path.write_text(yaml.safe_dump(recipe))
    run_dir = _run(path)
    model = onnx.load(str(run_dir / "03_qat" / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("ai.edgecompress", "WindowedAttention") in ops and ("", "QuantizeLinear") in ops
    metrics = json.loads((run_dir / "03_qat" / "metrics.json").read_text())
    assert metrics["kernels"]["int8_total"] >= 4 and metrics["ort_vs_torch_cosine_min"] > 0.999
    validate = json.loads((run_dir / "04_validate" / "metrics.json").read_text())["targets"]["x86_64"]
    assert validate["artifact"]["kernels"]["int8_total"] >= 4


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"type": "qat"}], "add an export stage"),
        ([{"type": "export"}, {"type": "quantize"}, {"type": "qat"}], "use quantize or qat, not both"),
        (
            [{"type": "export"}, {"type": "qat", "losses": {"embedding_cosine": 1.0, "hidden_relative": 1.0}}],
            "hidden_relative and attention are distill losses",
        ),
    ],
)
def test_bad_qat_recipes_are_refused(recipe_for: Callable[..., Path], stages: list, message: str) -> None:
    from compress.errors import UserError

    path = recipe_for(stages=stages)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["train"] = recipe["data"]["calibration"]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=message):
        load_recipe(path)
