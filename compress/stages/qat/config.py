"""The qat stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.runtime.presets import PresetChoice
from compress.training.settings import DistillLosses, TrainingSettings


class QatStage(TrainingSettings):
    """Quantization-aware training after export: the fp32 model's PyTorch weights are trained with int8
    fake quantization (torchao pt2e), taught by the fp32 model itself, then exported as QDQ int8 ONNX."""

    type: Literal["qat"]
    preset: PresetChoice = Field("auto", description="int8 types for the target CPUs, as in quantize.preset.")
    epochs: int = Field(2, ge=1, le=1000, description="Passes over data.train (early stopping may end sooner).")
    lr: float = Field(2e-5, gt=0, lt=1, description="Peak learning rate: small, the model is already trained.")
    losses: DistillLosses | None = Field(
        None,
        description=(
            "Distillation from the fp32 model: default embedding_cosine 1 (embedding), kl 1 + ce 1 (classification)."
        ),
    )
    tolerance: float = Field(
        5e-3,
        gt=0,
        lt=1,
        description=(
            "ONNX Runtime's int8 outputs must keep a cosine >= 1 - tolerance to the converted PyTorch model's. "
            "Not 1e-6: on MiniLM the two agree to 0.998 (padded rows least), while each is 0.994 to fp32."
        ),
    )

    def losses_for(self, task: str) -> DistillLosses:
        if self.losses is not None:
            return self.losses
        return DistillLosses(embedding_cosine=1.0) if task == "embedding" else DistillLosses(kl=1.0, ce=1.0)

    @model_validator(mode="after")
    def _output_losses_only(self) -> QatStage:
        w = self.losses
        if w is not None and (w.hidden_mse or w.hidden_relative or w.attention):
            raise ValueError(
                "qat.losses: hidden_mse, hidden_relative and attention are distill losses; qat learns "
                "from the model's outputs (embedding_cosine/embedding_mse, kl/ce)"
            )
        return self
