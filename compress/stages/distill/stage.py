"""distill: the original model (or `teacher:`) teaches the current one, a layer-dropped copy of it, or
(zoo) a fresh smaller student. The machinery is compress.training (distill_hf, distill_zoo, losses),
shared with prune's recovery.
"""

from __future__ import annotations

from typing import Any

from compress.artifact import Artifact
from compress.context import Context
from compress.stages.distill.config import DistillStage
from compress.training import distill_hf


def run(artifact: Artifact, cfg: DistillStage, ctx: Context) -> tuple[Artifact, dict[str, Any]]:
    return distill_hf.distill(artifact, cfg, ctx)
