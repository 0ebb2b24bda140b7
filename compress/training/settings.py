"""Settings of the stages that train: the loop's, and how a student learns from a teacher.

The train and distill stages' configs are these plus their `type`; prune's recovery and qat reuse them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from compress.strict import Strict


class TrainingSettings(Strict):
    """Optimiser and loop settings shared by the stages that train (train, distill)."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training set (early stopping may end sooner).")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per optimizer step.")
    lr: float = Field(3e-4, gt=0, lt=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of all steps spent warming the LR up from 0.")
    decay: Literal["linear", "cosine"] = Field("linear", description="LR decay to 0 after warm-up.")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Clip the global gradient norm to this value.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seeds initialisation, data order and dropout: runs are repeatable."
    )
    patience: int = Field(
        2, ge=1, le=1000, description="Early stopping: epochs without improvement of the eval metric."
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, le=10**8, description="Cap on optimizer steps per epoch.")
    eval_samples: int | None = Field(
        None, ge=1, le=10**8, description="Evaluate on at most this many evaluation texts."
    )
    threads: int = Field(2, ge=1, le=256, description="torch intra-op threads (fixed: results depend on it).")


class DistillLosses(Strict):
    """Weights of the distillation losses; a weight of 0 turns a loss off."""

    embedding_cosine: float = Field(
        0.0, ge=0, description="Embedding task: 1 - cosine of student and teacher embeddings (unlabeled text)."
    )
    embedding_mse: float = Field(0.0, ge=0, description="Embedding task: MSE of student and teacher embeddings.")
    kl: float = Field(
        0.0,
        ge=0,
        description="classification, token-classification (per word), lm: soft-target KL at `temperature` (Hinton).",
    )
    temperature: float = Field(2.0, gt=0, le=1000, description="Softmax temperature of the KL loss; must be > 0.")
    ce: float = Field(
        0.0, ge=0, description="classification, token-classification, lm: cross-entropy on the labels (next bytes)."
    )
    hidden_mse: float = Field(
        0.0,
        ge=0,
        description="MSE of hidden states at mapped layers; a learned projection when widths differ (TinyBERT).",
    )
    hidden_relative: float = Field(
        0.0,
        ge=0,
        description=(
            "Hugging Face models of the same width: squared error of hidden states relative to the teacher's, "
            "averaged over mapped layers (every layer weighs the same, whatever the scale of its states)."
        ),
    )
    attention: float = Field(
        0.0, ge=0, description="Hugging Face models: KL of attention distributions at mapped layers (MiniLM)."
    )

    def reads_teacher(self) -> bool:
        """Whether these losses need the teacher's outputs (cross-entropy on the labels alone does not)."""
        return any(
            (self.embedding_cosine, self.embedding_mse, self.kl, self.hidden_mse, self.hidden_relative, self.attention)
        )

    @model_validator(mode="after")
    def _some_loss(self) -> DistillLosses:
        weights = (self.embedding_cosine, self.embedding_mse, self.kl, self.ce, self.hidden_mse, self.hidden_relative)
        if not any((*weights, self.attention)):
            raise ValueError("every distillation loss weight is 0")
        return self


class DistillSettings(TrainingSettings):
    """How a student learns from a teacher: the distill stage's settings, also used by prune's recovery."""

    teacher: Path | None = Field(
        None, description="Teacher model folder (Hugging Face); default the recipe's input model."
    )
    keep_every: int | None = Field(
        None, ge=1, le=1000, description="Student by layer dropping: keep every k-th layer of the current model."
    )
    keep_layers: tuple[int, ...] | None = Field(
        None, description="Student by layer dropping: the layer indices to keep (copied with their weights)."
    )
    student: dict[str, Any] | None = Field(
        None,
        description=(
            "Zoo models: a fresh, smaller student: the current model's architecture with these fields "
            "replaced (e.g. {d_model: 64, d_ff: 128}), trained from random initialisation by the teacher."
        ),
    )
    layer_map: tuple[int, ...] | None = Field(
        None, description="Teacher layer for each student layer (hidden/attention losses); default uniform."
    )
    losses: DistillLosses | None = Field(
        None,
        description=(
            "Loss weights. Default by task: embedding {embedding_cosine: 1}; classification, token-classification "
            "and lm {kl: 1, ce: 1}."
        ),
    )
    select: Literal["task", "fidelity"] = Field(
        "task",
        description=(
            "Which epoch is kept and drives early stopping. task: the best task metric on data.evaluation. "
            "fidelity (embedding task): the best mean cosine to the teacher's embeddings on a seeded 10% of "
            "data.train held out from training, so the evaluation set never picks the model."
        ),
    )

    @model_validator(mode="after")
    def _one_student_rule(self) -> DistillSettings:
        given = [n for n in ("keep_every", "keep_layers", "student") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are alternative ways to make the student; give one")
        return self

    def kept_layers(self, depth: int) -> tuple[int, ...] | None:
        """The layers of a `depth`-layer model a layer-dropped student keeps (None: no layer dropping)."""
        if self.keep_layers is not None:
            return self.keep_layers
        if self.keep_every is not None:
            # Keep every k-th layer counting back from the last, so the top layer always stays.
            return tuple(range(depth - 1, -1, -self.keep_every))[::-1]
        return None

    def losses_for(self, task: str) -> DistillLosses:
        """The recipe's losses, or the task's defaults."""
        if self.losses is not None:
            return self.losses
        if task == "embedding":
            return DistillLosses(embedding_cosine=1.0)
        return DistillLosses(kl=1.0, ce=1.0)
