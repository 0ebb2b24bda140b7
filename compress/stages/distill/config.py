"""The distill stage's settings."""

from __future__ import annotations

from typing import Literal

from compress.training.settings import DistillSettings


class DistillStage(DistillSettings):
    type: Literal["distill"]
