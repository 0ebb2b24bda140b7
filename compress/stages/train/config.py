"""The train stage's settings (zoo models)."""

from __future__ import annotations

from typing import Literal

from compress.training.settings import TrainingSettings


class TrainStage(TrainingSettings):
    type: Literal["train"]
