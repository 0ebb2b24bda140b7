"""Zoo models through the pipeline: train -> export (custom attention ops) -> int8 -> validate."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from rich.console import Console

from compress.context import Context
from compress.errors import UserError
from compress.models.config import ZooConfig
from compress.models.encoder import build_model
from compress.pipeline import run
from compress.recipe import load_recipe
from compress.stages.export.stage import check_lengths
from exporters import native
from exporters.ops import DOMAIN
from exporters.ops.torch_ops import exportable


def _run(path: Path) -> Path:
    recipe = load_recipe(path)
    return run(recipe, Context(recipe=recipe, run_dir=recipe.output.dir / recipe.name, console=Console(quiet=True)))


def _with_stages(path: Path, stages: list[dict[str, Any]], **data: Any) -> Path:
    spec = yaml.safe_load(path.read_text())
    spec["stages"] += stages
    spec["data"].update(data)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("attention", "op"),
    [
        ({"kind": "windowed", "window": 8, "global_tokens": 1}, "WindowedAttention"),
        ({"kind": "block_sparse", "block": 8, "random_blocks": 1, "global_tokens": 1}, "BlockSparseAttention"),
        ({"kind": "linformer", "proj_len": 8, "max_len": 128}, None),
        ({"kind": "lsh", "chunk": 8, "n_hashes": 2, "buckets": 4}, "LSHAttention"),
    ],
)
def test_zoo_export_uses_the_custom_op(
    zoo_recipe: Callable[..., Path], attention: dict[str, Any], op: str | None
) -> None:
    path = _with_stages(zoo_recipe(train={"epochs": 1}, attention=attention), [{"type": "export"}])
    run_dir = _run(path)
    metrics = json.loads((run_dir / "02_export" / "metrics.json").read_text())
    model = onnx.load(str(run_dir / "02_export" / "model.onnx"))
    ours = [n.op_type for n in model.graph.node if n.domain == DOMAIN]
    assert ours == ([op] if op else [])  # one layer: one op; standard-op kinds none
    assert [f.name for f in model.functions] == ([op] if op else [])  # the portable body travels along
    assert metrics["max_abs_diff"] < 1e-4
    # checked below, at, at multiples of and above the window/block, padded and not
    lengths = {shape[1] for shape in metrics["shapes_checked"]}
    assert {4, 8, 16, 29, 128} <= lengths  # linformer: around its proj_len, 8
    assert (run_dir / "02_export" / "tokenizer" / "edge_tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("attention", "op"),
    [
        ({"kind": "windowed", "window": 8, "causal": True}, "WindowedAttention"),
        ({"kind": "lsh", "chunk": 8, "n_hashes": 2, "buckets": 4, "causal": True}, "LSHAttention"),
    ],
)
def test_lm_export_compares_real_tokens(zoo_recipe: Callable[..., Path], attention: dict[str, Any], op: str) -> None:
    path = _with_stages(zoo_recipe("lm", train={"epochs": 1}, attention=attention), [{"type": "export"}])
    run_dir = _run(path)
    metrics = json.loads((run_dir / "02_export" / "metrics.json").read_text())
    assert metrics["custom_ops"] == {op: 1}
    assert metrics["max_abs_diff"] < 1e-4
    assert metrics["custom_op_kernel"] == ("native" if native.available() else "function body")


@pytest.mark.parametrize(
    ("task", "attention", "ops"),
    [
        ("lm", {"kind": "windowed", "window": 8, "causal": True}, {"WindowedAttention": 3}),
        ("classification", {"kind": "kernelized", "features": 16}, {}),
    ],
)
def test_hourglass_exports(
    zoo_recipe: Callable[..., Path], task: str, attention: dict[str, Any], ops: dict[str, int]
) -> None:
    """Hourglass stacks (shortened inner layers, upsampling) export; their attention maps as usual."""
    hourglass = {"factor": 2, "pre": 1, "inner": 1, "post": 1, "downsample": "linear"}
    path = zoo_recipe(task, train={"epochs": 1}, n_layers=0, hourglass=hourglass, attention=attention)
    run_dir = _run(_with_stages(path, [{"type": "export"}]))
    metrics = json.loads((run_dir / "02_export" / "metrics.json").read_text())
    assert metrics["custom_ops"] == ops
    assert metrics["max_abs_diff"] < 1e-4
    base = attention.get("window", 64)  # kernelized: no window; checked around 64
    assert {base, base + 3, 2 * base, 128} <= {shape[1] for shape in metrics["shapes_checked"]}


def test_export_quantize_validate(zoo_recipe: Callable[..., Path], tmp_path: Path) -> None:
    stages = [
        {"type": "export"},
        {"type": "quantize", "mode": "static", "calibration_samples": 32},
        {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 64},
    ]
    train = {"path": str(tmp_path / "train.jsonl")}
    path = _with_stages(zoo_recipe(train={"epochs": 2}), stages, calibration=train)
    run_dir = _run(path)
    model = onnx.load(str(run_dir / "03_quantize" / "model.onnx"))
    kinds = {(n.domain, n.op_type) for n in model.graph.node}
    assert (DOMAIN, "WindowedAttention") in kinds  # the op stays float ...
    assert ("", "QuantizeLinear") in kinds  # ... between int8 (QDQ) projections
    quantize = json.loads((run_dir / "03_quantize" / "metrics.json").read_text())
    assert quantize["kernels"]["int8_total"] > 0
    assert quantize["fidelity_check"]["cosine_mean"] > 0.98
    report = json.loads((run_dir / "report.json").read_text())
    validate = next(s for s in report["stages"] if s["type"] == "validate")["metrics"]["targets"]["x86_64"]
    assert validate["artifact"]["task"]["examples"] == 32
    assert abs(validate["artifact"]["task"]["accuracy"] - validate["reference"]["task"]["accuracy"]) <= 0.1
    # the report says which implementation of the attention op the latency figures measured
    ran = validate["setup"]["custom_op_kernel"]
    assert ran.startswith("native (") if native.available() else ran == "function body"


def test_without_the_library_export_and_validate_say_so(
    zoo_recipe: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No native library: the run still works on the function bodies, and says so loudly (no silent fallback)."""
    monkeypatch.setattr(native, "available", lambda *_: False)
    monkeypatch.setattr(native, "register", lambda *_: False)
    stages = [{"type": "export"}, {"type": "validate", "runs": 10, "warmup": 1, "sequence_length": 64}]
    run_dir = _run(_with_stages(zoo_recipe(train={"epochs": 1}), stages))
    report = json.loads((run_dir / "report.json").read_text())
    export = next(s for s in report["stages"] if s["type"] == "export")["metrics"]
    validate = next(s for s in report["stages"] if s["type"] == "validate")["metrics"]["targets"]["x86_64"]
    assert export["custom_op_kernel"] == "function body"
    assert validate["setup"]["custom_op_kernel"] == "function body"
    warnings = " ".join(report.get("warnings", []))
    assert "function bodies" in warnings and "edge-compress build-ops" in warnings


