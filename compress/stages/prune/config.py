"""The prune stage's settings: the pattern, the schedule, the refit and recovery."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compress.strict import Strict
from compress.training.settings import DistillLosses, TrainingSettings


class RecoverySettings(TrainingSettings):
    """Training that lets a masked model recover: the task loss, or distillation from a teacher."""

    distill: bool = Field(
        True,
        description=(
            "Learn from the teacher with the distill stage's losses (needed for the embedding task, which has "
            "no labels); false: the task loss (labels; a Hugging Face classifier or tagger: cross-entropy, no "
            "teacher read) through the train stage's loop."
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
        "calibration",
        description=(
            "Which of the recipe's data sets the refit reads (unlabeled is enough): texts, or the text pairs or "
            "sentences of words a classifier of pairs or a tagger reads."
        ),
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
        description=(
            "Regular expressions on module names left dense (default: pooler and task heads; a Hugging Face "
            "classifier's or tagger's head is never pruned, whatever this says)."
        ),
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
