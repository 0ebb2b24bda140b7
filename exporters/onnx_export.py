"""torch -> ONNX, then ONNX Runtime's outputs compared with PyTorch's on real inputs.

Every export is checked (optimum's validate_model_outputs is the model): a graph whose outputs
differ from PyTorch's beyond the stated tolerance is never handed on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from compress.data.cache import write_atomic
from compress.errors import StageFailed
from exporters import native as native_ops
from exporters.ops import DOMAIN, attach_functions, register_schemas
from exporters.ops.torch_ops import exportable, translation_table

if TYPE_CHECKING:
    import torch

Exporter = Literal["torchscript", "dynamo"]


def export(
    module: torch.nn.Module,
    *,
    example: dict[str, np.ndarray],
    path: Path,
    output_names: tuple[str, ...],
    exporter: Exporter,
    opset: int,
    per_token: bool = False,
) -> None:
    """Export with dynamic batch and sequence axes on every input (inputs are (B, S) token arrays); the
    outputs have a dynamic batch axis, and a dynamic sequence axis too when they are `per_token`."""
    import torch

    names = tuple(example)
    args = tuple(torch.from_numpy(example[name]) for name in names)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporters warn about tracing details of Hugging Face code that the output check covers.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            axes.update({name: {0: "batch", 1: "sequence"} if per_token else {0: "batch"} for name in output_names})
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=list(names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                input_names=list(names),
                output_names=list(output_names),
                dynamic_shapes={name: {0: batch, 1: seq} for name in names},
                opset_version=max(opset, 18),
                external_data=False,
            )
            rename_shadowed_values(path, output_names)


def rename_shadowed_values(path: Path, output_names: tuple[str, ...]) -> None:
    """The dynamo exporter can name an internal value like a graph output (e.g. "embedding", after
    aten::embedding); ONNX Runtime then rejects the duplicate definition. Rename the internal one."""
    import onnx

    model = onnx.load(str(path))
    producers = [(node, i) for node in model.graph.node for i, out in enumerate(node.output) if out in output_names]
    seen: set[str] = set()
    for node, i in reversed(producers):  # the last producer of a name is the graph output's
        name = node.output[i]
        if name in seen:
            node.output[i] = renamed = f"{name}__internal"
            for user in model.graph.node:
                for j, inp in enumerate(user.input):
                    if inp == name and user is not node and _comes_before(model, node, user, name):
                        user.input[j] = renamed
        seen.add(name)
    if len(producers) > len(seen):
        onnx.save(model, str(path))


def _comes_before(model: object, producer: object, user: object, name: str) -> bool:
    """True if `user` reads `name` between `producer` and the next node that defines `name` again."""
    nodes = list(model.graph.node)  # type: ignore[attr-defined]
    start = nodes.index(producer)
    for node in nodes[start + 1 :]:
        if node is user:
            return True
        if name in node.output:
            return False
    return False


def export_zoo(
    module: torch.nn.Module, *, example: dict[str, np.ndarray], path: Path, output_names: tuple[str, ...], max_len: int
) -> list[str]:
    """Export a zoo model with the dynamo exporter: windowed and block-sparse attention become our
    ai.edgecompress ops (their ONNX function bodies attached), the other kinds standard ops; dynamic
    batch and sequence axes. Returns the attention kind of every layer. The model is checked with
    onnx.checker (full check: our schemas' shape inference included)."""
    import onnx
    import torch

    register_schemas()
    names = tuple(example)
    args = tuple(torch.from_numpy(example[name]) for name in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_len)
    with warnings.catch_warnings(), torch.no_grad(), exportable(module, max_len) as kinds:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(names),
            output_names=list(output_names),
            dynamic_shapes={name: {0: batch, 1: seq} for name in names},
            custom_translation_table=translation_table(),
            opset_version=18,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise StageFailed("export: the dynamo exporter returned no program")
    model = program.model_proto
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)

    write_atomic(path, model.SerializeToString())
    return kinds


def custom_ops(path: Path) -> dict[str, int]:
    """How many nodes of each ai.edgecompress op the model at `path` has (main graph)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def count_ops(path: Path, domain: str, op_type: str) -> int:
    """How many `domain`::`op_type` nodes the model at `path` has (main graph)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.domain == domain and node.op_type == op_type for node in graph.node)


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float
    mean_abs_diff: float
    shapes_checked: tuple[tuple[int, ...], ...]


def check_against_torch(
    module: torch.nn.Module,
    model: Path,
    batches: list[dict[str, np.ndarray]],
    tolerance: float,
    native: bool = False,
) -> Agreement:
    """Run PyTorch and ONNX Runtime on the same real batches; raise StageFailed beyond `tolerance`.
    Per-token outputs are compared at real tokens only. native: with our custom-op kernels registered
    (else ONNX Runtime runs the ops' function bodies)."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if native:
        native_ops.register(so)
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    worst, total, count, shapes = 0.0, 0.0, 0, []
    for feeds in batches:
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[k]) for k in feeds)).numpy()
        got = sess.run(None, feeds)[0]
        if got.shape != expected.shape:
            raise StageFailed(f"export: ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        mask = feeds.get("attention_mask")
        if mask is not None and diff.shape[:2] == mask.shape:
            diff = diff[mask.astype(bool)]  # per-token outputs: padding positions carry no meaning
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
        shapes.append(tuple(next(iter(feeds.values())).shape))
    if not worst <= tolerance:  # also catches NaN
        raise StageFailed(
            f"export: ONNX Runtime differs from PyTorch by {worst:.3g} > tolerance {tolerance:g}; "
            "the graph is not handed on (raise stages[].tolerance only if this error is expected)"
        )
    return Agreement(worst, total / max(count, 1), tuple(shapes))
