"""train: fit a zoo model (new or from a checkpoint) on data.train, scored on data.evaluation each epoch;
or fine-tune a Hugging Face encoder with a task head (compress.training.finetune_hf).

Classification optimises accuracy; language modelling minimises bits per token (bits per byte with
the byte tokenizer). The best epoch's model is the stage's artifact; data.test, when given, is
scored once on it at the end. The machinery is compress.training.supervised, shared with prune's recovery.
"""

from __future__ import annotations

from typing import Any

from compress.artifact import Artifact
from compress.context import Context
from compress.stages.train.config import TrainStage
from compress.training import supervised


def run(artifact: Artifact, cfg: TrainStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    return supervised.train(artifact, cfg, ctx)