def test_model_runs_without_the_native_library(zoo_recipe: Callable[..., Path]) -> None:
    """A plain ONNX Runtime session with nothing registered runs the function bodies."""
    path = _with_stages(zoo_recipe(train={"epochs": 1}), [{"type": "export"}])
    run_dir = _run(path)
    sess = ort.InferenceSession(str(run_dir / "02_export" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 259, (2, 50)).numpy()
    out = sess.run(None, {"input_ids": ids, "attention_mask": (ids > 0).astype("int64")})[0]
    assert out.shape == (2, 2)


def test_unknown_attention_module_is_refused() -> None:
    cfg = ZooConfig.from_dict(
        {"format": "edge-compress-zoo", "version": 1, "task": "classification", "vocab_size": 50, "max_len": 32,
         "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "attention": {"kind": "windowed", "window": 4}}
    )  # fmt: skip
    model = build_model(cfg)

    from compress.models.attention import WindowedAttention

    class Dilated(WindowedAttention):  # a kind the exporter has no op for: must not export as dense
        pass

    block = model.backbone.body.blocks[0].f.attn
    block.attn = object.__new__(Dilated)
    torch.nn.Module.__init__(block.attn)
    block.attn.cfg = cfg.attention
    with pytest.raises(ValueError, match="Dilated"), exportable(model, 32):
        pass


def test_zoo_export_recipe_errors(zoo_recipe: Callable[..., Path]) -> None:
    path = _with_stages(zoo_recipe(), [{"type": "export", "exporter": "torchscript"}])
    with pytest.raises(UserError, match="dynamo"):
        load_recipe(path)


def test_check_lengths_cover_the_window() -> None:
    assert check_lengths(8, 128) == [4, 8, 11, 16, 29, 128]
    assert check_lengths(256, 100) == [100]
    assert check_lengths(64, 64) == [32, 64]


def test_validate_on_aarch64_runs_the_aarch64_kernels_and_matches_native(zoo_recipe: Callable[..., Path]) -> None:
    """The windowed op on an emulated Neoverse-N1: the aarch64 library (NEON) computes what x86-64 computes."""
    from compress import targets

    if targets.get("aarch64").problem() and (os.geteuid() != 0 or not native.available("aarch64")):
        pytest.skip(f"aarch64 target: {targets.get('aarch64').problem()}")
    if not native.available("aarch64"):
        pytest.skip("the aarch64 library is not built (edge-compress build-ops --arch aarch64)")
    stages = [
        {"type": "export"},
        {
            "type": "validate",
            "runs": 10,
            "warmup": 1,
            "sequence_length": 64,
            "emulated_samples": 8,
            "emulated_runs": 1,
            "gate": {"aarch64": {"min_agreement": 1.0}},
        },
    ]
    path = _with_stages(zoo_recipe(train={"epochs": 1}), stages)
    raw = yaml.safe_load(path.read_text())
    raw["targets"] = ["x86_64", "aarch64"]
    path.write_text(yaml.safe_dump(raw))
    report = json.loads((_run(path) / "report.json").read_text())
    arm = report["targets"]["aarch64"]
    assert arm["setup"]["custom_op_kernel"].startswith("native (neon")
    # the first emulated_samples texts, rounded up to whole batches (batch_size 16), not all 32
    assert arm["setup"]["evaluated_texts"] == 16 < arm["setup"]["evaluation_texts"]
    assert arm["consistency"]["value"] == 1.0 and arm["gate"]["passed"]


@pytest.mark.parametrize(
    ("attention", "message"),
    [
        ({"kind": "lsh", "chunk": 8, "n_hashes": 2, "buckets": 5}, "attention.buckets must be even"),
        ({"kind": "lsh", "chunk": 24, "n_hashes": 2, "buckets": 4}, "attention.chunk 24 does not divide max_len 128"),
    ],
)
def test_bad_lsh_settings_exit_2_before_any_work(
    zoo_recipe: Callable[..., Path], attention: dict[str, Any], message: str
) -> None:
    import subprocess
    import sys

    path = zoo_recipe(attention=attention)
    done = subprocess.run(
        [sys.executable, "-m", "compress.cli", "run", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (path.parent / "runs").exists()


def test_lsh_texts_of_any_length_are_padded_to_whole_chunks(zoo_recipe: Callable[..., Path]) -> None:
    """A text whose length is not a multiple of the chunk gives the same logits alone as in a padded batch,
    in PyTorch and in ONNX Runtime: the padding goes to its own bucket and never changes a real token."""
    attention = {"kind": "lsh", "chunk": 8, "n_hashes": 2, "buckets": 4}
    run_dir = _run(_with_stages(zoo_recipe(train={"epochs": 1}, attention=attention), [{"type": "export"}]))
    from compress.models.zoo import load_zoo

    model = load_zoo(run_dir / "01_train" / "model")
    ids = torch.randint(3, 259, (2, 29))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    with torch.no_grad():
        batch = model(ids, mask)
        alone = model(ids[1:, :13], mask[1:, :13])
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-5)
    sess = ort.InferenceSession(str(run_dir / "02_export" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert abs(got - batch.numpy()).max() < 1e-4
