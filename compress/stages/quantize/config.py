"""The quantize stage's settings, and the accuracy-aware goal."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from compress.runtime.presets import PresetChoice
from compress.strict import Strict


class QuantizeGoal(Strict):
    """Accuracy-aware quantization: keep the most sensitive nodes in float until the drop is within max_drop
    (or the agreement with fp32 at least min_agreement)."""

    max_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "Largest allowed drop of the goal metric from fp32: accuracy on data.evaluation (classification), "
            "or 1 - mean cosine of the int8 embeddings to the fp32 ones on data.evaluation (embedding)."
        ),
    )
    min_agreement: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Instead of max_drop: the least agreement with the fp32 model on data.evaluation, as the validate "
            "gate measures it (predictions; per word for a tagger; mean cosine for embeddings)."
        ),
    )
    relative: bool = Field(False, description="max_drop is a fraction of the fp32 metric instead of an absolute drop.")
    samples: int | None = Field(
        None, ge=1, le=10**8, description="Measure the goal on at most this many evaluation texts (faster trials)."
    )

    @model_validator(mode="after")
    def _one_target(self) -> QuantizeGoal:
        if (self.max_drop is None) == (self.min_agreement is None):
            raise ValueError("quantize.goal: give one of max_drop (the task metric's drop) and min_agreement")
        if self.relative and self.min_agreement is not None:
            raise ValueError("quantize.goal: relative applies to max_drop, not min_agreement")
        return self


class GraphTuning(Strict):
    """Graph choices that depend on the CPU, timed on the CPU that builds the artifact (README: Quantization)."""

    enabled: bool = Field(True, description="Time the variants and keep the fastest; false keeps the graph as fused.")
    splits: tuple[Literal["skip_layer_norm", "bias_gelu"], ...] = Field(
        ("skip_layer_norm", "bias_gelu"),
        description=(
            "ONNX Runtime fusions tried undone: SkipLayerNormalization -> Add + LayerNormalization, BiasGelu -> "
            "Add + Gelu; each alone and all together against the fused graph."
        ),
    )
    int8: bool = Field(
        True,
        description=(
            "First time the int8 choices the preset and recipe leave open, on a CPU of the preset's family: u8s8 "
            "or u8u8 weights, full range or reduce_range, and for static int8 QDQ or QOperator."
        ),
    )
    batch_size: int = Field(1, ge=1, le=1024, description="Examples per timed run.")
    sequence_length: int = Field(128, ge=1, le=1 << 20, description="Tokens per example in a timed run.")
    threads: int = Field(2, ge=1, le=1024, description="ONNX Runtime intra-op threads while timing.")
    runs: int = Field(40, ge=3, le=100_000, description="Timed rounds (variants interleaved); medians are compared.")


class Smoothing(Strict):
    """SmoothQuant-style outlier smoothing of the fp32 graph before int8 (README: Quantization)."""

    enabled: bool = Field(True, description="Smooth the MatMul inputs whose simulated int8 error it at least halves.")
    alpha: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto",
        description=(
            "Migration strength in [0, 1]: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha). auto: searched per node "
            "(0.3 ... 0.9) on calibration text; a number: that alpha for every node."
        ),
    )
    samples: int = Field(
        128, ge=1, le=10**6, description="Texts (data.calibration, else data.evaluation) whose channel maxima set s."
    )
    search_texts: int = Field(32, ge=1, le=10**4, description="Of those, texts whose token rows judge each alpha.")
    rows_per_text: int = Field(16, ge=1, le=4096, description="Token rows kept per text for that judgement.")


DEFAULT_FLOOR = 0.99
DEFAULT_SENSITIVITY_SAMPLES = 16
# A node count, or a policy; strict: `true` is not 1.
KeepSensitive = Literal["auto", "none"] | Annotated[int, Field(ge=0, le=10**6, strict=True)]


class QuantizeStage(Strict):
    type: Literal["quantize"]
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description=(
            "dynamic: weights int8 offline, activation ranges computed per run. static: activation ranges "
            "calibrated on the calibration set, QDQ format (QOperator when tune.int8 finds it faster on this CPU)."
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
    keep_sensitive: KeepSensitive = Field(
        "auto",
        description=(
            "Nodes kept in float, most sensitive first, ranked by a one-pass measure of each node's int8 error on "
            "the sensitivity texts (README: Quantization). auto: as few as keep the mean cosine of the outputs to "
            "fp32 on those texts >= fidelity_floor; none: every candidate node in int8; a number N: the N most "
            "sensitive. With goal, the goal decides (leave it auto)."
        ),
    )
    fidelity_floor: float = Field(
        DEFAULT_FLOOR,
        gt=0,
        le=1,
        description=(
            "keep_sensitive: auto: the least mean cosine of the int8 model's outputs to the fp32 model's on the "
            "sensitivity texts."
        ),
    )
    sensitivity_samples: int = Field(
        DEFAULT_SENSITIVITY_SAMPLES,
        ge=1,
        le=10**5,
        description=(
            "Texts that rank the nodes and check fidelity_floor: the first N of data.calibration (of "
            "data.evaluation when the recipe has none), run one at a time, as deployed."
        ),
    )
    attention_matmuls: Literal["int8", "float"] | None = Field(
        None,
        description=(
            "Dynamic only: MatMuls of two activations (unfused attention: Q·Kᵀ and probabilities·V) in int8, "
            "ranked like every other candidate, or in float. Default: float, ONNX Runtime's default: in int8 they "
            "ran slower here (README: Quantization)."
        ),
    )
    goal: QuantizeGoal | None = Field(
        None,
        description=(
            "Accuracy-aware: keep the nodes ranked most sensitive in float, as few as bring the drop within "
            "goal.max_drop (predicted from the sensitivities, checked, refined by bisection). Every trial is in the "
            "report."
        ),
    )
    smoothing: Smoothing = Field(
        Smoothing(),
        description=(
            "Before quantizing: divide outlier input channels of each MatMul by s and multiply the weight rows by s "
            "(the same product; the outliers move into the per-channel weight scales)."
        ),
    )
    tune: GraphTuning = Field(
        GraphTuning(),
        description=(
            "The int8 types and format, then fused or split SkipLayerNormalization / BiasGelu, timed on this CPU "
            "after quantizing; the fastest variant whose outputs match is kept, with the timings in the report."
        ),
    )
    time_budget: float = Field(
        900,
        gt=0,
        le=7 * 86400,
        description=(
            "Seconds the search for the nodes kept in float (keep_sensitive: auto, or goal) may take; it fails when "
            "its target is not met in time."
        ),
    )

    @model_validator(mode="after")
    def _static_only_fields(self) -> QuantizeStage:
        if self.mode == "dynamic" and self.calibration is not None:
            raise ValueError("calibration applies to mode: static only (dynamic quantization is not calibrated)")
        if self.mode == "dynamic" and self.activation_type is not None:
            raise ValueError("activation_type applies to mode: static only (dynamic activations are always uint8)")
        self._keep_sensitive_fields()
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude_nodes: {pattern!r} is not a regular expression ({exc})") from None
        return self

    def _keep_sensitive_fields(self) -> None:
        # Compared with the defaults, not with the fields given: a resolved recipe (every default written out)
        # must parse again.
        ranked_by_floor = self.goal is None and self.keep_sensitive == "auto"
        if self.goal is not None and self.keep_sensitive != "auto":
            raise ValueError("keep_sensitive: with goal, the goal decides which nodes stay float; leave it auto")
        if self.fidelity_floor != DEFAULT_FLOOR and not ranked_by_floor:
            raise ValueError("fidelity_floor applies to keep_sensitive: auto without goal (the goal sets its own)")
        if self.sensitivity_samples != DEFAULT_SENSITIVITY_SAMPLES and self.keep_sensitive == "none" and not self.goal:
            raise ValueError("sensitivity_samples: keep_sensitive: none ranks no node")
        if self.attention_matmuls is not None and self.mode == "static":
            raise ValueError("attention_matmuls applies to mode: dynamic (static quantizes every MatMul of op_types)")
