"""What the qat stage trains and checks, as each kind of model sets it up (embedder, task model, zoo)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compress.stages.qat.lifecycle import Lifecycle
from compress.training.loop import Batch, Evaluation


@dataclass
class Setup:
    """What differs between a Hugging Face embedder, a Hugging Face classifier or tagger and a zoo classifier."""

    lifecycle: Lifecycle
    names: list[str]  # graph inputs, in order
    outputs: list[str]
    train: dict[str, np.ndarray]  # encoded training texts (+ "targets": the teacher's outputs, "labels")
    loss: Callable[[Any, Batch], torch.Tensor]
    evaluation: Evaluation
    checks: list[dict[str, np.ndarray]]  # inputs the ONNX model is compared on
    translation: dict[Any, Any] | None = None
    finish: Callable[[Any], None] | None = None


def dims(names: tuple[str, str], max_length: int) -> dict[int, Any]:
    """torch.export's dynamic batch and sequence dimensions (sequences of 2 to max_length tokens)."""
    return {0: torch.export.Dim(names[0]), 1: torch.export.Dim(names[1], min=2, max=max_length)}
