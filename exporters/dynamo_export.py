"""torch.export -> ONNX for Hugging Face encoders whose attention we replace with our ops (Longformer,
ModernBERT), and the checks that the exported graph kept the attention banded.

Shared by `exporters.longformer` and `exporters.modernbert`: each supplies a context manager that swaps
its model's attention for modules calling our torch ops (and yields each layer's window); this module
exports under it with dynamic batch and sequence axes, translates our ops to ai.edgecompress nodes,
names the outputs and checks the graph.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn

from exporters.ops import DOMAIN, register_schemas
from exporters.ops.torch_ops import translation_table


def export_program(
    module: nn.Module,
    *,
    wrapped: bool,
    example: dict[str, np.ndarray],
    output_names: tuple[str, ...],
    exportable: Callable[[nn.Module], AbstractContextManager[list[int]]],
) -> tuple[Any, list[int]]:
    """torch.export with dynamic batch and sequence axes under `exportable(module)`, then the ONNX
    translation (opset 18, our ops as ai.edgecompress nodes); (ModelProto, the windows it yielded).
    wrapped: `module` takes the example arrays as one *inputs tuple (a wrapper); else positionally."""
    names = tuple(example)
    register_schemas()
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n])) for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = tuple({0: batch, 1: seq} for _ in names)
    dynamic: Any = {"inputs": axes} if wrapped else axes
    with warnings.catch_warnings(), torch.no_grad(), exportable(module) as windows:
        # The exporter warns about tracing details of HF code that the graph checks and the output
        # comparison cover.
        warnings.simplefilter("ignore")
        # torch.export directly, not through torch.onnx.export's fallbacks: a draft export would
        # silently specialise a length-dependent branch; here it is an error.
        program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        onnx_program = torch.onnx.export(
            program,
            input_names=list(names),
            custom_translation_table=translation_table(),
            opset_version=18,
            verbose=False,
        )
    if onnx_program is None:  # pragma: no cover - an ExportedProgram always gives a program
        raise ValueError("export: the dynamo exporter returned no program")
    name_outputs(onnx_program.model, output_names)
    return onnx_program.model_proto, windows


def name_outputs(model: Any, names: tuple[str, ...]) -> None:
    """Name the graph outputs (an onnx_ir model). The exporter names values after their aten op (e.g.
    "embedding"); an internal value already holding an output's name is renamed first, or the graph
    would define the name twice (onnx_export._rename_shadowed_values does the same on a file)."""
    graph = model.graph
    if len(graph.outputs) != len(names):
        raise ValueError(f"export: the model returns {len(graph.outputs)} outputs, named {list(names)}")
    outputs = {id(value) for value in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if value.name in names and id(value) not in outputs:
                value.name = f"{value.name}__internal"
    for value, name in zip(graph.outputs, names, strict=True):
        value.name = name


def check_graph(model: Any, windows: list[int]) -> None:
    """The exported graph maps every windowed layer and stays banded: one WindowedAttention node per
    windowed layer with that layer's window, dynamic batch and sequence axes on the inputs, and no value
    of the main graph with two sequence-long axes (an S x S score or mask matrix). ValueError otherwise."""
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == "WindowedAttention"]
    got = [next(a.i for a in n.attribute if a.name == "window") for n in nodes]
    if got != windows:
        raise ValueError(f"export: the graph has WindowedAttention windows {got}, expected one per layer {windows}")
    axes = [value.type.tensor_type.shape.dim[:2] for value in model.graph.input]
    if any(d.HasField("dim_value") for dims in axes for d in dims):
        raise ValueError("export: an input has a fixed batch or sequence size (the export specialised on the example)")
    # The exporter records every intermediate shape; a value it did not describe could hide anything.
    described = {v.name for v in [*model.graph.value_info, *model.graph.output]}
    undescribed = [o for n in model.graph.node for o in n.output if o and o not in described]
    if undescribed:
        raise ValueError(f"export: no shape recorded for {undescribed[0]}; cannot verify the graph is banded")
    sequence = re.compile(rf"\b{re.escape(axes[0][1].dim_param)}\b")
    for value in [*model.graph.value_info, *model.graph.output]:
        params = [d.dim_param for d in value.type.tensor_type.shape.dim]
        if sum(bool(sequence.search(p)) for p in params) >= 2:
            raise ValueError(f"export: {value.name} is {params}: an S x S value, the attention came out dense")
