"""The validate stage's settings and its gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.strict import Strict


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
