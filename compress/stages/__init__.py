"""Stages: each turns one artifact into a new one inside its own folder. This dict is the only registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compress.stages import distill, export, prune, qat, quantize, train, validate

STAGES: dict[str, Callable[..., Any]] = {
    "train": train.run,
    "prune": prune.run,
    "distill": distill.run,
    "export": export.run,
    "quantize": quantize.run,
    "qat": qat.run,
    "validate": validate.run,
}

__all__ = ["STAGES"]
