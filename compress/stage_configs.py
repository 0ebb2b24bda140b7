"""Stage configurations of a recipe: one frozen, strict model per stage type, discriminated by `type`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# int8 presets for target CPUs (compress/presets.py); auto: from the recipe's targets and this CPU.
PresetChoice = Literal["auto", "x86_64-vnni", "x86_64-avx2", "aarch64"]


class Strict(BaseModel):
    """Base of every recipe model: unknown fields are errors, parsed values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no .inf / .nan anywhere

    @model_validator(mode="after")
    def _paths_without_nul(self) -> Strict:
        for name, value in self:
            if isinstance(value, Path) and "\x00" in str(value):
                raise ValueError(f"{name}: a path cannot hold a NUL character")
        return self


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


class TrainStage(TrainingSettings):
    type: Literal["train"]


class DistillLosses(Strict):
    """Weights of the distillation losses; a weight of 0 turns a loss off."""

    embedding_cosine: float = Field(
        0.0, ge=0, description="Embedding task: 1 - cosine of student and teacher embeddings (unlabeled text)."
    )
    embedding_mse: float = Field(0.0, ge=0, description="Embedding task: MSE of student and teacher embeddings.")
    kl: float = Field(
        0.0, ge=0, description="classification / lm: soft-target KL at `temperature` (Hinton et al. 2015)."
    )
    temperature: float = Field(2.0, gt=0, le=1000, description="Softmax temperature of the KL loss; must be > 0.")
    ce: float = Field(0.0, ge=0, description="classification / lm: cross-entropy on the hard labels (next bytes).")
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

    @model_validator(mode="after")
    def _some_loss(self) -> DistillLosses:
        weights = (self.embedding_cosine, self.embedding_mse, self.kl, self.ce, self.hidden_mse, self.hidden_relative)
        if not any((*weights, self.attention)):
            raise ValueError("every distillation loss weight is 0")
        return self


