"""Quantization-aware training with torchao's pt2e flow, as one explicit lifecycle.

    float --prepare()--> prepared (fake-quant, trainable) --convert()--> converted --export()--> exported

Each step checks the state it starts from, so a model can never be converted twice or exported before
it was converted. The prepared model is trained by the project's loop through `QatModel`, which turns
the loop's train()/eval() into pt2e's graph rewrites (an exported graph has no train mode of its own),
freezes the observers while evaluating, and puts back the dropout rates torchao's rewrite loses
(torchao 0.18's move_exported_model_to_train sets every dropout to p=0.5).

Our attention ops stay single float nodes: the x86 quantizer annotates linear layers and matmuls, not
custom ops, so q/k/v/output projections and the FFN become int8 while the banded attention stays float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.data.cache import write_atomic
from compress.runtime.presets import Preset

STATES = ("float", "prepared", "converted", "exported")


class LifecycleError(RuntimeError):
    """A lifecycle step called from the wrong state."""


def _pt2e() -> Any:
    from torchao.quantization import pt2e
    from torchao.quantization.pt2e import quantize_pt2e

    return pt2e, quantize_pt2e


def quantizer_for(preset: Preset) -> Any:
    """torchao's x86 quantizer: u8 activations, s8 per-channel weights (the ONNX Runtime presets' types).

    x86_64-avx2 keeps 7-bit weights ([-64, 63]) as ONNX Runtime's reduce_range does. (torchao's own
    reduce_range option narrows the *activations* to 0..127, which ONNX's QuantizeLinear does not
    reproduce: we never use it.)
    """
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if preset.activation_type != "uint8" or preset.weight_type != "int8":
        raise ValueError(f"qat: preset {preset.name}: only u8 activations with s8 weights are supported")
    config = get_default_x86_inductor_quantization_config(is_qat=True)
    if preset.reduce_range:
        weight = dataclasses.replace(config.weight, quant_min=-64, quant_max=63)
        config = dataclasses.replace(config, weight=weight)
    return X86InductorQuantizer().set_global(config)


def _dropouts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.dropout.default]


class QatModel(nn.Module):
    """A prepared (fake-quantized) graph the training loop can drive like any module."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self._rates = [float(n.args[1]) for n in _dropouts(gm)]  # type: ignore[arg-type]
        self.train(False)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.gm(*args)

    def train(self, mode: bool = True) -> QatModel:
        pt2e, _ = _pt2e()
        if mode:
            pt2e.move_exported_model_to_train(self.gm)
            for node, rate in zip(_dropouts(self.gm), self._rates, strict=True):  # torchao sets p=0.5
                node.args = (node.args[0], rate, True)
            self.gm.recompile()
            self.gm.apply(pt2e.enable_observer)
        else:
            pt2e.move_exported_model_to_eval(self.gm)
            self.gm.apply(pt2e.disable_observer)  # evaluation must not move the ranges
        for module in self.modules():
            module.training = mode
        return self


class Lifecycle:
    """One model's way from float to an int8 QDQ ONNX file; `state` says where it is."""

    def __init__(
        self,
        module: nn.Module,
        example: tuple[torch.Tensor, ...],
        dynamic_shapes: dict[str, Any],
        preset: Preset,
        exporting: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.module, self.example, self.dynamic_shapes, self.preset = module, example, dynamic_shapes, preset
        self.exporting = exporting  # swaps in export-friendly modules (our attention ops) while tracing
        self.state = "float"
        self.model: QatModel | None = None
        self.converted: torch.fx.GraphModule | None = None

    def _require(self, state: str, step: str) -> None:
        if self.state != state:
            raise LifecycleError(f"qat: {step}() needs a {state} model, but the model is {self.state}")

    def fresh(self) -> QatModel:
        """A newly prepared copy of the float model (also used to reload checkpoints)."""
        _, quantize_pt2e = _pt2e()
        self.module.eval()  # export in eval mode: attention dropout would otherwise stay inside SDPA
        with self.exporting(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = torch.export.export(self.module, self.example, dynamic_shapes=self.dynamic_shapes).module()
        gm.graph.eliminate_dead_code()  # unused heads (a BERT pooler) leave partitions without outputs
        gm.recompile()
        return QatModel(quantize_pt2e.prepare_qat_pt2e(gm, quantizer_for(self.preset)))

    def prepare(self) -> QatModel:
        self._require("float", "prepare")
        self.model = self.fresh()
        self.state = "prepared"
        return self.model

    def adopt(self, model: QatModel) -> None:
        """Continue with another prepared copy (the training loop's best epoch)."""
        self._require("prepared", "adopt")
        self.model = model

    def convert(self) -> torch.fx.GraphModule:
        self._require("prepared", "convert")
        assert self.model is not None
        _, quantize_pt2e = _pt2e()
        self.model.train(False)
        converted = quantize_pt2e.convert_pt2e(self.model.gm)
        for module in converted.modules():
            module.training = False
        self.converted, self.state = converted, "converted"
        return converted

    def export(
        self,
        path: Path,
        *,
        input_names: list[str],
        output_names: list[str],
        translation: dict[Any, Any] | None = None,
        finish: Callable[[Any], None] | None = None,
    ) -> None:
        """QDQ ONNX at `path` (dynamo exporter, opset 18); `finish` edits the ModelProto before saving."""
        self._require("converted", "export")
        assert self.converted is not None

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                self.converted,
                self.example,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=self.dynamic_shapes,
                custom_translation_table=translation,
                opset_version=18,
                verbose=False,
            )
        assert program is not None
        model = program.model_proto
        if finish is not None:
            finish(model)
        write_atomic(path, model.SerializeToString())
        self.state = "exported"