class DistillStage(TrainingSettings):
    type: Literal["distill"]
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
            "Loss weights. Default by task: embedding {embedding_cosine: 1}; classification {kl: 1, ce: 1}; "
            "lm {kl: 1, ce: 1}."
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
    def _one_student_rule(self) -> DistillStage:
        given = [n for n in ("keep_every", "keep_layers", "student") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are alternative ways to make the student; give one")
        return self

    def losses_for(self, task: str) -> DistillLosses:
        """The recipe's losses, or the task's defaults."""
        if self.losses is not None:
            return self.losses
        if task == "embedding":
            return DistillLosses(embedding_cosine=1.0)
        return DistillLosses(kl=1.0, ce=1.0)


class RecoverySettings(TrainingSettings):
    """Training that lets a masked model recover: the task loss, or distillation from a teacher."""

    distill: bool = Field(
        True,
        description=(
            "Learn from the teacher with the distill stage's losses (needed for the embedding task, which has "
            "no labels); false: the task loss (labels) through the train stage's loop."
        ),
    )
    teacher: Path | None = Field(None, description="Teacher for distill: true; default the recipe's input model.")
    losses: DistillLosses | None = Field(None, description="distill: true: loss weights (default by task).")


class PruneTarget(Strict):
    pattern: str = Field(description="Regular expression on module names (Linear layers); must match at least one.")
    sparsity: float = Field(ge=0, lt=1, description="Fraction of this group's weights set to zero.")

    @model_validator(mode="after")
    def _valid_regex(self) -> PruneTarget:
        _check_regex(self.pattern)
        return self


class ReconstructSettings(Strict):
    """Least-squares refit of the output projections after structured pruning (Hugging Face encoders)."""

    data: Literal["calibration", "train"] = Field(
        "calibration", description="Which of the recipe's data sets is the calibration text (unlabeled is enough)."
    )
    texts: int = Field(
        512, ge=1, le=10**6, description="At most this many texts of it (the first ones), at data.max_length."
    )
    select: Literal["magnitude", "error"] = Field(
        "error",
        description=(
            "Which heads and neurons go. magnitude: the weight-norm ranking of `norm`, then the refit. error: "
            "layer by layer, the ones whose removal the refit can absorb best (greedy Optimal Brain Surgeon on "
            "the least-squares error, as in ZipLM), measured on the inputs the pruned layers below produce."
        ),
    )
    ridge: float = Field(
        0.01,
        ge=0,
        le=1e6,
        description="Ridge penalty, relative to the mean squared input: larger trusts the data less.",
    )


class PruneStage(Strict):
    type: Literal["prune"]
    method: Literal["unstructured", "nm", "block", "structured"] = Field(
        description=(
            "unstructured: individual weights; nm: N of every M consecutive weights (2:4); block: rows x cols "
            "blocks; structured: whole attention heads and FFN neurons, physically removed (a smaller model)."
        )
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured / block: fraction of weights pruned.")
    scope: Literal["layer", "global"] = Field(
        "layer", description="unstructured: each layer to the same sparsity, or one global magnitude ranking."
    )
    targets: tuple[PruneTarget, ...] = Field(
        (), description="unstructured / block: per-pattern sparsity (first match wins); default every Linear."
    )
    exclude: tuple[str, ...] = Field(
        ("pooler", r"(^|\.)head$", "classifier"),
        description="Regular expressions on module names left dense (default: pooler and task heads).",
    )
    min_sparsity: float = Field(0.0, ge=0, lt=1, description="global scope: lowest sparsity of any layer.")
    max_sparsity: float = Field(0.98, ge=0, lt=1, description="global scope: highest sparsity of any layer.")
    n: int = Field(2, ge=1, le=1024, description="nm: weights kept per group.")
    m: int = Field(4, ge=2, le=1024, description="nm: group size.")
    block: tuple[int, int] = Field((1, 4), description="block: (rows, cols) of a block.")
    heads: float = Field(0.0, ge=0, lt=1, description="structured: fraction of attention heads removed per layer.")
    ffn: float = Field(0.0, ge=0, lt=1, description="structured: fraction of FFN neurons removed per layer.")
    norm: Literal["l1", "l2"] = Field("l2", description="structured: how heads and neurons are ranked.")
    schedule: Literal["one_shot", "gradual"] = Field(
        "one_shot",
        description=(
            "one_shot: prune to the target at once. gradual (unstructured, block): sparsity rises along the "
            "cubic schedule of Zhu & Gupta 2017 during recovery training, masks recomputed every `frequency` steps."
        ),
    )
    ramp_epochs: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="gradual: epochs over which sparsity rises to the target (default recovery epochs - 1).",
    )
    frequency: int = Field(10, ge=1, le=10**8, description="gradual: optimizer steps between mask updates.")
    recovery: RecoverySettings | None = Field(
        None, description="Recovery training after (one_shot) or while (gradual) pruning; masks are kept throughout."
    )
    reconstruct: ReconstructSettings | None = Field(
        None,
        description=(
            "structured, Hugging Face encoders: after removal, refit each layer's attention-output and FFN-down "
            "projections by ridge least squares so the pruned layer's states match the original model's on "
            "calibration text, bottom layer first (no gradients; minutes on a CPU)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> PruneStage:
        if self.method == "nm" and self.n >= self.m:
            raise ValueError(f"N:M pruning needs N < M; got {self.n}:{self.m}")
        if min(self.block) < 1:
            raise ValueError(f"block sizes must be >= 1; got {self.block}")
        if self.min_sparsity > self.max_sparsity:
            raise ValueError("min_sparsity must not exceed max_sparsity")
        if self.method == "structured" and self.heads == 0 and self.ffn == 0:
            raise ValueError("structured pruning needs heads > 0 or ffn > 0")
        for pattern in self.exclude:
            _check_regex(pattern)
        if self.reconstruct is not None and self.method != "structured":
            raise ValueError(f"reconstruct refits what structured pruning removed; method is {self.method}")
        if self.schedule == "gradual":
            if self.method not in ("unstructured", "block"):
                raise ValueError(
                    f"schedule: gradual ramps a sparsity: it applies to unstructured and block, not {self.method}"
                )
            if self.recovery is None:
                raise ValueError("schedule: gradual prunes during training: give recovery settings")
            if self.recovery.epochs < 2 or (self.ramp_epochs or 1) >= self.recovery.epochs:
                raise ValueError(
                    "schedule: gradual needs ramp_epochs < recovery.epochs (an epoch at full sparsity to pick)"
                )
        if self.recovery is not None and self.method == "structured":
            raise ValueError("recovery after structured pruning: follow the prune stage with a distill stage")
        return self

    def ramp(self) -> int:
        """Epochs of the sparsity ramp (gradual schedule)."""
        assert self.recovery is not None
        return self.ramp_epochs or max(1, self.recovery.epochs - 1)


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None


class ExportStage(Strict):
    type: Literal["export"]
    exporter: Literal["torchscript", "dynamo"] | None = Field(
        None,
        description=(
            "torch.onnx exporter; default torchscript for Hugging Face models, dynamo for zoo models. "
            "torchscript: ONNX Runtime's transformers optimizer fuses its graph into Attention/SkipLayerNorm/"
            "EmbedLayerNorm, which the quantizer turns into int8 kernels. dynamo: the newer exporter; its graph "
            "fuses less; zoo models need it (windowed and block-sparse attention become custom ops)."
        ),
    )
    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the exported graph.")
    optimize: bool = Field(
        True, description="Run ONNX Runtime's transformers optimizer (operator fusion) on the exported graph."
    )
    tolerance: float = Field(
        1e-4,
        gt=0,
        le=10,
        description="Largest allowed |ONNX Runtime - PyTorch| on real inputs; beyond it the stage fails.",
    )
    check_samples: int = Field(
        16, ge=1, le=10_000, description="Evaluation texts used for the PyTorch/ONNX Runtime check."
    )


class QuantizeGoal(Strict):
    """Accuracy-aware quantization: keep the most sensitive nodes in float until the drop is within max_drop."""

    max_drop: float = Field(
        ge=0,
        le=1,
        description=(
            "Largest allowed drop of the goal metric from fp32: accuracy on data.evaluation (classification), "
            "or 1 - mean cosine of the int8 embeddings to the fp32 ones on data.evaluation (embedding)."
        ),
    )
    relative: bool = Field(False, description="max_drop is a fraction of the fp32 metric instead of an absolute drop.")
    samples: int | None = Field(
        None, ge=1, le=10**8, description="Measure the goal on at most this many evaluation texts (faster trials)."
    )


class QuantizeStage(Strict):
    type: Literal["quantize"]
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description=(
            "dynamic: weights int8 offline, activation ranges computed per run. static: activation ranges "
            "calibrated on the calibration set, QDQ format."
        ),
    )
    preset: PresetChoice = Field(
        "auto",
        description=(
            "int8 types for the CPUs the artifact ships to (README: Quantization presets). auto: from the recipe's "
            "targets and this CPU's flags. activation_type, weight_type and reduce_range override it."
        ),
    )
    calibration: Literal["minmax", "entropy", "percentile"] | None = Field(
        None, description="Static only: calibration method (default minmax)."
    )
    percentile: float = Field(99.999, gt=90, lt=100, description="Static, percentile calibration: the percentile.")
    calibration_samples: int = Field(128, ge=1, le=10**7, description="Static only: calibration texts used.")
    calibration_chunk: int = Field(
        4,
        ge=1,
        le=1024,
        description=(
            "Static only: batches (of data.batch_size texts) held in memory at once while calibrating; memory "
            "stays bounded whatever calibration_samples is."
        ),
    )
    per_channel: bool = Field(True, description="Per-output-channel weight scales (recommended for transformers).")
    reduce_range: bool | None = Field(
        None, description="7-bit weights: avoids u8s8 saturation on x86 CPUs without VNNI. Default: the preset's."
    )
    activation_type: Literal["uint8", "int8"] | None = Field(
        None, description="Static only: activation type. Default: the preset's (uint8)."
    )
    weight_type: Literal["int8", "uint8"] | None = Field(None, description="Weight type. Default: the preset's (int8).")
    op_types: tuple[str, ...] | None = Field(
        None,
        description=(
            "Operator types to quantize. Default: everything ONNX Runtime can quantize (dynamic), "
            "MatMul and Gemm (static)."
        ),
    )
    exclude_nodes: tuple[str, ...] = Field(
        (), description="Regular expressions on node names; matching nodes stay in float."
    )
    goal: QuantizeGoal | None = Field(
        None,
        description=(
            "Accuracy-aware: measure each quantized node's sensitivity, then keep nodes in float, most sensitive "
            "first, until the drop is within goal.max_drop. Every trial is in the report."
        ),
    )
    time_budget: float = Field(
        900,
        gt=0,
        le=7 * 86400,
        description="Seconds the accuracy-aware search may take; it fails when the goal is not met in time.",
    )

    @model_validator(mode="after")
    def _static_only_fields(self) -> QuantizeStage:
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("calibration applies to mode: static only (dynamic quantization is not calibrated)")
        if self.mode == "dynamic" and self.activation_type is not None:
            raise ValueError("activation_type applies to mode: static only (dynamic activations are always uint8)")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude_nodes: {pattern!r} is not a regular expression ({exc})") from None
        return self


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


class GateLimits(Strict):
    max_drop: float | None = Field(
        None,
        ge=0,
        le=2,
        description=(
            "Largest allowed drop of the task metric (accuracy; Spearman for embeddings) on this target below "
            "the fp32 model on native x86-64, on the same texts."
        ),
    )
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "Smallest allowed agreement with the fp32 model on native x86-64: the share of equal predictions "
            "(classification) or the mean cosine of the embeddings."
        ),
    )


class ValidateStage(Strict):
    type: Literal["validate"]
    batch_size: int = Field(1, ge=1, le=256, description="Latency: batch size.")
    sequence_length: int = Field(128, ge=8, le=8192, description="Latency: tokens per sequence.")
    threads: int = Field(2, ge=1, le=256, description="ONNX Runtime intra-op threads (fixed for every target).")
    warmup: int = Field(10, ge=0, le=100_000, description="Latency: untimed runs before timing.")
    runs: int = Field(
        100,
        ge=10,
        le=1_000_000,
        description="Latency: timed runs per model (interleaved with the reference); p99 needs 100 or more.",
    )
    gate: dict[str, GateLimits] = Field(
        default_factory=dict,
        description=(
            "Pass/fail limits per target name, or 'default' for every target. A target that misses them fails "
            "the run; the report names the target, the figures, the likely cause and the preset that fixes it."
        ),
    )
    emulated_samples: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description=(
            "Emulated targets evaluate the first N evaluation texts, rounded up to whole batches (emulation is "
            "200-500x slower); "
            "the gate compares them with the fp32 model on the same texts."
        ),
    )
    emulated_runs: int = Field(
        5,
        ge=1,
        le=10_000,
        description="Latency runs on emulated targets (labelled emulated; never compared with native).",
    )

    def limits(self, target: str) -> GateLimits | None:
        return self.gate.get(target) or self.gate.get("default")


Stage = Annotated[
    TrainStage | PruneStage | DistillStage | ExportStage | QuantizeStage | QatStage | ValidateStage,
    Field(discriminator="type"),
]
STAGE_ORDER = ("train", "prune", "distill", "export", "quantize", "qat", "validate")
STAGE_MODELS: dict[str, type[Strict]] = {
    "train": TrainStage,
    "prune": PruneStage,
    "distill": DistillStage,
    "export": ExportStage,
    "quantize": QuantizeStage,
    "qat": QatStage,
    "validate": ValidateStage,
}
